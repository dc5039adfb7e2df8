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
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import time

from saekit.cli import add_dataclass_args, dataclass_from_args, given_args
from saekit.config import DataConfig, SAEConfig, TrainConfig, from_dict
from saekit.errors import ConfigError
from saekit.io.atomic import read_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train SAE(s) (default: TopK on MiniLM layer 3, built-in text)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.add_argument(
        "--prefetch",
        type=int,
        default=0,
        help="batches produced ahead in a background thread (0: off); resume stays exact",
    )
    p.set_defaults(func=run)
    if importlib.util.find_spec("saekit.sources.cache") is not None:
        c = sub.add_parser("cache", help="write an activation cache to disk from a data config")
        c.add_argument("--config", help="JSON file with a 'data' section (flags override it)")
        c.add_argument("--out", required=True, help="cache directory to write")
        c.add_argument("--tokens", type=int, default=1_000_000, help="tokens to cache")
        c.add_argument("--seed", type=int, default=0, help="data order seed")
        c.add_argument("--shard-tokens", type=int, default=65536, help="tokens per shard file")
        c.add_argument(
            "--cache-dtype", default="float32", choices=["float32", "float16"], help="stored dtype"
        )
        c.add_argument("--overwrite", action="store_true", help="replace an existing cache")
        add_dataclass_args(c, DataConfig)
        c.set_defaults(func=run_cache)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", help='JSON {"sae": {}, "train": {}, "data": {}, "saes": {}}; flags override'
    )
    add_dataclass_args(p, SAEConfig)
    add_dataclass_args(p, TrainConfig)
    add_dataclass_args(p, DataConfig)


def _section(cfg: dict, key: str, where: str) -> dict:
    v = cfg.get(key, {})
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: section {key!r} must be a JSON object")
    return v


def _at(path: str | None, section: str) -> str:
    return f"{path}, section {section!r}" if path else ""


def _read_config(path: str | None) -> dict:
    base = read_json(path) if path else {}
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: expected a JSON object with sae/saes/train/data sections")
    return base


def load_configs(
    args: argparse.Namespace,
) -> tuple[SAEConfig | dict[str, tuple[str | None, SAEConfig]], TrainConfig, DataConfig]:
    """The SAE config(s), TrainConfig and DataConfig from ``--config`` and the flags."""
    path = getattr(args, "config", None)
    base = _read_config(path)
    unknown = sorted(set(base) - {"sae", "saes", "train", "data"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; use sae, saes, train, data")
    data_cfg = _data_config(args, base, path)
    train_cfg = dataclass_from_args(
        TrainConfig, args, base=_section(base, "train", path), where=_at(path, "train")
    )
    sae_cfg = dataclass_from_args(
        SAEConfig, args, base=_section(base, "sae", path), where=_at(path, "sae")
    )
    saes = _section(base, "saes", path)
    if not saes:
        return sae_cfg, train_cfg, data_cfg
    plan: dict[str, tuple[str | None, SAEConfig]] = {}
    given = given_args(SAEConfig, args)
    for name, spec in saes.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: saes.{name} must be a JSON object")
        spec = dict(spec)
        site = spec.pop("site", None)  # None: the source's only site
        merged = {**dataclasses.asdict(sae_cfg), **spec, **given}
        plan[name] = (site, from_dict(SAEConfig, merged, where=_at(path, f"saes.{name}")))
    return plan, train_cfg, data_cfg


def _data_config(args: argparse.Namespace, base: dict, path: str | None) -> DataConfig:
    section = _section(base, "data", path)
    return dataclass_from_args(DataConfig, args, base=section, where=_at(path, "data"))


def _site(name: str, site: str | None, sites: list[str]) -> str:
    if site is not None:
        return site
    if len(sites) != 1:
        raise ConfigError(f"saes.{name} needs a 'site': the source has several {sites}")
    return sites[0]


def run(args: argparse.Namespace) -> int:
    from saekit.sources import build_source
    from saekit.train import train

    sae_cfgs, train_cfg, data_cfg = load_configs(args)
    t0 = time.perf_counter()
    source = build_source(data_cfg, train_cfg.seed)
    if getattr(args, "prefetch", 0) > 0:
        from saekit.sources.prefetch import PrefetchSource

        source = PrefetchSource(source, train_cfg.batch_size, depth=args.prefetch)
    try:
        if isinstance(sae_cfgs, dict):
            sites = list(source.sites)
            sae_cfgs = {n: (_site(n, st, sites), c) for n, (st, c) in sae_cfgs.items()}
        res = train(sae_cfgs, train_cfg, source, data_cfg)
    finally:
        source.close()
    wall = time.perf_counter() - t0
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
    from saekit.sources.cache import write_cache

    data_cfg = _data_config(args, _read_config(args.config), args.config)
    out = write_cache(
        data_cfg,
        args.out,
        args.tokens,
        shard_tokens=args.shard_tokens,
        dtype=args.cache_dtype,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    print(f"cache written: {out} ({args.tokens:,} tokens of {', '.join(data_cfg.sites)})")
    print(f"train on it with: saekit train --source cache --cache-dir {out}")
    return 0
