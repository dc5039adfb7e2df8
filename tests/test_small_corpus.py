"""Tiny corpora never hang: every source either cycles (with a note) or stops clearly.

On 9e49562 the README's own example (10 tokens from a two-line JSONL) refilled a 65,536-token
shuffle buffer two tokens at a time (thousands of model forwards, 21+ minutes), and a corpus
of special tokens only looped forever without progress.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saekit.config import DataConfig
from saekit.errors import DataError
from saekit.sources.base import MemorySource
from saekit.sources.cache import CacheSource, write_cache
from saekit.sources.hf import HFSource
from saekit.sources.prefetch import PrefetchSource
from saekit.sources.synthetic import SyntheticConfig, SyntheticSource


@pytest.fixture()
def forwards(monkeypatch) -> dict:
    """Counts HFSource model forwards; more than 40 means a hang (stopped with an error)."""
    n = {"calls": 0}
    real = HFSource._forward

    def counted(self, *a, **k):
        n["calls"] += 1
        if n["calls"] > 40:
            raise AssertionError("the source loops without progress (40+ model forwards)")
        return real(self, *a, **k)

    monkeypatch.setattr(HFSource, "_forward", counted)
    return n


def corpus(tmp_path: Path, *texts: str) -> Path:
    p = tmp_path / "my_corpus.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return p


def test_readme_two_line_corpus_cache(tmp_path: Path, forwards, capsys) -> None:
    data = corpus(tmp_path, "first document", "second document")
    cfg = DataConfig(dataset=str(data), text_field="text", context_len=32)
    out = write_cache(cfg, tmp_path / "cache" / "mine", 10)
    src = CacheSource(out, shuffle=False)
    assert src.n == 10
    assert forwards["calls"] <= 3
    err = capsys.readouterr().err
    assert "my_corpus.jsonl" in err and "fewer than the shuffle buffer" in err


def test_tiny_corpus_resume_is_exact(tmp_path: Path, forwards) -> None:
    data = corpus(tmp_path, "alpha beta gamma", "delta epsilon")
    cfg = DataConfig(dataset=str(data), model_batch_size=2)
    a = HFSource(cfg, seed=1)
    a.next_batch(7)
    state = a.state_dict()
    want = [a.next_batch(5).acts["layers.3.resid_post"] for _ in range(3)]
    b = HFSource(cfg, seed=1)
    b.load_state_dict(state)
    for w in want:
        assert torch.equal(b.next_batch(5).acts["layers.3.resid_post"], w)


def test_corpus_of_special_tokens_only_stops(tmp_path: Path, forwards) -> None:
    data = corpus(tmp_path, "[SEP]", "[CLS] [SEP]")
    with pytest.raises(DataError, match="no tokens left after dropping special tokens"):
        HFSource(DataConfig(dataset=str(data))).next_batch(8)


def test_empty_corpus_stops(tmp_path: Path, forwards) -> None:
    data = corpus(tmp_path, " ", "")
    with pytest.raises(DataError, match="empty"):
        HFSource(DataConfig(dataset=str(data))).next_batch(8)


def test_tiny_cache_cycles(tmp_path: Path) -> None:
    c = write_cache(
        SyntheticSource(SyntheticConfig(d=8, n_features=16, n_roots=0)), tmp_path / "c", 3
    )
    src = CacheSource(c, shuffle=False)
    x = src.next_batch(8).acts["synthetic"]
    assert x.shape == (8, 8) and torch.equal(x[:3], x[3:6])
    with pytest.raises(StopIteration):
        CacheSource(c, epochs=1).next_batch(8)


def test_tiny_memory_source(tmp_path: Path) -> None:
    src = MemorySource({"x": torch.arange(6.0).view(3, 2)}, shuffle=False)
    assert src.next_batch(7).acts["x"].shape == (7, 2)
    with pytest.raises(DataError, match="no tokens"):
        MemorySource({"x": torch.zeros(0, 2)})


def test_tiny_synthetic_and_prefetch() -> None:
    src = SyntheticSource(SyntheticConfig(d=4, n_features=8, n_roots=0, block_size=1))
    assert src.next_batch(1).acts["synthetic"].shape == (1, 4)
    pre = PrefetchSource(MemorySource({"x": torch.ones(2, 3)}), batch_size=5)
    try:
        assert pre.next_batch(5).acts["x"].shape == (5, 3)
    finally:
        pre.close()


def test_train_on_a_tiny_corpus(tmp_path: Path, forwards) -> None:
    from saekit import SAEConfig, TrainConfig
    from saekit.train import train

    data = corpus(tmp_path, "one two three", "four five")
    src = HFSource(DataConfig(dataset=str(data), model_batch_size=2))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), total_tokens=64, batch_size=16)
    res = train(SAEConfig(d_sae=64, k=4), cfg, src)
    assert res.completed and res.steps == 4


def test_tiny_datasets_builder_corpus(tmp_path: Path, forwards) -> None:
    """A two-row parquet file through the ``datasets`` builder path: no hang either."""
    datasets = pytest.importorskip("datasets", reason="datasets is a dev/[datasets] extra")
    datasets.Dataset.from_dict({"text": ["one two", "three"]}).to_parquet(str(tmp_path / "t.pq"))
    cfg = DataConfig(dataset="parquet", data_files=[str(tmp_path / "t.pq")], model_batch_size=2)
    assert HFSource(cfg).next_batch(20).acts["layers.3.resid_post"].shape[0] == 20


def test_tiny_saelens_cache_cycles(tmp_path: Path) -> None:
    """A SAELens Arrow cache of one 2-token row cycles its epochs like a saekit cache."""
    datasets = pytest.importorskip("datasets", reason="datasets is a dev/[datasets] extra")
    from saekit.sources.saelens_cache import SAELensCacheSource

    feats = datasets.Features({"blocks.0.hook_resid_post": datasets.Array2D((2, 3), "float32")})
    acts = torch.arange(6.0).view(1, 2, 3).numpy()
    ds = datasets.Dataset.from_dict({"blocks.0.hook_resid_post": acts}, features=feats)
    ds.save_to_disk(str(tmp_path / "c"))
    src = SAELensCacheSource(tmp_path / "c", shuffle=False)
    x = src.next_batch(7).acts["layers.0.resid_post"]
    assert x.shape == (7, 3) and torch.equal(x[:2], x[2:4])
    with pytest.raises(StopIteration):
        SAELensCacheSource(tmp_path / "c", epochs=1).next_batch(3)
