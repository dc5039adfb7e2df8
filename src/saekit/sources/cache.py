"""On-disk activation cache: sharded ``.npy`` files plus ``manifest.json``.

Layout of a cache directory::

    manifest.json                  format, sites, d_in, n_tokens, shards, dtype, provenance
    <site>/acts_00000.npy          [n_shard, d_in] activations of one site (float32/float16)
    <site>/grads_00000.npy         named input "grad" (dL/dx) for the same tokens, if the
                                   source gave it; other named inputs (of the site's width)
                                   as <site>/input_<name>_00000.npy (manifest "inputs")
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
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saekit.config import DataConfig
from saekit.errors import (
    ConfigError,
    DataError,
    FormatError,
    IntegrityError,
    MissingFileError,
    OutputExistsError,
)
from saekit.io.atomic import json_safe, write_json
from saekit.io.integrity import check_seal, file_records, seal, verify_file
from saekit.io.lock import pid_alive, sibling_lock
from saekit.io.paths import check_writable_dir, path_error, user_path
from saekit.options import Options, option
from saekit.sources.base import ActivationSource, Batch


def input_file_stem(name: str) -> str:
    """File stem of named input ``name`` in a site folder (``grads`` for ``grad``)."""
    return "grads" if name == "grad" else f"input_{name}"


def manifest_inputs(man: dict) -> dict[str, str]:
    """``name -> file stem`` of the named inputs a manifest records (older caches:
    ``has_grads``)."""
    if isinstance(man.get("inputs"), dict):
        return {str(n): str(stem) for n, stem in man["inputs"].items()}
    return {"grad": "grads"} if man.get("has_grads") else {}


FORMAT = "saekit-activation-cache"
MANIFEST = "manifest.json"
SEAL = ("manifest_sha256",)
VERSION = 1
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class CacheConfig(Options):
    """What ``saekit cache`` writes: where, how many tokens, in which shards and dtype
    (:func:`write_cache`'s keyword options)."""

    out_dir: str = option(help="cache directory to write", flag="out", nonempty=True)
    n_tokens: int = option(1_000_000, "tokens to cache", ge=1, flag="tokens")
    shard_tokens: int = option(65536, "tokens per shard file", ge=1)
    dtype: str = option("float32", "stored dtype", choices=tuple(_NP_DTYPES), flag="cache-dtype")
    batch_size: int = option(4096, "tokens per source batch while writing", ge=1)
    overwrite: bool = option(False, "replace an existing cache", switch=True)
    seed: int = option(0, "data order seed", ge=0)
    format: str = option(
        "saekit",
        "saekit (sharded .npy + manifest) or saelens (the Arrow dataset of SAELens's"
        " CacheActivationsRunner, rows of context_size tokens)",
        choices=("saekit", "saelens"),
    )
    context_size: int = option(
        0, "format saelens: tokens per row (0: the data's context_len, else 128)", ge=0
    )


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
    format: str = "saekit",
    context_size: int = 0,
) -> Path:
    """Write ``n_tokens`` tokens of every site of ``source`` to ``out_dir``; returns it.

    ``source`` may be a :class:`DataConfig`: the source is then ``build_source(source,
    seed)`` (closed at the end) and the config is recorded in the provenance.
    ``format="saelens"`` writes SAELens's layout instead
    (:func:`saekit.sources.saelens_cache.write_saelens_cache`).
    """
    if format == "saelens":
        from saekit.sources.saelens_cache import write_saelens_cache

        return write_saelens_cache(
            source, out_dir, n_tokens, context_size, dtype, batch_size, overwrite, seed=seed
        )
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
    CacheConfig(  # the options are validated by their declarations
        out_dir=str(out_dir),
        n_tokens=n_tokens,
        shard_tokens=shard_tokens,
        dtype=dtype,
        batch_size=batch_size,
        overwrite=overwrite,
        seed=seed,
    )
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"cache directory {out} exists (pass overwrite=True to replace it)")
    check_writable_dir(out.parent, "cache parent directory")
    with sibling_lock(out, "activation cache"):
        if out.exists() and not overwrite:  # written meanwhile by the lock's previous holder
            raise OutputExistsError(f"cache directory {out} exists (pass overwrite=True)")
        for stale in stale_writes(out):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = _tmp(out)
        with user_path(out.parent, "write into"):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _write_shards(source, out, tmp, n_tokens, shard_tokens, dtype, batch_size, provenance)
    return out


