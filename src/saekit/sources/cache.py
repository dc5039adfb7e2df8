"""On-disk activation cache: sharded ``.npy`` files plus ``manifest.json``.

Layout of a cache directory::

    manifest.json                  format, sites, d_in, n_tokens, shards, dtype, provenance
    <site>/acts_00000.npy          [n_shard, d_in] activations of one site (float32/float16)
    <site>/grads_00000.npy         dL/dx for the same tokens (only if the source had grads)
    token_ids_00000.npy            [n_shard] token ids (only if the source gave them)

:func:`write_cache` writes everything into a temporary sibling directory and renames it
into place at the end, so a cache directory is either complete or absent.
:class:`CacheSource` reads the shards memory-mapped. Each epoch it shuffles the shard
order (seeded by ``(seed, epoch)``), groups consecutive shards into windows of
``window_shards`` shards and reads each window's tokens in a seeded random order, so one
batch touches at most a couple of windows (page-cache friendly) while tokens from
different shards still mix. Its state is the token position, so resume is exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saekit.config import DataConfig
from saekit.errors import ConfigError, FormatError, MissingFileError, OutputExistsError
from saekit.io.paths import check_writable_dir, path_error, user_path
from saekit.sources.base import ActivationSource, Batch

FORMAT = "saekit-activation-cache"
VERSION = 1
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def _site_dirs(sites: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for s in sites:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", s) or "site"
        name, i = base, 1
        while name in out.values():
            name, i = f"{base}_{i}", i + 1
        out[s] = name
    return out


def _provenance(source: ActivationSource) -> dict[str, Any]:
    info: dict[str, Any] = {"source": type(source).__name__}
    cfg = getattr(source, "cfg", None)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        info["config"] = dataclasses.asdict(cfg)
    for attr in ("seed", "stream_seed", "part"):
        if hasattr(source, attr):
            info[attr] = getattr(source, attr)
    return info


def write_cache(
    source: ActivationSource | DataConfig,
    out_dir: str | Path,
    n_tokens: int,
    shard_tokens: int = 65536,
    dtype: str = "float32",
    batch_size: int = 4096,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> Path:
    """Write ``n_tokens`` tokens of every site of ``source`` to ``out_dir``; returns it.

    ``source`` may be a :class:`DataConfig`: the source is then ``build_source(source,
    seed)`` (closed at the end) and the config is recorded in the provenance.
    """
    if isinstance(source, DataConfig):
        from saekit.sources import build_source

        data_cfg = source
        built = build_source(data_cfg, seed)
        try:
            extra = {"data_config": dataclasses.asdict(data_cfg), **(provenance or {})}
            return write_cache(
                built, out_dir, n_tokens, shard_tokens, dtype, batch_size, extra, overwrite
            )
        finally:
            built.close()
    if dtype not in _NP_DTYPES:
        raise ConfigError(f"cache dtype must be one of {', '.join(_NP_DTYPES)}, got {dtype!r}")
    if n_tokens < 1 or shard_tokens < 1 or batch_size < 1:
        raise ConfigError("n_tokens, shard_tokens and batch_size must be positive")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"cache directory {out} exists (pass overwrite=True to replace it)")
    check_writable_dir(out.parent, "cache parent directory")
    with user_path(out.parent, "write into"):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    np_dtype = _NP_DTYPES[dtype]
    sites = list(source.sites)
    dirs = _site_dirs(sites)
    for d in dirs.values():
        (tmp / d).mkdir()
    shards: list[int] = []
    has_grads: bool | None = None
    has_tokens: bool | None = None
    try:
        written = 0
        while written < n_tokens:
            n_shard = min(shard_tokens, n_tokens - written)
            parts: dict[str, list[np.ndarray]] = {s: [] for s in sites}
            gparts: dict[str, list[np.ndarray]] = {s: [] for s in sites}
            tparts: list[np.ndarray] = []
            got = 0
            while got < n_shard:
                b = source.next_batch(min(batch_size, n_shard - got))
                if has_grads is None:
                    has_grads = all(s in b.grads for s in sites)
                    has_tokens = "token_ids" in b.meta
                for s in sites:
                    parts[s].append(b.acts[s].detach().cpu().float().numpy().astype(np_dtype))
                    if has_grads:
                        g = b.grads[s].detach().cpu().float().numpy()
                        gparts[s].append(g.astype(np_dtype))
                if has_tokens:
                    tparts.append(np.asarray(b.meta["token_ids"].cpu(), dtype=np.int64))
                got += next(iter(b.acts.values())).shape[0]
            i = len(shards)
            for s in sites:
                np.save(tmp / dirs[s] / f"acts_{i:05d}.npy", np.concatenate(parts[s]))
                if has_grads:
                    np.save(tmp / dirs[s] / f"grads_{i:05d}.npy", np.concatenate(gparts[s]))
            if has_tokens:
                np.save(tmp / f"token_ids_{i:05d}.npy", np.concatenate(tparts))
            shards.append(n_shard)
            written += n_shard
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "sites": {s: {"dir": dirs[s], "d_in": int(source.d_in(s))} for s in sites},
            "n_tokens": n_tokens,
            "shards": shards,
            "dtype": dtype,
            "has_grads": bool(has_grads),
            "has_token_ids": bool(has_tokens),
            "provenance": {**_provenance(source), **(provenance or {})},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = path_error(e, out, only_env=True) if isinstance(e, OSError) else None
        if err is not None and err is not e:
            raise err from e
        raise
    return out


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The validated manifest of a cache directory."""
    path = Path(cache_dir) / "manifest.json"
    if not path.is_file():
        raise MissingFileError(f"no activation cache manifest at {path}")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"corrupt cache manifest {path}: {e}") from e
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise FormatError(f"{path} is not a saekit activation cache manifest")
    for key in ("sites", "n_tokens", "shards", "dtype"):
        if key not in man:
            raise FormatError(f"corrupt cache manifest {path}: missing {key!r}")
    if sum(man["shards"]) != man["n_tokens"]:
        raise FormatError(f"corrupt cache manifest {path}: shard sizes do not add up to n_tokens")
    return man


