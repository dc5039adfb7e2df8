"""Which latents aux-zipf treats as under-used, under each target definition.

Trains TopK + aux-zipf on the bench's small synthetic data (``saekit bench`` size small,
seed 0) and prints, for the trained firing rates, the candidate set of each definition:
count, median firing rate of the candidates (vs the mean rate k / d_sae), how many fire
above the mean and how many of the 10 most frequent latents are candidates. Writes JSON to
benchmarks/results/.

    .venv/bin/python benchmarks/aux_zipf_candidates.py --tokens 300000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from saekit import SAE, SAEConfig, TrainConfig
from saekit.bench import SIZES, synthetic_config
from saekit.io.atomic import write_json
from saekit.sources.synthetic import SyntheticSource
from saekit.train import train

DEFINITIONS = {
    "fixed Zipf(1), tau=1 (before issue 10)": {"profile": "fixed", "tail_only": False},
    "fixed Zipf(1), tau=0.5": {"profile": "fixed", "tail_only": False, "tau": 0.5},
    "fitted Zipf, tau=1, no tail cut": {"tail_only": False},
    "fitted Zipf, tau=1, below mean (default)": {},
    "fitted Zipf, tau=0.5, below mean": {"tau": 0.5},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    size = SIZES["small"]
    syn = SyntheticSource(synthetic_config(size, 0))
    k = max(1, round(syn.expected_l0))
    cfg = SAEConfig(d_sae=size.n_features, k=k, aux="zipf", aux_k=128, normalize_input=True)
    tc = TrainConfig(
        out_dir="runs/aux_zipf_candidates",
        total_tokens=args.tokens,
        batch_size=size.batch_size,
        lr=size.lr,
        progress=False,
        checkpoint_every=0,
        resume=False,
    )
    f = train(cfg, tc, syn).sae.fire_freq.clone()
    F, mean = f.numel(), k / f.numel()
    top = f.argsort(descending=True)[:10]
    rows = {}
    for name, opts in DEFINITIONS.items():
        sae = SAE(
            SAEConfig(d_in=size.d, d_sae=F, k=k, aux="zipf", aux_options=opts, dead_tokens=10**12)
        )
        sae.fire_freq.copy_(f)
        sae.tokens_seen.fill_(args.tokens)
        c, _ = sae.aux_candidates()
        rows[name] = {
            "candidates": int(c.sum()),
            "median_rate": float(f[c].median()) if c.any() else None,
            "above_mean": int((f[c] > mean).sum()),
            "of_top10": int(c[top].sum()),
        }
    print(f"TopK + aux-zipf, {F} latents, k={k}, {args.tokens} tokens; mean rate {mean:.4f}")
    print(f"{'definition':44s} {'cands':>6s} {'median':>8s} {'>mean':>6s} {'top10':>6s}")
    for name, r in rows.items():
        med = "-" if r["median_rate"] is None else f"{r['median_rate']:.4f}"
        print(f"{name:44s} {r['candidates']:6d} {med:>8s} {r['above_mean']:6d} {r['of_top10']:6d}")
    out = Path(args.out) / f"aux_zipf_candidates-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"k": k, "tokens": args.tokens, "mean_rate": mean, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