def _write_shards(
    source: ActivationSource,
    out: Path,
    tmp: Path,
    n_tokens: int,
    shard_tokens: int,
    dtype: str,
    batch_size: int,
    provenance: dict[str, Any] | None,
) -> None:
    np_dtype = _NP_DTYPES[dtype]
    sites = list(source.sites)
    dirs = _site_dirs(sites)
    shards: list[int] = []
    names: list[str] = []
    inputs: list[str] | None = None  # named inputs every site has in the first batch
    has_tokens: bool | None = None
    source.plan_tokens(n_tokens)  # e.g. the HF source's buffer holds no more than this
    try:
        for d in dirs.values():
            (tmp / d).mkdir()
        written = 0
        while written < n_tokens:
            n_shard = min(shard_tokens, n_tokens - written)
            parts: dict[str, list[np.ndarray]] = {s: [] for s in sites}
            gparts: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
            tparts: list[np.ndarray] = []
            got = 0
            while got < n_shard:
                b = source.next_batch(min(batch_size, n_shard - got))
                if inputs is None:
                    inputs = sorted(n for n, d in b.inputs.items() if all(s in d for s in sites))
                    has_tokens = "token_ids" in b.meta
                for s in sites:
                    parts[s].append(b.acts[s].detach().cpu().float().numpy().astype(np_dtype))
                    for n in inputs:
                        g = b.inputs[n][s].detach().cpu().float().numpy()
                        gparts[(s, n)].append(g.astype(np_dtype))
                if has_tokens:
                    tparts.append(np.asarray(b.meta["token_ids"].cpu(), dtype=np.int64))
                rows = next(iter(b.acts.values())).shape[0]
                if rows < 1:  # never loop without progress
                    raise DataError(f"{type(source).__name__} returned an empty batch")
                got += rows
            i = len(shards)
            arrays = {}
            for s in sites:
                arrays[f"{dirs[s]}/acts_{i:05d}.npy"] = np.concatenate(parts[s])
                for n in inputs or []:
                    stem = input_file_stem(n)
                    arrays[f"{dirs[s]}/{stem}_{i:05d}.npy"] = np.concatenate(gparts[(s, n)])
            if has_tokens:
                arrays[f"token_ids_{i:05d}.npy"] = np.concatenate(tparts)
            for name, arr in arrays.items():
                np.save(tmp / name, arr)
            names += arrays
            shards.append(n_shard)
            written += n_shard
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "sites": {s: {"dir": dirs[s], "d_in": int(source.d_in(s))} for s in sites},
            "n_tokens": n_tokens,
            "shards": shards,
            "dtype": dtype,
            "inputs": {n: input_file_stem(n) for n in inputs or []},
            "has_token_ids": bool(has_tokens),
            "provenance": {**_provenance(source), **(provenance or {})},
            "files": file_records(tmp, names),
        }
        manifest = json_safe(manifest)
        write_json(tmp / MANIFEST, seal(manifest, SEAL))
        old = out.parent / f".{out.name}.old"
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = path_error(e, out, only_env=True) if isinstance(e, OSError) else None
        if err is not None and err is not e:
            raise err from e
        raise


