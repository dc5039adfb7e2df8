"""Synthetic ground-truth source: reproducibility, statistics, hierarchy, signs, resume."""

from __future__ import annotations

import pytest
import torch

from saekit.config import DataConfig
from saekit.sources import build_source
from saekit.sources.synthetic import SyntheticConfig, SyntheticSource

SMALL = dict(n_features=256, d=32, n_roots=8, branching=3, depth=3, block_size=1024)


def make(**kw: object) -> SyntheticSource:
    return SyntheticSource(SyntheticConfig(**{**SMALL, **kw}))  # type: ignore[arg-type]


def test_reproducible_and_batch_size_invariant() -> None:
    a, b = make(), make()
    assert torch.equal(a.dictionary, b.dictionary)
    x1 = torch.cat([a.next_batch(700).acts["synthetic"], a.next_batch(900).acts["synthetic"]])
    x2 = b.next_batch(1600).acts["synthetic"]
    assert torch.equal(x1, x2)
    c = SyntheticSource(SyntheticConfig(**SMALL), stream_seed=5)  # type: ignore[arg-type]
    assert torch.equal(c.dictionary, a.dictionary)
    assert not torch.equal(c.next_batch(100).acts["synthetic"], x2[:100])


def test_resume_gives_the_same_next_batches() -> None:
    a = make()
    a.next_batch(300)
    state = a.state_dict()
    want = [a.next_batch(500) for _ in range(3)]
    b = make()
    b.load_state_dict(state)
    for w in want:
        g = b.next_batch(500)
        assert torch.equal(g.acts["synthetic"], w.acts["synthetic"])
        assert torch.equal(g.meta["codes"], w.meta["codes"])


def test_statistics_and_structure() -> None:
    src = make(signed_frac=0.25)
    assert torch.allclose(src.dictionary.norm(dim=1), torch.ones(256), atol=1e-5)
    batch = src.next_batch(16384)
    codes, x = batch.meta["codes"], batch.acts["synthetic"]
    torch.testing.assert_close(x, codes @ src.dictionary + src.bias, rtol=1e-5, atol=1e-4)
    active = codes != 0
    l0 = active.sum(1).float().mean().item()
    assert abs(l0 - src.expected_l0) / src.expected_l0 < 0.05
    freq = active.float().mean(0)
    assert (freq - src.p_marginal).abs().max() < 0.02
    # Zipf: the most frequent features are the low indices
    assert freq[:8].mean() > 5 * freq[-64:].mean()
    # hierarchy: child active => parent active; siblings mutually exclusive
    child = src.parent >= 0
    assert child.sum() == 8 * (3 + 9)
    assert not (active[:, child] & ~active[:, src.parent[child]]).any()
    assert active[:, child].any()
    for par in src.parent[child].unique():
        kids = (src.parent == par).nonzero().squeeze(1)
        assert (active[:, kids].sum(1) <= 1).all()
    # signed features take both signs, the others are never negative
    assert (codes[:, src.signed] < 0).any() and (codes[:, src.signed] > 0).any()
    assert not (codes[:, ~src.signed] < 0).any()
    assert src.signed.sum() == 64


def test_independent_siblings_and_no_hierarchy() -> None:
    src = make(mutually_exclusive=False, corr_rank=0)
    codes = src.next_batch(8192).meta["codes"]
    child = src.parent >= 0
    par = src.parent[child][0]
    kids = (src.parent == par).nonzero().squeeze(1)
    assert ((codes[:, kids] != 0).sum(1) >= 2).any()
    flat = make(n_roots=0)
    assert (flat.parent == -1).all()
    assert abs(flat.expected_l0 - float(flat.p_target.sum())) < 1e-4


def test_bad_config_and_site() -> None:
    with pytest.raises(ValueError, match="needs 84 features in the hierarchy"):
        SyntheticConfig(n_features=10, n_roots=4)
    with pytest.raises(ValueError, match="synthetic options: unknown SyntheticConfig field"):
        SyntheticConfig.from_dict({"n_feat": 3})
    with pytest.raises(ValueError, match="unknown site"):
        make().d_in("layers.0.resid_post")


def test_build_source_dispatch() -> None:
    src = build_source(DataConfig(source="synthetic", synthetic=dict(SMALL)), seed=3)
    assert isinstance(src, SyntheticSource) and src.stream_seed == 3 and src.d_in("synthetic") == 32
    with pytest.raises(
        ValueError, match=r"not one of \['hf', 'synthetic', 'cache', 'saelens_synthetic'\]"
    ):
        build_source(DataConfig(source="parquet"), seed=0)


def test_dictionary_is_not_an_sae_init_with_the_same_seed():
    """An SAE initialised under torch.manual_seed(s) must not start on the seed-s dictionary."""
    from saekit import SAE, SAEConfig
    from saekit.evaluate.ground_truth import mcc

    src = SyntheticSource(SyntheticConfig(n_features=128, d=32, n_roots=4, seed=0))
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=128))
    assert mcc(sae.W_dec.detach(), src.dictionary) < 0.7
