"""On-disk activation cache: bit-exact round trip, shuffled epochs, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saekit.config import DataConfig
from saekit.sources import MemorySource, build_source
from saekit.sources.cache import CacheSource, read_manifest, write_cache
from saekit.sources.synthetic import SyntheticConfig, SyntheticSource

SMALL = SyntheticConfig(n_features=64, d=16, n_roots=2, branching=2, depth=2, block_size=512)


def stream(n: int) -> torch.Tensor:
    return SyntheticSource(SMALL).next_batch(n).acts["synthetic"]


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    return write_cache(
        SyntheticSource(SMALL), tmp_path / "c", 2500, shard_tokens=600, batch_size=256
    )


def test_round_trip_is_bit_exact(cache: Path) -> None:
    man = read_manifest(cache)
    assert man["shards"] == [600, 600, 600, 600, 100] and man["n_tokens"] == 2500
    assert man["sites"]["synthetic"]["d_in"] == 16
    assert man["provenance"]["source"] == "SyntheticSource"
    assert man["provenance"]["config"]["n_features"] == 64
    src = CacheSource(cache, shuffle=False)
    got = torch.cat([src.next_batch(700).acts["synthetic"] for _ in range(4)])[:2500]
    assert torch.equal(got, stream(2500))
    assert not list(cache.parent.glob(".c.tmp-*"))


def test_shuffled_epochs_are_permutations_and_differ(cache: Path) -> None:
    want = stream(2500)
    src = CacheSource(cache, seed=3, window_shards=2)
    e1 = src.next_batch(2500).acts["synthetic"]
    e2 = src.next_batch(2500).acts["synthetic"]
    key = lambda x: x[torch.argsort(x[:, 0])]  # noqa: E731
    assert torch.equal(key(e1), key(want)) and torch.equal(key(e2), key(want))
    assert not torch.equal(e1, want) and not torch.equal(e1, e2)


def test_resume_and_epoch_limit(cache: Path) -> None:
    a = CacheSource(cache, seed=1)
    a.next_batch(900)
    state = a.state_dict()
    want = [a.next_batch(800) for _ in range(4)]  # crosses an epoch boundary
    b = CacheSource(cache, seed=1)
    b.load_state_dict(state)
    for w in want:
        assert torch.equal(b.next_batch(800).acts["synthetic"], w.acts["synthetic"])
    with pytest.raises(ValueError, match="another seed"):
        CacheSource(cache, seed=2).load_state_dict(state)
    one = CacheSource(cache, epochs=1)
    assert sum(x.acts["synthetic"].shape[0] for x in one.batches(1000)) == 2000


def test_float16_grads_and_token_ids(tmp_path: Path) -> None:
    acts = {"a": torch.randn(300, 8), "b": torch.randn(300, 4)}
    grads = {"a": torch.randn(300, 8), "b": torch.randn(300, 4)}
    mem = MemorySource(acts, shuffle=False, inputs={"grad": grads})
    out = write_cache(mem, tmp_path / "h", 300, shard_tokens=128, dtype="float16")
    src = CacheSource(out, shuffle=False)
    b = src.next_batch(300)
    for s in ("a", "b"):
        assert b.acts[s].dtype == torch.float32
        torch.testing.assert_close(b.acts[s], acts[s].half().float(), rtol=0, atol=0)
        torch.testing.assert_close(b.inputs["grad"][s], grads[s].half().float(), rtol=0, atol=0)
    sub = CacheSource(out, sites=["b"])
    assert sub.sites == ["b"] and sub.d_in("b") == 4


def test_write_from_data_config(tmp_path: Path) -> None:
    dc = DataConfig(source="synthetic", synthetic={"n_features": 64, "d": 16, "n_roots": 0})
    out = write_cache(dc, tmp_path / "dc", 300, seed=4)
    man = read_manifest(out)
    assert man["provenance"]["data_config"]["source"] == "synthetic"
    assert man["provenance"]["stream_seed"] == 4
    want = build_source(dc, 4).next_batch(300).acts["synthetic"]
    assert torch.equal(CacheSource(out, shuffle=False).next_batch(300).acts["synthetic"], want)


def test_build_source_cache(cache: Path) -> None:
    src = build_source(DataConfig(source="cache", cache_dir=str(cache)), seed=0)
    assert src.sites == ["synthetic"]
    with pytest.raises(ValueError, match="not in the cache"):
        build_source(
            DataConfig(source="cache", cache_dir=str(cache), sites=["layers.1.mlp_out"]), 0
        )
    with pytest.raises(ValueError, match="cache_dir"):
        build_source(DataConfig(source="cache"), 0)


def test_clear_errors(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest"):
        CacheSource(tmp_path / "nothing")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_cache(SyntheticSource(SMALL), cache, 10)
    man = cache / "manifest.json"
    good = man.read_text()
    man.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        CacheSource(cache)
    bad = json.loads(good)
    bad["sites"]["synthetic"]["d_in"] = 17
    man.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="manifest.json does not match its recorded SHA-256"):
        CacheSource(cache)
    with pytest.raises(ValueError, match="width mismatch"):
        CacheSource(cache, verify=False)
    man.write_text(good)
    np.save(cache / "synthetic" / "acts_00001.npy", np.zeros((600, 15), np.float32))
    with pytest.raises(ValueError, match="width mismatch"):
        CacheSource(cache)
    (cache / "synthetic" / "acts_00001.npy").unlink()
    with pytest.raises(FileNotFoundError, match="acts_00001"):
        CacheSource(cache)
    with pytest.raises(ValueError, match="dtype"):
        write_cache(SyntheticSource(SMALL), tmp_path / "x", 10, dtype="int8")
