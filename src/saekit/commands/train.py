"""``saekit train`` (and ``saekit cache``): every config field is a flag.

Flags: SAEConfig and TrainConfig fields as ``--field-name``; DataConfig fields likewise,
except its ``device`` / ``dtype`` (which would collide with TrainConfig's), which are
``--model-device`` / ``--model-dtype``. ``--config run.json`` reads
``{"sae": {...}, "train": {...}, "data": {...}}`` first and flags override it; an optional
``"saes": {name: {"site": ..., <SAEConfig fields>}}`` trains several SAEs on one
activation stream (sweeps, several layers), each starting from ``"sae"`` and the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import time
from typing import Any

from saekit.cli import add_dataclass_args, dataclass_from_args
from saekit.config import DataConfig, SAEConfig, TrainConfig, from_dict, load_json

DATA_SKIP = ("device", "dtype")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train SAE(s) (default: TopK on MiniLM layer 3, built-in text)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.set_defaults(func=run)
    if importlib.util.find_spec("saekit.sources.cache") is not None:
        c = sub.add_parser("cache", help="write an activation cache to disk from a data config")
        c.add_argument("--config", help="JSON file with a 'data' section (flags override it)")
        c.add_argument("--out", required=True, help="cache directory to write")
        c.add_argument("--tokens", type=int, default=1_000_000, help="tokens to cache")
        c.add_argument("--seed", type=int, default=0, help="data order seed")
        add_dataclass_args(c, DataConfig, skip=DATA_SKIP)
        _add_model_device_args(c)
        c.set_defaults(func=run_cache)


def _add_model_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-device", dest="model_device", help="DataConfig.device (default cpu)")
    p.add_argument("--model-dtype", dest="model_dtype", help="DataConfig.dtype (default float32)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", help='JSON {"sae": {}, "train": {}, "data": {}, "saes": {}}; flags override'
    )
    add_dataclass_args(p, SAEConfig)
    add_dataclass_args(p, TrainConfig)
    add_dataclass_args(p, DataConfig, skip=DATA_SKIP)
    _add_model_device_args(p)


def _section(cfg: dict, key: str) -> dict:
    v = cfg.get(key, {})
    if not isinstance(v, dict):
        raise ValueError(f"config section {key!r} must be a JSON object")
    return v


def load_configs(
    args: argparse.Namespace,
) -> tuple[SAEConfig | dict[str, tuple[str | None, SAEConfig]], TrainConfig, DataConfig]:
    """The SAE config(s), TrainConfig and DataConfig from ``--config`` and the flags."""
    base = load_json(args.config) if getattr(args, "config", None) else {}
    if not isinstance(base, dict):
        raise ValueError(f"{args.config}: expected a JSON object")
    unknown = sorted(set(base) - {"sae", "saes", "train", "data"})
    if unknown:
        raise ValueError(f"{args.config}: unknown section(s) {unknown}; use sae, saes, train, data")
    data_cfg = _data_config(args, _section(base, "data"))
    train_cfg = dataclass_from_args(TrainConfig, args, base=_section(base, "train"))
    sae_cfg = dataclass_from_args(SAEConfig, args, base=_section(base, "sae"))
    saes = _section(base, "saes")
    if not saes:
        return sae_cfg, train_cfg, data_cfg
    plan: dict[str, tuple[str | None, SAEConfig]] = {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SAEConfig)}
    for name, spec in saes.items():
        if not isinstance(spec, dict):
            raise ValueError(f"saes.{name} must be a JSON object")
        spec = dict(spec)
        site = spec.pop("site", None)  # None: the source's only site
        merged = {**dataclasses.asdict(sae_cfg), **spec}
        merged.update({k: v for k, v in given.items() if v is not None})
        plan[name] = (site, from_dict(SAEConfig, merged))
    return plan, train_cfg, data_cfg


def _data_config(args: argparse.Namespace, base: dict) -> DataConfig:
    data = dataclass_from_args(DataConfig, args, base=base)
    if getattr(args, "model_device", None):
        data.device = args.model_device
    if getattr(args, "model_dtype", None):
        data.dtype = args.model_dtype
    return data


def build_source(data_cfg: DataConfig, seed: int) -> Any:
    """``saekit.sources.build_source``, or a direct fallback while it is being written."""
    try:
        from saekit.sources import build_source as real
    except ImportError:
        real = None
    if real is not None:
        return real(data_cfg, seed)
    if data_cfg.source == "synthetic":
        from saekit.sources.synthetic import SyntheticConfig, SyntheticSource

        return SyntheticSource(SyntheticConfig.from_dict(dict(data_cfg.synthetic)), seed)
    if data_cfg.source == "hf":
        from saekit.sources.hf import HFSource

        return HFSource(data_cfg, seed)
    raise ValueError(f"unknown data source {data_cfg.source!r}; use hf or synthetic")


def _site(name: str, site: str | None, sites: list[str]) -> str:
    if site is not None:
        return site
    if len(sites) != 1:
        raise ValueError(f"saes.{name} needs a 'site': the source has several {sites}")
    return sites[0]


def run(args: argparse.Namespace) -> int:
    from saekit.train import train

    sae_cfgs, train_cfg, data_cfg = load_configs(args)
    t0 = time.perf_counter()
    source = build_source(data_cfg, train_cfg.seed)
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

    base = load_json(args.config) if args.config else {}
    data_cfg = _data_config(args, _section(base, "data"))
    out = write_cache(data_cfg, args.out, args.tokens, seed=args.seed)
    print(f"cache written: {out}")
    return 0
