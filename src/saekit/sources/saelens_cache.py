"""Activation caches in the layout SAELens's ``CacheActivationsRunner`` writes.

A SAELens cache is an HF dataset saved with ``save_to_disk`` (``dataset_info.json``,
``state.json``, ``data-*.arrow``): one row per sequence, a column per hook named by its
TransformerLens hook name (``blocks.3.hook_resid_post``) holding ``Array2D(context_size,
d_in)`` and optionally ``token_ids`` (``Sequence(int32, context_size)``). SAELens's
``ActivationsStore`` reads it with ``datasets.load_from_disk`` and checks the column's
``(context_size, d_in)`` shape.

:class:`SAELensCacheSource` reads one as a :class:`~saekit.sources.cache.CacheSource`
(memory-mapped Arrow record batches as shards, the same seeded shuffling and exact
resume); sites are the hook names translated to saekit's (``layers.3.resid_post``).
``source=cache`` picks it for such a directory. :func:`write_saelens_cache` writes one from
any saekit source, so SAELens can train on saekit's activations; each row is
``context_size`` consecutive tokens of the source's stream [our choice: with a shuffling
source these are not contiguous text, which SAELens's cached training does not need].
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saekit.config import DataConfig
from saekit.errors import ConfigError, FormatError, OutputExistsError
from saekit.sources.base import ActivationSource
from saekit.sources.cache import CacheSource
from saekit.sources.hf_datasets import is_saved_dataset
from saekit.sources.sites import canonical_site, transformer_lens_name

FORMAT = "saelens-activation-cache"
_DTYPES = {"float32": np.float32, "float16": np.float16}


def is_saelens_cache(path: str | Path) -> bool:
    """A ``save_to_disk`` dataset directory without saekit's ``manifest.json``."""
    p = Path(path)
    return p.is_dir() and not (p / "manifest.json").is_file() and is_saved_dataset(p)


def _hook_name(site: str) -> str:
    try:
        return transformer_lens_name(site)
    except ValueError:
        return site


class SAELensCacheSource(CacheSource):
    """A SAELens activation cache read as a saekit cache (see the module doc)."""

    def _read_manifest(self) -> dict[str, Any]:
        from saekit.sources.hf_datasets import _datasets

        ds = _datasets().load_from_disk(str(self.dir))
        if not hasattr(ds, "features"):
            raise FormatError(f"{self.dir}: a DatasetDict; a SAELens cache is one Dataset")
        hooks = [c for c in ds.column_names if c != "token_ids"]
        if not hooks:
            raise FormatError(f"{self.dir}: no activation columns (columns {ds.column_names})")
        sites: dict[str, Any] = {}
        dtype = None
        for hook in hooks:
            feat = ds.features[hook]
            shape = getattr(feat, "shape", None)
            if shape is None or len(shape) != 2:
                raise FormatError(f"{self.dir}: column {hook!r} is not Array2D(context, d_in)")
            if str(feat.dtype) not in _DTYPES or dtype not in (None, str(feat.dtype)):
                raise FormatError(f"{self.dir}: column {hook!r} has dtype {feat.dtype}")
            dtype = str(feat.dtype)
            sites[canonical_site(hook)] = {"d_in": int(shape[1]), "hook_name": hook}
        context = int(ds.features[hooks[0]].shape[0])
        batches = ds.data.table.to_batches()
        self._arrays: dict[str, list[np.ndarray]] = {s: [] for s in sites}
        self._arrays["token_ids"] = []
        shards = []
        for b in batches:
            if b.num_rows == 0:
                continue
            shards.append(b.num_rows * context)
            for site, info in sites.items():
                col = b.column(b.schema.get_field_index(info["hook_name"]))
                flat = getattr(col, "storage", col).flatten().flatten()
                self._arrays[site].append(
                    flat.to_numpy(zero_copy_only=False).reshape(-1, info["d_in"])
                )
            if "token_ids" in ds.column_names:
                col = b.column(b.schema.get_field_index("token_ids"))
                self._arrays["token_ids"].append(col.flatten().to_numpy().astype(np.int64))
        if not shards:
            raise FormatError(f"{self.dir}: the SAELens cache has no rows")
        return {
            "format": FORMAT,
            "sites": sites,
            "n_tokens": int(sum(shards)),
            "shards": shards,
            "dtype": dtype,
            "context_size": context,
            "has_grads": False,
            "has_token_ids": "token_ids" in ds.column_names,
        }

    def _open(self, site: str | None, kind: str) -> list[np.ndarray]:
        return self._arrays["token_ids" if site is None else site]

    @staticmethod
    def cached_sites(cache_dir: str | Path) -> list[str]:
        from saekit.sources.hf_datasets import _datasets

        ds = _datasets().load_from_disk(str(cache_dir))
        return [canonical_site(c) for c in ds.column_names if c != "token_ids"]


