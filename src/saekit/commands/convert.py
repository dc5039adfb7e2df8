"""``saekit convert``: read an SAE in any format saekit reads, write it in another.

Sources: a saekit run, a SAELens / sparsify / dictionary_learning / Gemma Scope / Llama Scope
/ Goodfire / Qwen-Scope directory or file, ``hf://ORG/REPO/SUBPATH`` or
``saelens:RELEASE/SAE_ID``. Targets: ``saelens`` (a plain SAELens directory), ``sparsify``,
``dictionary_learning``, ``gemmascope``, ``llamascope``, ``goodfire``, ``qwenscope``; each
writer refuses, in one line, an SAE its format cannot hold (e.g. a ReLU SAE as sparsify).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from saekit.cli import add_dataclass_args, dataclass_from_args
from saekit.options import Options, option


def _targets() -> list[str]:
    from saekit.io.formats import formats

    return ["saelens", *[n for n, f in formats().items() if f.write is not None]]


@dataclass
class ConvertOptions(Options):
    """What ``saekit convert`` reads and what it writes."""

    src: str = option(
        help="SAE: run dir, peer-format dir/file, hf:// or saelens: spec", positional=True
    )
    to: str = option(help="target format", choices=_targets)
    out: str = option(help="output directory (or file, for .pt/.pth)", nonempty=True)
    k: int | None = option(None, "k, for sources that do not store it", ge=1)
    site: str | None = option(None, "hook site to record (default: the source's)")
    model: str | None = option(None, "model to record (default: the source's)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an SAE between formats (saelens, sparsify, dictionary_learning, ...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_args(p, ConvertOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saekit.io.formats import write_format
    from saekit.io.native import open_sae

    o = dataclass_from_args(ConvertOptions, args)
    sae, meta = open_sae(o.src, k=o.k)
    keep = {k: meta[k] for k in ("model_name", "hook_name", "context_size") if meta.get(k)}
    if o.site:
        keep["hook_name"] = o.site
    if o.model:
        keep["model_name"] = o.model
    out = write_format(sae, o.out, o.to, keep)
    shape = f"{sae.cfg.rule}, d_in={sae.d_in}, d_sae={sae.d_sae}"
    print(f"{meta.get('format')} -> {o.to}: {out} ({shape})")
    return 0
