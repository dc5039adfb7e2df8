"""Activation sources: HF model hooks, on-disk cache, synthetic ground truth, memory.

:func:`build_source` turns a :class:`~saekit.config.DataConfig` into a source. Heavy
modules (transformers) are imported only when the matching source is built.
"""

from __future__ import annotations

from typing import Any

from saekit.config import DataConfig
from saekit.errors import ConfigError
from saekit.sources.base import ActivationSource, Batch, MemorySource

SOURCES = ("hf", "synthetic", "cache", "saelens_synthetic")

__all__ = ["SOURCES", "ActivationSource", "Batch", "MemorySource", "build_source"]


def build_source(data_cfg: DataConfig, seed: int = 0, **kwargs: Any) -> ActivationSource:
    """The source described by ``data_cfg`` (``data_cfg.source`` in :data:`SOURCES`).

    ``seed`` seeds the data order (HF shuffle buffer, cache read order, synthetic sample
    stream; the synthetic *dictionary* is fixed by ``synthetic["seed"]``). For ``cache``,
    ``data_cfg.sites`` selects cached sites, except that the untouched default site list
    means "all cached sites"; a SAELens ``CacheActivationsRunner`` cache is read too
    (:mod:`saekit.sources.saelens_cache`). ``kwargs`` go to the source class (e.g. a preloaded
    ``model=``/``tokenizer=`` for ``hf``).
    """
    kind = data_cfg.source
    if kind == "hf":
        from saekit.sources.hf import HFSource

        return HFSource(data_cfg, seed=seed, **kwargs)
    if kind == "synthetic":
        from saekit.sources.synthetic import SyntheticConfig, SyntheticSource

        return SyntheticSource(SyntheticConfig.from_dict(dict(data_cfg.synthetic)), seed, **kwargs)
    if kind == "saelens_synthetic":  # SAELens's SynthSAEBench models (needs sae_lens)
        from saekit.sources.saelens_synthetic import SAELensSyntheticSource

        return SAELensSyntheticSource(dict(data_cfg.synthetic), seed, **kwargs)
    if kind == "cache":
        from saekit.sources.cache import CacheSource
        from saekit.sources.saelens_cache import SAELensCacheSource, is_saelens_cache

        if not data_cfg.cache_dir:
            raise ConfigError("source=cache needs DataConfig.cache_dir")
        cls = SAELensCacheSource if is_saelens_cache(data_cfg.cache_dir) else CacheSource
        sites: list[str] | None = list(data_cfg.sites) or None
        if sites == DataConfig().sites and not set(sites) <= set(
            cls.cached_sites(data_cfg.cache_dir)
        ):
            sites = None
        kwargs.setdefault("verify", data_cfg.verify)
        return cls(data_cfg.cache_dir, seed=seed, sites=sites, **kwargs)
    raise ConfigError(f"unknown data source {kind!r}: choose from {', '.join(SOURCES)}")
