"""Demo: SVD vs ASVD vs SVD-LLM vs SAES-SVD on a tiny decoder LM trained on the built-in corpus.

1. Train a byte-level BPE tokenizer (vocab 1024) on the training part of the built-in pydoc
   corpus (``saekit.sources.text.iter_texts``: every 10th document held out).
2. Train a small Llama-style LM (4 layers, d=128, MLP 384, 4 heads / 2 KV heads) or GPT-2
   (``--arch gpt2``) for ``--steps`` (600) AdamW steps on random 64-token windows (batch 16).
3. Compress it with every method at ratios 0.2 / 0.4 / 0.6 (64 calibration sequences from the
   training split) and report held-out perplexity; prints a markdown table, writes JSON.

Run: ``.venv/bin/python benchmarks/compress_table.py --out runs/compress_demo --ablations``
(the trained model is cached in ``OUT/model_<arch>``; ``--retrain`` forces training again).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from saekit.compress.bench import compare_methods, markdown_table
from saekit.compress.core import CompressConfig, compress_model
from saekit.compress.data import builtin_texts, chunk_batches, token_stream, train_bpe_tokenizer
from saekit.compress.io import load_compressed, save_compressed


def build_model(arch: str, vocab: int, seq_len: int) -> torch.nn.Module:
    import transformers as tf

    if arch == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=seq_len,
            tie_word_embeddings=True,
        )
        return tf.LlamaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=vocab, n_embd=128, n_layer=4, n_head=4, n_positions=seq_len, n_inner=384
        )
        return tf.GPT2LMHeadModel(cfg)
    raise ValueError(f"--arch must be llama or gpt2, got {arch!r}")


def train_lm(
    model: torch.nn.Module,
    ids: torch.Tensor,
    steps: int,
    seq_len: int,
    batch: int,
    lr: float,
    seed: int,
) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    losses = []
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=g)
        x = torch.stack([ids[s : s + seq_len] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss:.3f}", flush=True)
    model.eval()
    return losses


def save_demo(
    model: torch.nn.Module,
    calib: list[torch.Tensor],
    out: Path,
    orig_dir: Path,
    tok: object,
    ids: torch.Tensor,
) -> dict:
    """SAES-SVD at ratio 0.4 saved and reloaded: sizes on disk and a logits round-trip check."""
    import copy

    student = copy.deepcopy(model)
    res = compress_model(student, CompressConfig(method="saes", ratio=0.4), calib)
    size = save_compressed(student, out, res.summary(), tok)
    loaded = load_compressed(out)
    with torch.no_grad():
        same = bool(torch.equal(loaded(ids).logits, student(ids).logits))
    return {
        "dir": str(out),
        "weights_bytes": size,
        "original_weights_bytes": (orig_dir / "model.safetensors").stat().st_size,
        "reload_identical_logits": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/compress_demo")
    ap.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--beta", default="aces", help="SAES-SVD β (number, aces, grid)")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument(
        "--ablations",
        action="store_true",
        help="also SAES-SVD with β=0 (= sequential SVD-LLM), grid-searched β, fixed β 0.5/0.9",
    )
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    mdir = out / f"model_{args.arch}"
    train_texts, test_texts = builtin_texts("train"), builtin_texts("test")
    import transformers as tf

    if (mdir / "config.json").is_file() and not args.retrain:
        model = tf.AutoModelForCausalLM.from_pretrained(mdir).float().eval()
        tok = tf.PreTrainedTokenizerFast.from_pretrained(mdir)
        train_info = json.loads((mdir / "train_info.json").read_text())
        print(f"loaded trained model from {mdir}")
    else:
        t0 = time.perf_counter()
        tok = train_bpe_tokenizer(train_texts, args.vocab)
        ids = token_stream(tok, train_texts)
        model = build_model(args.arch, len(tok), args.seq_len)
        losses = train_lm(model, ids, args.steps, args.seq_len, args.batch, args.lr, args.seed)
        model.eval()
        mdir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(mdir)
        tok.save_pretrained(mdir)
        train_info = {
            "arch": args.arch,
            "steps": args.steps,
            "final_loss_avg20": sum(losses[-20:]) / 20,
            "train_seconds": time.perf_counter() - t0,
            "train_tokens": ids.numel(),
        }
        (mdir / "train_info.json").write_text(json.dumps(train_info, indent=2))
    calib = chunk_batches(token_stream(tok, train_texts), args.seq_len, 8, args.calib_seqs)
    heldout = chunk_batches(token_stream(tok, test_texts), args.seq_len, 8)
    res = compare_methods(
        model,
        calib,
        heldout,
        ratios=tuple(args.ratios),
        base=CompressConfig(beta=args.beta),
        progress=lambda s: print(s, flush=True),
        variants={
            "SAES-SVD β=0 (sequential SVD-LLM)": {"method": "saes", "beta": "0"},
            "SAES-SVD β=grid": {"method": "saes", "beta": "grid"},
            "SAES-SVD β=0.5 (fixed)": {"method": "saes", "beta": "0.5"},
            "SAES-SVD β=0.9 (fixed)": {"method": "saes", "beta": "0.9"},
        }
        if args.ablations
        else None,
    )
    res["train"] = train_info
    res["saved"] = save_demo(model, calib, out / "saes_0.4", mdir, tok, heldout[0])
    table = markdown_table(res)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"table_{args.arch}.json").write_text(json.dumps(res, indent=2))
    (out / f"table_{args.arch}.md").write_text(table + "\n")
    print(f"saved SAES-SVD 0.4 model: {res['saved']}")
    print(f"wrote {out / f'table_{args.arch}.json'}")


if __name__ == "__main__":
    main()