def read_manifest(cache_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """The validated manifest of a cache directory (its seal checked unless ``verify`` is off)."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise MissingFileError(f"no activation cache manifest at {path}")
    try:
        man = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"corrupt cache manifest {path}: {e}; re-create the cache") from e
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise FormatError(f"{path} is not a saekit activation cache manifest")
    if verify:
        check_seal(man, path, SEAL)
    for key in ("sites", "n_tokens", "shards", "dtype"):
        if key not in man:
            raise FormatError(f"corrupt cache manifest {path}: missing {key!r}")
    if man["dtype"] not in _NP_DTYPES:
        raise FormatError(
            f"cache manifest {path}: dtype {man['dtype']!r} is not one of"
            f" {', '.join(_NP_DTYPES)}; re-create the cache"
        )
    shards = man["shards"]
    if not isinstance(shards, list) or not all(type(n) is int and n > 0 for n in shards):
        raise FormatError(f"corrupt cache manifest {path}: 'shards' must list positive sizes")
    if type(man["n_tokens"]) is not int or man["n_tokens"] < 1 or sum(shards) != man["n_tokens"]:
        raise FormatError(f"corrupt cache manifest {path}: shard sizes do not add up to n_tokens")
    sites = man["sites"]
    ok = (
        isinstance(sites, dict)
        and sites
        and all(
            isinstance(v, dict) and isinstance(v.get("dir"), str) and type(v.get("d_in")) is int
            for v in sites.values()
        )
    )
    if not ok:
        raise FormatError(f"corrupt cache manifest {path}: 'sites' must map sites to dir, d_in")
    return man


def stale_writes(out: str | Path) -> list[Path]:
    """The temporary directories of interrupted :func:`write_cache` calls whose process is gone."""
    out = Path(out)
    prefix = f".{out.name}.tmp-"
    found = []
    for p in sorted(out.parent.glob(f"{prefix}*")):
        tail = p.name[len(prefix) :]
        pid = int(tail) if tail.isdigit() else 0
        if p.is_dir() and pid != os.getpid() and not pid_alive(pid):
            found.append(p)
    return found


def _tmp(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


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
        verify: bool = True,
    ) -> None:
        self.dir = Path(cache_dir)
        self.verify = verify
        self.manifest = man = self._read_manifest()
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
        self.inputs = {
            n: {s: self._open(s, stem) for s in self.sites}
            for n, stem in manifest_inputs(man).items()
        }
        self.tokens = self._open(None, "token_ids") if man.get("has_token_ids") else None
        self.pos = 0
        self._window: tuple[int, int, np.ndarray] | None = None

    def _read_manifest(self) -> dict[str, Any]:
        return read_manifest(self.dir, self.verify)

    @staticmethod
    def cached_sites(cache_dir: str | Path) -> list[str]:
        return list(read_manifest(cache_dir, verify=False)["sites"])

    def _open(self, site: str | None, kind: str) -> list[np.ndarray]:
        arrays = []
        want_dtype = np.int64 if kind == "token_ids" else _NP_DTYPES[self.manifest["dtype"]]
        d = None if site is None else int(self.manifest["sites"][site]["d_in"])
        folder = self.dir if site is None else self.dir / self.manifest["sites"][site]["dir"]
        records = self.manifest.get("files")
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
            if isinstance(records, dict):
                rel = path.relative_to(self.dir).as_posix()
                if rel not in records:
                    raise IntegrityError(f"{path} has no checksum in {self.dir / MANIFEST}")
                verify_file(path, records[rel], self.verify)
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
        return self.next_batch_part(batch_size, 0, batch_size)

    def next_batch_part(self, batch_size: int, lo: int, hi: int) -> Batch:
        """Rows ``[lo, hi)`` of the next batch: only those rows are read from disk."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        pos0 = self.pos
        try:
            rows = self._rows(batch_size)[lo:hi]
        except StopIteration:
            self.pos = pos0
            raise
        acts = {s: self._gather(self.acts[s], rows) for s in self.sites}
        inputs = {
            n: {s: self._gather(a, rows) for s, a in d.items()} for n, d in self.inputs.items()
        }
        meta: dict[str, Any] = {}
        if self.tokens is not None:
            meta["token_ids"] = self._gather(self.tokens, rows)
        return Batch(acts=acts, inputs=inputs, meta=meta)

    def request_inputs(self, names: Collection[str]) -> set[str]:
        return set(names) & set(self.inputs)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "cache", "pos": self.pos, "seed": self.seed, "n_tokens": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "cache":
            raise ConfigError(f"not a CacheSource state (kind={state.get('kind')!r})")
        if int(state["seed"]) != self.seed or int(state["n_tokens"]) != self.n:
            raise ConfigError("CacheSource state was saved with another seed or cache size")
        self.pos = int(state["pos"])