class CacheSource(ActivationSource):
    """Reads a cache written by :func:`write_cache` (see the module doc).

    ``sites``: a subset to read (None: all). ``epochs=0`` cycles forever, else
    StopIteration after that many passes. ``shuffle=False`` reads in written order.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        seed: int = 0,
        sites: list[str] | None = None,
        shuffle: bool = True,
        window_shards: int = 4,
        epochs: int = 0,
    ) -> None:
        self.dir = Path(cache_dir)
        self.manifest = man = read_manifest(self.dir)
        available = list(man["sites"])
        if sites is None:
            sites = available
        missing = [s for s in sites if s not in man["sites"]]
        if missing:
            raise ConfigError(
                f"site(s) {', '.join(missing)} not in the cache {self.dir}; it has "
                f"{', '.join(available)}"
            )
        if window_shards < 1:
            raise ConfigError(f"window_shards must be >= 1, got {window_shards}")
        self.sites = list(sites)
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.window_shards = window_shards
        self.n = int(man["n_tokens"])
        self.shard_sizes = [int(x) for x in man["shards"]]
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(np.int64)
        self.acts = {s: self._open(s, "acts") for s in self.sites}
        self.grads = {s: self._open(s, "grads") for s in self.sites} if man.get("has_grads") else {}
        self.tokens = self._open(None, "token_ids") if man.get("has_token_ids") else None
        self.pos = 0
        self._window: tuple[int, int, np.ndarray] | None = None

    def _open(self, site: str | None, kind: str) -> list[np.ndarray]:
        arrays = []
        want_dtype = np.int64 if kind == "token_ids" else _NP_DTYPES[self.manifest["dtype"]]
        d = None if site is None else int(self.manifest["sites"][site]["d_in"])
        folder = self.dir if site is None else self.dir / self.manifest["sites"][site]["dir"]
        for i, n in enumerate(self.shard_sizes):
            path = folder / f"{kind}_{i:05d}.npy"
            if not path.is_file():
                raise MissingFileError(f"activation cache shard missing: {path}")
            try:
                arr = np.load(path, mmap_mode="r")
            except (ValueError, EOFError, OSError, pickle.UnpicklingError) as e:
                raise FormatError(f"corrupt activation cache shard {path}: {e}") from e
            want = (n,) if d is None else (n, d)
            if arr.shape != want:
                raise FormatError(
                    f"activation cache shard {path} has shape {arr.shape}, the manifest says "
                    f"{want} (width mismatch or truncated shard)"
                )
            if arr.dtype != want_dtype:
                raise FormatError(f"activation cache shard {path} has dtype {arr.dtype}")
            arrays.append(arr)
        return arrays

    def d_in(self, site: str) -> int:
        if site not in self.manifest["sites"]:
            raise ConfigError(f"unknown site {site!r}: the cache has {', '.join(self.sites)}")
        return int(self.manifest["sites"][site]["d_in"])

    # -------------------------------------------------------------- order
    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *keys])

    def _epoch_windows(self, epoch: int) -> list[list[int]]:
        k = len(self.shard_sizes)
        order = self._rng(epoch).permutation(k) if self.shuffle else np.arange(k)
        w = self.window_shards
        return [order[i : i + w].tolist() for i in range(0, k, w)]

    def _window_rows(self, epoch: int, widx: int, shards: list[int]) -> np.ndarray:
        rows = np.concatenate(
            [self.shard_starts[s] + np.arange(self.shard_sizes[s]) for s in shards]
        )
        if self.shuffle:
            rows = rows[self._rng(epoch, widx + 1).permutation(rows.shape[0])]
        return rows

    def _rows(self, count: int) -> np.ndarray:
        """Global row ids of the next ``count`` tokens; advances ``pos``."""
        out = []
        while count > 0:
            epoch, off = divmod(self.pos, self.n)
            if self.epochs and epoch >= self.epochs:
                raise StopIteration
            windows = self._epoch_windows(epoch)
            start, widx = 0, 0
            while True:
                shards = windows[widx]
                size = sum(self.shard_sizes[s] for s in shards)
                if off < start + size:
                    break
                start += size
                widx += 1
            key = epoch * len(windows) + widx
            if self._window is None or self._window[0] != key:
                self._window = (key, start, self._window_rows(epoch, widx, shards))
            rows = self._window[2]
            take = min(count, start + size - off)
            out.append(rows[off - start : off - start + take])
            self.pos += take
            count -= take
        return np.concatenate(out)

    def _gather(self, arrays: list[np.ndarray], rows: np.ndarray) -> Tensor:
        shard = np.searchsorted(self.shard_starts, rows, side="right") - 1
        first = arrays[0]
        out = np.empty((rows.shape[0], *first.shape[1:]), dtype=first.dtype)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            local = rows[sel] - self.shard_starts[s]
            order = np.argsort(local, kind="stable")
            out[sel[order]] = arrays[s][local[order]]
        t = torch.from_numpy(out)
        return t.float() if t.is_floating_point() else t

    def next_batch(self, batch_size: int) -> Batch:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        pos0 = self.pos
        try:
            rows = self._rows(batch_size)
        except StopIteration:
            self.pos = pos0
            raise
        acts = {s: self._gather(self.acts[s], rows) for s in self.sites}
        grads = {s: self._gather(self.grads[s], rows) for s in self.grads}
        meta: dict[str, Any] = {}
        if self.tokens is not None:
            meta["token_ids"] = self._gather(self.tokens, rows)
        return Batch(acts=acts, grads=grads, meta=meta)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "cache", "pos": self.pos, "seed": self.seed, "n_tokens": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "cache":
            raise ConfigError(f"not a CacheSource state (kind={state.get('kind')!r})")
        if int(state["seed"]) != self.seed or int(state["n_tokens"]) != self.n:
            raise ConfigError("CacheSource state was saved with another seed or cache size")
        self.pos = int(state["pos"])
