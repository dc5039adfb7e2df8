"""SHA-256 digests: a flipped bit or an edited value in any file saekit loads is refused.

The issue's probes (on 9e49562 each loaded silently): one bit flipped in tensor data of
``sae_weights.safetensors`` / ``saekit_state.safetensors`` loaded other weights; a flipped bit
in an ``acts_*.npy`` shard trained on altered data; editing ``"step"`` in ``state.json``
resumed with other weights. Then a bit-flip fuzz over every file of a run, a checkpoint and
a cache: each flip is refused, or loads exactly what was written.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from fault_helpers import flip_bit, tiny_cache, tiny_train
from saekit.errors import IntegrityError, SaekitError
from saekit.io import checkpoint as ckpt
from saekit.io import load_density, load_sae
from saekit.sources.cache import CacheSource


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    tiny_train(out)
    return out


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def data_offsets(path: Path, n: int, seed: int) -> list[int]:
    """``n`` random byte offsets inside the tensor data of a safetensors file."""
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    rng = random.Random(seed)
    return [rng.randrange(start, len(raw)) for _ in range(n)]


@pytest.mark.parametrize("name", ["sae_weights.safetensors", "saekit_state.safetensors"])
def test_flipped_bit_in_final_weights_is_refused(run_dir: Path, tmp_path: Path, name) -> None:
    ref = load_sae(run_dir).state_dict()
    run = copy_run(run_dir, tmp_path)
    f = run / name
    good = f.read_bytes()
    for i, off in enumerate(data_offsets(f, 12, seed=len(name))):
        f.write_bytes(good)
        flip_bit(f, off, bit=i % 8)
        with pytest.raises(IntegrityError, match=name):
            load_sae(run)
    loaded = load_sae(run, verify=False).state_dict()  # the opt-out checks sizes only
    assert any(not torch.equal(loaded[k], ref[k]) for k in ref)


def test_flipped_bit_in_cache_shard_is_refused(tmp_path: Path) -> None:
    cache = tiny_cache(tmp_path / "c")
    shard = cache / "synthetic" / "acts_00001.npy"
    flip_bit(shard, -5, bit=3)
    with pytest.raises(IntegrityError, match="acts_00001.npy"):
        CacheSource(cache)
    with pytest.raises(IntegrityError, match="acts_00001.npy"):
        tiny_train(tmp_path / "r", source=CacheSource(cache))
    CacheSource(cache, verify=False)  # the opt-out for huge caches: sizes only


def test_truncated_shard_is_refused_even_without_verify(tmp_path: Path) -> None:
    cache = tiny_cache(tmp_path / "c")
    shard = cache / "synthetic" / "acts_00000.npy"
    shard.write_bytes(shard.read_bytes() + b"\0" * 64)
    with pytest.raises(IntegrityError, match="acts_00000.npy has"):
        CacheSource(cache, verify=False)


def _edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj, indent=2))


def test_edited_state_json_step_is_refused(tmp_path: Path) -> None:
    tiny_train(tmp_path, stop_after_steps=4)
    sj = tmp_path / "checkpoint" / "state.json"
    _edit_json(sj, lambda m: m.update(step=2, tokens=128))
    with pytest.raises(ckpt.CheckpointError, match="state.json"):
        tiny_train(tmp_path)


def test_edited_cfg_json_is_refused(run_dir: Path, tmp_path: Path) -> None:
    run = copy_run(run_dir, tmp_path)
    _edit_json(run / "cfg.json", lambda c: c["saekit"]["sae"].update(k=7))
    with pytest.raises(IntegrityError, match="cfg.json"):
        load_sae(run)
    assert load_sae(run, verify=False).cfg.k == 7


def test_edited_manifest_is_refused(tmp_path: Path) -> None:
    cache = tiny_cache(tmp_path / "c")
    _edit_json(cache / "manifest.json", lambda m: m["provenance"].update(seed=5))
    with pytest.raises(IntegrityError, match="manifest.json"):
        CacheSource(cache)


# ------------------------------------------------------------------------ fuzz
def _run_load(d: Path) -> dict:
    sae = load_sae(d)
    return {"state": sae.state_dict(), "cfg": sae.cfg, "density": load_density(d)}


def _ckpt_load(d: Path) -> dict:
    meta, files = ckpt.read_checkpoint(d / "checkpoint")
    return {"meta": meta, **files}


def _cache_load(d: Path) -> dict:
    src = CacheSource(d, shuffle=False)
    return {"batch": src.next_batch(src.n).acts}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def fuzz(root: Path, load, flips: int, seed: int) -> dict[str, dict[str, int]]:
    """Flip one random bit of every file under ``root`` ``flips`` times each; every load
    must fail with a SaekitError or return exactly the unflipped result."""
    want = load(root)
    rng = random.Random(seed)
    out: dict[str, dict[str, int]] = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        good = f.read_bytes()
        tally = {"refused": 0, "identical": 0}
        for _ in range(flips):
            flip_bit(f, rng.randrange(len(good)), rng.randrange(8))
            try:
                got = load(root)
            except SaekitError:
                tally["refused"] += 1
            else:
                assert _same(got, want), f"{f.relative_to(root)}: a flipped bit loaded other data"
                tally["identical"] += 1
            f.write_bytes(good)
        out[str(f.relative_to(root))] = tally
    return out


def _fuzz_all(tmp_path: Path, flips: int) -> dict[str, dict[str, int]]:
    tiny_train(tmp_path / "run")
    res = {}
    for kind, root, load in (
        ("run", tmp_path / "run", _run_load),
        ("checkpoint", tmp_path / "run", _ckpt_load),
        ("cache", tiny_cache(tmp_path / "cache"), _cache_load),
    ):
        files = fuzz(root, load, flips, seed=len(kind))
        if kind == "run":
            files = {k: v for k, v in files.items() if not k.startswith("checkpoint/")}
        if kind == "checkpoint":
            files = {k: v for k, v in files.items() if k.startswith("checkpoint/")}
        res.update({f"{kind}:{k}": v for k, v in files.items()})
    return res


def _compressed(tmp_path: Path) -> Path:
    from compress_helpers import BUILDERS
    from saekit.compress import CompressConfig, compress_model, save_compressed

    model = BUILDERS["gpt2"](1)
    compress_model(model, CompressConfig(method="svd", ratio=0.5))
    save_compressed(model, tmp_path / "lowrank")
    return tmp_path / "lowrank"


def _compressed_load(d: Path) -> dict:
    from saekit.compress import load_compressed

    return {"state": load_compressed(d).state_dict()}


def test_flipped_bit_in_compressed_model_is_refused(tmp_path: Path) -> None:
    """9e49562 (and main before this) loaded a compressed model with a flipped weight bit."""
    from saekit.compress import load_compressed

    d = _compressed(tmp_path)
    want = load_compressed(d).state_dict()
    f = d / "model.saekit-lowrank.safetensors"
    flip_bit(f, data_offsets(f, 1, seed=3)[0], bit=5)
    with pytest.raises(IntegrityError, match="model.saekit-lowrank.safetensors"):
        load_compressed(d)
    got = load_compressed(d, verify=False).state_dict()  # the opt-out checks sizes only
    assert any(not torch.equal(got[k], want[k]) for k in want)


def test_bit_flip_fuzz_compressed_model(tmp_path: Path) -> None:
    res = fuzz(_compressed(tmp_path), _compressed_load, flips=3, seed=7)
    assert {"compression.json", "config.json", "model.saekit-lowrank.safetensors"} <= set(res)
    assert res["model.saekit-lowrank.safetensors"]["refused"] == 3, res


def test_bit_flip_fuzz_every_loaded_file(tmp_path: Path) -> None:
    res = _fuzz_all(tmp_path, flips=4)
    names = {k.split(":", 1)[1] for k in res}
    assert {"cfg.json", "sae_weights.safetensors", "saekit_state.safetensors"} <= names
    assert {"checkpoint/state.json", "checkpoint/misc.safetensors", "manifest.json"} <= names
    assert "synthetic/acts_00000.npy" in names
    for name in ("sae_weights.safetensors", "checkpoint/sae-0.safetensors"):
        key = next(k for k in res if k.endswith(":" + name))
        assert res[key]["refused"] == 4, res[key]


@pytest.mark.slow
def test_bit_flip_fuzz_many(tmp_path: Path) -> None:
    res = _fuzz_all(tmp_path, flips=100)
    print("\nfuzz:", json.dumps(res))
