"""``saekit convert``: read an SAE in any format saekit reads, write it in another.

Sources: a saekit run, a SAELens / sparsify / dictionary_learning / Gemma Scope / Llama Scope
/ Goodfire / Qwen-Scope directory or file, ``hf://ORG/REPO/SUBPATH`` or
``saelens:RELEASE/SAE_ID``. Targets: ``saelens`` (a plain SAELens directory), ``sparsify``,
``dictionary_learning``, ``gemmascope``, ``llamascope``, ``goodfire``, ``qwenscope``; each
writer refuses, in one line, an SAE its format cannot hold (e.g. a ReLU SAE as sparsify).
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saekit.io.formats import formats

    targets = ["saelens", *[n for n, f in formats().items() if f.write is not None]]
    p = sub.add_parser(
        "convert",
        help="convert an SAE between formats (saelens, sparsify, dictionary_learning, ...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="SAE: run dir, peer-format dir/file, hf:// or saelens: spec")
    p.add_argument("--to", required=True, choices=targets, help="target format")
    p.add_argument("--out", required=True, help="output directory (or file, for .pt/.pth)")
    p.add_argument("--k", type=int, default=None, help="k, for sources that do not store it")
    p.add_argument("--site", default=None, help="hook site to record (default: the source's)")
    p.add_argument("--model", default=None, help="model to record (default: the source's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saekit.io.formats import write_format
    from saekit.io.native import open_sae

    sae, meta = open_sae(args.src, k=args.k)
    keep = {k: meta[k] for k in ("model_name", "hook_name", "context_size") if meta.get(k)}
    if args.site:
        keep["hook_name"] = args.site
    if args.model:
        keep["model_name"] = args.model
    out = write_format(sae, args.out, args.to, keep)
    shape = f"{sae.cfg.rule}, d_in={sae.d_in}, d_sae={sae.d_sae}"
    print(f"{meta.get('format')} -> {args.to}: {out} ({shape})")
    return 0
