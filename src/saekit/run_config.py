"""A training run as one JSON document, ``{"sae", "saes", "train", "data"}``, and its run.

:func:`load_run_config` reads the document (a path or a dict), layers per-section overrides
over it (``saekit train``'s flags) and validates every section, naming the file and section
of a bad value; :func:`train_run` builds the source (with prefetching), trains and closes
it. ``saekit train`` is these two calls, so a Python user gets the same behaviour::

    from saekit.run_config import load_run_config, train_run
    res = train_run(load_run_config("run.json", {"train": {"lr": 1e-3}}))

``saes`` (optional) maps names to ``{"site": ..., <SAEConfig fields>}``: several SAEs on one
activation stream, each starting from the ``sae`` section; overrides of ``sae`` (flags)
apply to every one of them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saekit.config import DataConfig, DistConfig, SAEConfig, TrainConfig
from saekit.errors import ConfigError
from saekit.options import check_fields, from_dict

if TYPE_CHECKING:
    from saekit.train import TrainResult

#: the sections of a run document and the options class of each (``saes``: SAEConfig each)
SECTIONS: dict[str, type] = {
    "sae": SAEConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "dist": DistConfig,
}


@dataclass
class RunConfig:
    """The validated configs of one training run."""

    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    #: name -> (site or None for the source's only site, SAEConfig); empty: one SAE per site
    saes: dict[str, tuple[str | None, SAEConfig]] = field(default_factory=dict)
    #: how a torchrun launch splits the run (ignored in one process)
    dist: DistConfig = field(default_factory=DistConfig)

    def plan(self, sites: list[str]) -> SAEConfig | dict[str, tuple[str, SAEConfig]]:
        """What :func:`saekit.train.train` takes as ``sae_cfgs`` for a source with ``sites``."""
        if not self.saes:
            return self.sae
        out = {}
        for name, (site, cfg) in self.saes.items():
            if site is None:
                if len(sites) != 1:
                    raise ConfigError(f"saes.{name} needs a 'site': the source has several {sites}")
                site = sites[0]
            out[name] = (site, cfg)
        return out


def _at(where: str, section: str) -> str:
    return f"{where}, section {section!r}" if where else f"section {section!r}"


def _section(doc: dict, key: str, where: str) -> dict:
    v = doc.get(key, {})
    if not isinstance(v, dict):
        raise ConfigError(f"{_at(where, key)} must be a JSON object, not {type(v).__name__}")
    return v


def read_run_document(doc: str | Path | dict | None) -> tuple[dict, str]:
    """``(document, where)`` from a JSON path, a dict or None (empty)."""
    if doc is None:
        return {}, ""
    if isinstance(doc, dict):
        return doc, ""
    from saekit.io.atomic import read_json

    data = read_json(doc)
    if not isinstance(data, dict):
        raise ConfigError(f"{doc}: expected a JSON object with sae/saes/train/data sections")
    return data, str(doc)


def load_run_config(
    doc: str | Path | dict | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    defaults: dict[str, dict[str, Any]] | None = None,
) -> RunConfig:
    """The :class:`RunConfig` of a run document with ``overrides`` on top.

    ``overrides`` / ``defaults``: per section (``"sae"``, ``"train"``, ``"data"``) field
    values that win over / yield to the document's (e.g. flags / a command's defaults).
    """
    doc, where = read_run_document(doc)
    unknown = sorted(set(doc) - {*SECTIONS, "saes"})
    if unknown:
        raise ConfigError(
            f"{where or 'run config'}: unknown section(s) {unknown}; use sae, saes, train,"
            " data, dist"
        )
    overrides, defaults = overrides or {}, defaults or {}
    built: dict[str, Any] = {}
    for key, cls in SECTIONS.items():
        section = check_fields(cls, _section(doc, key, where), where=_at(where, key))
        data = {**defaults.get(key, {}), **section, **overrides.get(key, {})}
        built[key] = from_dict(cls, data)
    saes: dict[str, tuple[str | None, SAEConfig]] = {}
    for name, spec in _section(doc, "saes", where).items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{_at(where, 'saes')}: saes.{name} must be a JSON object")
        spec = dict(spec)
        site = spec.pop("site", None)
        merged = {**dataclasses.asdict(built["sae"]), **spec, **overrides.get("sae", {})}
        saes[name] = (site, from_dict(SAEConfig, merged, where=_at(where, f"saes.{name}")))
    return RunConfig(built["sae"], built["train"], built["data"], saes, built["dist"])


def train_run(rc: RunConfig):  # -> saekit.train.TrainResult
    """Build ``rc.data``'s source (prefetched when ``rc.data.prefetch``), train, close it.

    Under torchrun the process first joins the group and splits the run as ``rc.dist``
    says (:func:`saekit.distributed.launch.from_env`; CUDA devices become the rank's).
    """
    from saekit.distributed.launch import from_env, rank_device
    from saekit.sources import build_source
    from saekit.train import train

    strategy = from_env(rc.dist, rc.train.device)
    try:
        if strategy.world == 1:  # a finished run: found before any model is loaded
            done = finished_run(rc.plan, rc.train, rc.data)
            if done is not None:
                return done
        rc.train.device = rank_device(rc.train.device)
        rc.data.device = rank_device(rc.data.device)
        source = build_source(rc.data, rc.train.seed)
        try:
            if rc.data.prefetch > 0:
                from saekit.sources.prefetch import PrefetchSource

                source = PrefetchSource(source, rc.train.batch_size, depth=rc.data.prefetch)
            plan = rc.plan(list(source.sites))
            return train(plan, rc.train, source, rc.data, strategy=strategy)
        finally:
            source.close()
    finally:
        strategy.close()


def _as_trained(cfg: SAEConfig, d_in: int, train_cfg: TrainConfig) -> SAEConfig:
    """``cfg`` as :meth:`saekit.train.Trainer` completes it (a mismatch only costs the fast
    path of :func:`finished_run`: the trainer then decides)."""
    from saekit.losses import auto_dead_tokens

    cfg = cfg.resolved(d_in)
    if cfg.dead_tokens == 0:
        cfg.dead_tokens = auto_dead_tokens(train_cfg.total_tokens, train_cfg.batch_size)
    return cfg


def finished_run(
    sae_cfgs: SAEConfig | dict[str, Any] | Callable[[list[str]], Any],
    train_cfg: TrainConfig,
    data_cfg: DataConfig | None,
) -> TrainResult | None:
    """The result of a finished run of these configs in ``out_dir``, found without building
    a source (no model is loaded); None when there is none (then train, or resume, it).

    ``sae_cfgs`` as for :func:`train`, or a function of the source's sites returning them.
    """
    from saekit.device import resolve_device
    from saekit.errors import SaekitError
    from saekit.io import checkpoint as ckpt
    from saekit.io import rundir
    from saekit.io.lock import run_lock
    from saekit.io.native import load_sae
    from saekit.train import TrainResult, _dir_name, plan_saes, run_configs

    out = Path(train_cfg.out_dir)
    if not (train_cfg.resume and (out / "checkpoint" / ckpt.STATE_JSON).is_file()):
        return None
    with run_lock(out):
        try:
            meta = ckpt.read_meta(out / "checkpoint", verify=False)
            width = {v["site"]: int(v["sae"]["d_in"]) for v in meta["configs"]["saes"].values()}
            sites = list(width)
            plan = plan_saes(sae_cfgs(sites) if callable(sae_cfgs) else sae_cfgs, sites)
            trained = {n: (s, _as_trained(c, width[s], train_cfg)) for n, (s, c) in plan.items()}
            want = run_configs(train_cfg, data_cfg, trained)
            dflt = run_configs(train_cfg, data_cfg, trained, ckpt.field_defaults)
            dirs = {n: out if len(plan) == 1 else out / _dir_name(n) for n in plan}
            done = meta["step"] >= train_cfg.total_tokens // train_cfg.batch_size
            want = json.loads(json.dumps(want))
            if not done or ckpt.describe_diff(meta["configs"], want, defaults=dflt):
                return None
            if not rundir.is_finished(list(dirs.values()), meta["step"]):
                return None
            dev = resolve_device(train_cfg.device)
            saes = {n: load_sae(d, device=str(dev), train=True) for n, d in dirs.items()}
        except (SaekitError, KeyError, TypeError, ValueError, AttributeError):
            return None  # the trainer reports the precise problem
    res = TrainResult(saes, dirs, out, int(meta["step"]), int(meta["tokens"]))
    return rundir.finished_result(res)


__all__ = [
    "SECTIONS",
    "RunConfig",
    "finished_run",
    "load_run_config",
    "read_run_document",
    "train_run",
]
