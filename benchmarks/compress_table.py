"""Benchmark: SVD, ASVD, SVD-LLM, SAES-SVD and ablations on a tiny LM, over calibration seeds.

1. Train a byte-level BPE tokenizer (vocab 1024) on the training part of the built-in pydoc
   corpus (saekit's split: every 10th document held out).
2. Train a small Llama-style LM (``--layers`` 8, d=96, MLP 256, 4 heads / 2 KV heads) for
   ``--steps`` (400) AdamW steps on random 64-token windows (batch 8); cached in
   ``OUT/model_<arch>_L<n>``. (Sized for a shared 2-core CPU.)
3. For each calibration seed (32 random 64-token windows of the training text) compress
   with every row below at ratios 0.2 / 0.4 / 0.6; report held-out perplexity at the model's
   full context (mean ± sd over seeds), per-layer output error against the original (the
   last layer shows the accumulated error), mean β and the share of layers at the β cap.
   Held-out text: the first ``--eval-windows`` (128) 64-token windows of the held-out part;
   ASVD's sensitivity perplexities use 4 calibration windows (measured once per seed).

Rows (exactly what each computes):

- ``SVD``: truncated SVD of W (data-free).
- ``ASVD (scaling, uniform ranks)``: SVD of W·diag(mean|x|^0.5); ``… + sensitivity ranks``:
  ASVD's per-layer perplexity sensitivity and threshold search.
- ``SVD-LLM (whitening)``: whitening by the full-precision inputs' Cholesky factor;
  ``… + closed-form U``: then U refitted on the compressed model's inputs (the SVD-LLM
  repository's update step; its LoRA fine-tuning is not run).
- Ablation of SAES-SVD's two ingredients: ``SAES-SVD (β 0)`` = whitening by the
  *compressed* model's inputs, no Δ (statistics from the compressed model alone);
  ``SAES-SVD (β ACES exact)`` = + Δ with β maximising the exact ρ(β);
  ``(β ACES closed_form)`` = the paper's frozen-subspace formula; fixed ``β 0.5`` / ``0.9``.

Run: ``nice .venv/bin/python benchmarks/compress_table.py --out runs/compress_bench``
(writes ``benchmarks/results/compress_table_<arch>_L<n>.json`` and a markdown table).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from saekit.compress import CompressConfig, compress_model, load_compressed, save_compressed
from saekit.compress.bench import compare_methods, markdown_table
from saekit.compress.data import (
    batches_of,
    builtin_texts,
    token_stream,
    train_bpe_tokenizer,
    windows,
)
from saekit.io.atomic import read_json, write_bytes, write_json

ROWS = {
    "SVD": {"method": "svd"},
    "ASVD (scaling, uniform ranks)": {"method": "asvd"},
    "ASVD (scaling + sensitivity ranks)": {"method": "asvd", "allocation": "sensitivity"},
    "SVD-LLM (whitening)": {"method": "svdllm"},
    "SVD-LLM (whitening + closed-form U)": {"method": "svdllm", "update_u": True},
    "SAES-SVD (β 0: compressed-model statistics only)": {"method": "saes", "beta": "0"},
    "SAES-SVD (β ACES exact)": {"method": "saes"},
    "SAES-SVD (β ACES closed_form, the paper's formula)": {"method": "saes", "aces": "closed_form"},
    "SAES-SVD (β 0.5 fixed)": {"method": "saes", "beta": "0.5"},
    "SAES-SVD (β 0.9 fixed)": {"method": "saes", "beta": "0.9"},
}


def build_model(args: argparse.Namespace, vocab: int) -> torch.nn.Module:
    import transformers as tf

    arch, seq_len, layers = args.arch, args.seq_len, args.layers
    if arch == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=vocab,
            hidden_size=args.d,
            intermediate_size=args.mlp,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=seq_len,
            tie_word_embeddings=True,
        )
        return tf.LlamaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=vocab,
            n_embd=args.d,
            n_layer=layers,
            n_head=4,
            n_positions=seq_len,
            n_inner=args.mlp,
        )
        return tf.GPT2LMHeadModel(cfg)
    raise ValueError(f"--arch must be llama or gpt2, got {arch!r}")


def train_lm(model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> list[float]:
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    steps, warm = args.steps, max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    losses = []
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - args.seq_len - 1, (args.batch,), generator=g)
        x = torch.stack([ids[s : s + args.seq_len] for s in starts])
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


def trained_model(args: argparse.Namespace, out: Path) -> tuple[Path, object, dict]:
    """The cached trained model directory, its tokenizer and training info."""
    import transformers as tf

    mdir = out / f"model_{args.arch}_L{args.layers}"
    if (mdir / "train_info.json").is_file() and not args.retrain:
        print(f"loaded trained model from {mdir}")
        return (
            mdir,
            tf.PreTrainedTokenizerFast.from_pretrained(mdir),
            read_json(mdir / "train_info.json"),
        )
    t0 = time.perf_counter()
    train_texts = builtin_texts("train")
    tok = train_bpe_tokenizer(train_texts, args.vocab)
    ids = token_stream(tok, train_texts)
    torch.manual_seed(args.seed)
    model = build_model(args, len(tok))
    losses = train_lm(model, ids, args)
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    info = {
        "arch": args.arch,
        "layers": args.layers,
        "steps": args.steps,
        "final_loss_avg20": sum(losses[-20:]) / 20,
        "train_seconds": time.perf_counter() - t0,
        "train_tokens": ids.numel(),
    }
    write_json(mdir / "train_info.json", info)
    return mdir, tok, info


def save_demo(mdir: Path, calib: list, out: Path, tok: object, ids: torch.Tensor) -> dict:
    """SAES-SVD at ratio 0.4 saved; reloaded by load_compressed and by transformers'
    from_pretrained (remote code): sizes on disk, logits equality, per-block cost."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(mdir).eval()
    res = compress_model(model, CompressConfig(method="saes", ratio=0.4), calib)
    size = save_compressed(model, out, res.summary(), tok)
    with torch.no_grad():
        ref = model(ids).logits
        same = torch.equal(load_compressed(out)(ids).logits, ref)
        hf = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        same_hf = torch.equal(hf(ids).logits, ref)
    return {
        "dir": str(out),
        "weights_bytes": size,
        "original_weights_bytes": (mdir / "model.safetensors").stat().st_size,
        "load_compressed_identical_logits": same,
        "from_pretrained_identical_logits": same_hf,
        "block_forwards": res.block_forwards,
        "blocks": [
            {"seconds": b.seconds, "peak_bytes": b.peak_bytes, "peak_kind": b.peak_kind}
            for b in res.blocks
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/compress_bench")
    ap.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=96, help="hidden size")
    ap.add_argument("--mlp", type=int, default=256, help="MLP width")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=128, help="held-out windows (0 = all)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), help="row labels to run")
    ap.add_argument("--retrain", action="store_true")
    args = ap.parse_args()
    import transformers as tf

    out = Path(args.out)
    mdir, tok, train_info = trained_model(args, out)
    stream = token_stream(tok, builtin_texts("train"))
    test_ids = token_stream(tok, builtin_texts("test"))
    heldout = batches_of(windows(test_ids, args.seq_len, args.eval_windows), 8)
    reference = tf.AutoModelForCausalLM.from_pretrained(mdir).eval()
    res = compare_methods(
        lambda: tf.AutoModelForCausalLM.from_pretrained(mdir).eval(),
        lambda seed: batches_of(windows(stream, args.seq_len, args.calib_seqs, seed), 8),
        heldout,
        methods=(),
        ratios=tuple(args.ratios),
        seeds=tuple(args.seeds),
        base=CompressConfig(grid=11, sensitivity_seqs=4),
        progress=lambda s: print(s, flush=True),
        variants={k: ROWS[k] for k in args.rows},
        reference=reference,
    )
    res["train"] = train_info
    calib0 = batches_of(windows(stream, args.seq_len, args.calib_seqs, args.seeds[0]), 8)
    res["saved"] = save_demo(mdir, calib0, out / "saes_0.4", tok, heldout[0])
    table = markdown_table(res)
    print(table)
    name = f"compress_table_{args.arch}_L{args.layers}"
    res_dir = Path(__file__).parent / "results"
    write_json(res_dir / f"{name}.json", res)
    write_bytes(res_dir / f"{name}.md", (table + "\n").encode())
    print(f"saved SAES-SVD 0.4 model: {res['saved']}")
    print(f"wrote {res_dir / name}.json")


if __name__ == "__main__":
    main()
