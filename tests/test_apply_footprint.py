"""Dataset footprints, redundancy and coverage-preserving subsampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saekit import SAE, SAEConfig
from saekit.apply.footprint import (
    coverage_subsample,
    footprint,
    footprint_report,
    redundancy,
    redundancy_matrix,
    sample_features,
)
from saekit.apply.toy import tiny_gpt2, word_tokenizer

A = ["the cat sat on the mat", "a dog ran in the park", "the red bird sang"]
B = ["def f ( x ) : return x", "for i in range ( 3 ) : print ( i )", "class A : pass"]
SITE = "layers.1.resid_post"


@pytest.fixture(scope="module")
def setup():
    tok = word_tokenizer(A + B, vocab_size=64)
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=0)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=96, rule="topk", k=3)).eval()
    return model, tok, sae


def test_redundancy_with_itself_is_one(setup, tmp_path):
    model, tok, sae = setup
    rep = footprint_report(sae, model, tok, SITE, {"a": A, "a2": list(A), "b": B}, tmp_path)
    R = np.array(rep["redundancy"], dtype=float)
    assert np.allclose(np.diag(R), 1.0)
    assert R[0, 1] == 1.0 and R[1, 0] == 1.0  # same texts, same footprint
    assert R[0, 2] < 1.0  # code and prose do not share every feature
    assert (tmp_path / "redundancy.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "footprint.json").read_text())
    assert saved["datasets"]["a"]["footprint_size"] > 0


def test_subset_redundancy_and_threshold(setup):
    model, tok, sae = setup
    act_all = sample_features(sae, model, tok, SITE, A + B)
    act_a = sample_features(sae, model, tok, SITE, A)
    fa, fall = footprint(act_a), footprint(act_all)
    assert redundancy(fa, fall) == 1.0  # A's features all occur in A ∪ B
    assert redundancy(fall, fa) < 1.0
    high = sample_features(sae, model, tok, SITE, A, threshold=1e9)
    assert not high.any()
    assert np.isnan(redundancy(footprint(high), fa))
    with pytest.raises(ValueError, match="threshold"):
        sample_features(sae, model, tok, SITE, A, threshold=-1)


def test_min_samples():
    active = np.array([[1, 1, 0], [1, 0, 0], [1, 0, 1]], dtype=bool)
    assert footprint(active, 1).tolist() == [True, True, True]
    assert footprint(active, 2).tolist() == [True, False, False]
    R = redundancy_matrix([footprint(active, 1), footprint(active, 2)])
    assert R.tolist() == [[1.0, 1 / 3], [1.0, 1.0]]


def test_coverage_subsample_keeps_every_feature():
    rng = np.random.default_rng(0)
    active = rng.random((200, 50)) < 0.03
    active[:, 49] = False
    active[17, 49] = True  # feature 49 only in sample 17
    size = 60
    idx = coverage_subsample(active, size, seed=1)
    assert len(idx) == size == len(set(idx))
    assert 17 in idx
    assert (active[idx].any(0) == active.any(0)).all()
    # random subsamples of the same size lose features (here: mostly feature 49); the
    # assertion on main at 9e49562 (random coverage <= full coverage) could not fail
    n_all = int(active.any(0).sum())
    draws = [rng.choice(200, size=size, replace=False) for _ in range(20)]
    lost = [n_all - int(active[d].any(0).sum()) for d in draws]
    assert sum(n > 0 for n in lost) >= 10
    # size smaller than the cover: greedy stops at size, taking the largest gains first
    idx2 = coverage_subsample(active, 3)
    assert len(idx2) == 3 and idx2[0] == int(active.sum(1).argmax())
    with pytest.raises(ValueError, match="size"):
        coverage_subsample(active, 0)
