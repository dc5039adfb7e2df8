"""``saekit compress``: low-rank compression (SVD, ASVD, SVD-LLM, SAES-SVD) of a causal LM.

Flags: every :class:`~saekit.compress.config.CompressRunConfig` field (model, data,
evaluation, output) and every :class:`~saekit.compress.config.CompressConfig` field (the
method); the work is :func:`saekit.compress.run.compress_run` / ``table_run``.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saekit.cli import add_dataclass_args
    from saekit.compress.config import CompressConfig, CompressRunConfig

    p = sub.add_parser(
        "compress",
        help="low-rank compress a causal LM's linear layers (svd, asvd, svdllm, saes)",
        description="Compress every linear layer inside the transformer blocks (rank "
        "⌊mn(1−ratio)/(m+n)⌋ or ASVD's sensitivity ranks), report parameters, size on disk, "
        "held-out perplexity at the model's full context and throughput before/after, and "
        "save the model (loads with AutoModelForCausalLM.from_pretrained(dir, "
        "trust_remote_code=True) or saekit.compress.load_compressed). With --table, compare "
        "methods × ratios × calibration seeds instead.",
    )
    add_dataclass_args(p, CompressRunConfig)
    add_dataclass_args(p, CompressConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saekit.cli import dataclass_from_args
    from saekit.compress.bench import markdown_table
    from saekit.compress.config import CompressConfig, CompressRunConfig
    from saekit.compress.run import compress_run, table_run

    job = dataclass_from_args(CompressRunConfig, args)
    cfg = dataclass_from_args(CompressConfig, args)

    def say(s: str) -> None:
        print(s, flush=True)

    if job.table:
        res = table_run(job, cfg, progress=say)
        print(markdown_table(res))
        if job.out:
            print(f"wrote {job.out}/table.json and {job.out}/table.md")
        return 0
    rep = compress_run(job, cfg, progress=say)
    b, a = rep["before"], rep["after"]
    ratios = f"ratio={cfg.ratio}"
    if cfg.ratio_attn is not None or cfg.ratio_mlp is not None:
        ratios = f"attention ratio={cfg.ratio_for('attn')}, MLP ratio={cfg.ratio_for('mlp')}"
    line = (
        f"{cfg.method} {ratios}: params {b['params']} -> {a['params']}, "
        f"weights {b['weights_bytes'] / 1e6:.2f} -> {a['weights_bytes'] / 1e6:.2f} MB, "
        f"held-out ppl {b['ppl']:.3f} -> {a['ppl']:.3f} "
        f"({rep['eval']['windows']} windows of {rep['eval']['seq_len']} tokens)"
    )
    if "throughput" in b:
        line += (
            f", {b['throughput']['tokens_per_s']:.0f} -> "
            f"{a['throughput']['tokens_per_s']:.0f} tokens/s"
        )
    print(line + f"; saved to {job.out}")
    return 0