def _batch_rows(b: Any, sites: list[str], context: int) -> Iterator[dict[str, Any]]:
    """Rows of ``context`` consecutive tokens of one batch (its size a multiple of it)."""
    acts = {s: b.acts[s].detach().cpu().float().numpy().reshape(-1, context, b.acts[s].shape[-1])
            for s in sites}  # fmt: skip
    tok = b.meta.get("token_ids")
    tok = None if tok is None else np.asarray(tok.cpu()).reshape(-1, context)
    for i in range(next(iter(acts.values())).shape[0]):
        row: dict[str, Any] = {_hook_name(s): acts[s][i] for s in sites}
        if tok is not None:
            row["token_ids"] = tok[i].astype(np.int32)
        yield row


def write_saelens_cache(
    source: ActivationSource | DataConfig,
    out_dir: str | Path,
    n_tokens: int,
    context_size: int = 0,
    dtype: str = "float32",
    batch_size: int = 4096,
    overwrite: bool = False,
    num_shards: int = 1,
    seed: int = 0,
) -> Path:
    """Write ``n_tokens`` (a multiple of ``context_size``) of ``source`` as a SAELens cache.

    ``source``: a source or a :class:`DataConfig` (built with ``seed``, closed at the end).
    ``context_size`` 0: the data's ``context_len``, else 128.
    """
    from saekit.sources.hf_datasets import _datasets

    if isinstance(source, DataConfig):
        from saekit.sources import build_source

        built = build_source(source, seed)
        try:
            size = context_size or source.context_len
            return write_saelens_cache(
                built, out_dir, n_tokens, size, dtype, batch_size, overwrite, num_shards
            )
        finally:
            built.close()
    if not context_size:
        cfg = getattr(source, "cfg", None)
        context_size = int(getattr(cfg, "context_len", 0) or 128)
    ds_mod = _datasets()
    if dtype not in _DTYPES:
        raise ConfigError(f"SAELens cache dtype must be one of {', '.join(_DTYPES)}")
    if context_size < 1 or n_tokens < context_size or n_tokens % context_size:
        raise ConfigError(
            f"tokens={n_tokens} must be a positive multiple of context_size={context_size}"
            " (SAELens caches hold whole rows)"
        )
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"cache directory {out} exists (pass overwrite=True to replace)")
    out.parent.mkdir(parents=True, exist_ok=True)
    feats: dict[str, Any] = {
        _hook_name(s): ds_mod.Array2D(shape=(context_size, source.d_in(s)), dtype=dtype)
        for s in source.sites
    }
    source.plan_tokens(n_tokens)  # e.g. the HF source's buffer holds no more than this
    probe = source.next_batch(context_size)
    has_tokens = "token_ids" in probe.meta
    if has_tokens:
        feats["token_ids"] = ds_mod.Sequence(ds_mod.Value("int32"), length=context_size)
    sites = list(source.sites)
    per_batch = max(batch_size // context_size, 1)

    def gen() -> Iterator[dict[str, Any]]:
        yield from _batch_rows(probe, sites, context_size)
        left = n_tokens // context_size - 1
        while left > 0:
            take = min(per_batch, left)
            yield from _batch_rows(source.next_batch(take * context_size), sites, context_size)
            left -= take

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        import uuid

        ds = ds_mod.Dataset.from_generator(  # a fingerprint given: the source is not hashed
            gen,
            features=ds_mod.Features(feats),
            cache_dir=str(tmp / "build"),
            fingerprint=uuid.uuid4().hex,
        )
        ds.save_to_disk(str(tmp / "data"), num_shards=num_shards)
        del ds
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "data", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["SAELensCacheSource", "is_saelens_cache", "write_saelens_cache"]
