"""``saekit train`` (and ``saekit cache``): every config field is a flag.

Flags: every SAEConfig, TrainConfig and DataConfig field as ``--field-name`` (DataConfig's
``device`` / ``dtype`` are ``--model-device`` / ``--model-dtype``, as their fields declare).
``--config run.json`` reads ``{"sae": {...}, "train": {...}, "data": {...}}`` first and
flags override it; an optional ``"saes": {name: {"site": ..., <SAEConfig fields>}}`` trains
several SAEs on one activation stream (sweeps, several layers), each starting from ``"sae"``
and the flags.

The command's defaults are the config defaults except where a field declares a
``cli_default`` (``total_tokens`` 300,000 and ``batch_size`` 1,024): a demo that trains in
a few minutes on 2 CPU cores (MiniLM layer 3, built-in pydoc text, TopK k=32, 3072 latents;
FVE about 0.8).

Several processes: ``torchrun --standalone --nproc_per_node N -m saekit train ... --strategy
ddp|layers|latents`` (DistConfig flags, the run document's ``"dist"`` section;
``--batch-size`` stays the global batch). Only rank 0 prints, logs and writes the run
directory.
"""

from __future__ import annotations

import argparse
import time

from saekit.cli import add_dataclass_args, dataclass_from_args, given_args
from saekit.config import DataConfig, DistConfig, SAEConfig, TrainConfig
from saekit.options import cli_defaults
from saekit.run_config import SECTIONS, RunConfig, load_run_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    from saekit.sources.cache import CacheConfig

    p = sub.add_parser(
        "train",
        help="train SAE(s) (default: TopK on MiniLM layer 3, built-in text)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", help='JSON {"sae": {}, "train": {}, "data": {}, "saes": {}}; flags override'
    )
    for cls in (SAEConfig, TrainConfig, DataConfig, DistConfig):
        add_dataclass_args(p, cls)
    p.set_defaults(func=run)
    c = sub.add_parser("cache", help="write an activation cache to disk from a data config")
    c.add_argument("--config", help="JSON file with a 'data' section (flags override it)")
    add_dataclass_args(c, CacheConfig)
    add_dataclass_args(c, DataConfig, skip=("prefetch",))  # prefetching is for training
    c.set_defaults(func=run_cache)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run's configs: ``--config`` with the flags given on top (the command's defaults
    under both)."""
    flags = {key: given_args(cls, args) for key, cls in SECTIONS.items()}
    defaults = {key: cli_defaults(cls) for key, cls in SECTIONS.items()}
    return load_run_config(getattr(args, "config", None), flags, defaults)


def run(args: argparse.Namespace) -> int:
    from saekit.run_config import train_run

    rc = run_config(args)
    t0 = time.perf_counter()
    res = train_run(rc)
    if not res.writer:  # another rank of a torchrun launch: rank 0 reports
        return 0
    wall = time.perf_counter() - t0
    if res.already_finished:
        print(
            f"already finished: {res.steps} steps, {res.tokens:,} tokens in {res.out_dir}"
            " (nothing recomputed or rewritten; use another --out-dir or --resume false to"
            " train again)"
        )
    else:
        state = "finished" if res.completed else "stopped early (resume by re-running)"
        print(f"{state}: {res.steps} steps, {res.tokens:,} tokens in {wall:.0f} s")
    for name, m in res.metrics.items():
        print(
            f"{res.run_dirs[name]}  L0 {m.get('l0', float('nan')):.1f}"
            f"  FVE {m.get('fve', float('nan')):.3f}"
            f"  dead {100 * m.get('dead_frac', float('nan')):.1f}%  (last logged batch)"
        )
    return 0


def run_cache(args: argparse.Namespace) -> int:
    from saekit.options import to_dict
    from saekit.sources.cache import CacheConfig, read_manifest, write_cache

    data_cfg = load_run_config(args.config, {"data": given_args(DataConfig, args)}).data
    cfg = dataclass_from_args(CacheConfig, args)
    out = write_cache(data_cfg, **to_dict(cfg))
    if cfg.format == "saelens":
        print(f"SAELens cache written: {out} ({cfg.n_tokens:,} tokens)")
        print(f"SAELens: cached_activations_path={str(out)!r}")
        print(f"saekit: saekit train --source cache --cache-dir {out}")
        return 0
    sites = ", ".join(read_manifest(out)["sites"])
    print(f"cache written: {out} ({cfg.n_tokens:,} tokens of {sites})")
    print(f"train on it with: saekit train --source cache --cache-dir {out}")
    return 0
