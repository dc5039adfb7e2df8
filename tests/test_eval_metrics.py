"""Metric functions of saekit.evaluate, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saekit import SAE, SAEConfig
from saekit.evaluate import afa, baselines, core, ground_truth, independence, probing
from saekit.sae import Codes

# ------------------------------------------------------------------ core


def _xy():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0], [0.0, 4.0]])
    return x, x_hat


def test_core_by_hand():
    x, x_hat = _xy()
    # mean (2, 2); sum ||x - mu||^2 = (1+4) + (1+0) + (0+4) = 10; sum err = 1 + 0 + 4 = 5
    assert core.fve(x, x_hat) == pytest.approx(0.5)
    # per token: 1 - 1/5, 1 - 0/1, 1 - 4/4  -> mean (0.8 + 1 + 0) / 3
    assert core.fve_legacy(x, x_hat) == pytest.approx(1.8 / 3)
    # OpenAI's normalised MSE is per token: (1/1 + 0/13 + 4/20) / 3 (issue 10, fidelity 10:
    # it was the pooled 5/34 under OpenAI's name); pooled: sum ||x||^2 = 1 + 13 + 20 = 34
    assert core.nmse(x, x_hat) == pytest.approx(1.2 / 3)
    assert core.nmse_pooled(x, x_hat) == pytest.approx(5 / 34)
    cos = [1 / math.sqrt(2), 1.0, 4 / math.sqrt(20)]
    assert core.cosine(x, x_hat) == pytest.approx(sum(cos) / 3)
    ratios = [math.sqrt(2), 1.0, 4 / math.sqrt(20)]
    assert core.l2_ratio(x, x_hat) == pytest.approx(sum(ratios) / 3)
    # E||x_hat||^2 / E<x, x_hat> = (2 + 13 + 16) / (1 + 13 + 16)
    assert core.relative_reconstruction_bias(x, x_hat) == pytest.approx(31 / 30)


def test_fve_perfect_is_one_mean_is_zero():
    x = torch.randn(50, 6) + 3.0
    assert core.fve(x, x.clone()) == pytest.approx(1.0)
    assert core.fve(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-12)


def test_legacy_differs_from_pooled_as_expected():
    # one token sits at the mean (tiny denominator): legacy averages per-token ratios,
    # so a small error there dominates it, while pooled FVE barely moves
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [-10.0, 0.0], [0.0, 0.1]])
    x = x - x.mean(0)
    x_hat = x.clone()
    x_hat[3] += torch.tensor([0.0, 0.5])
    pooled, legacy = core.fve(x, x_hat), core.fve_legacy(x, x_hat)
    assert pooled > 0.99
    assert legacy < 0.0  # the near-mean token's ratio is huge


def test_l0_l1_density_signed():
    dense = torch.tensor([[0.0, -2.0, 1.0], [0.0, 0.0, 3.0]])
    assert core.l0(dense) == pytest.approx(1.5)  # negative code counts
    assert core.l1(dense) == pytest.approx(3.0)  # (2 + 1 + 3) / 2
    assert core.feature_density(dense).tolist() == [0.0, 0.5, 1.0]
    sparse = Codes(
        3, values=torch.tensor([[-2.0, 1.0], [3.0, 0.0]]), indices=torch.tensor([[1, 2], [2, 0]])
    )
    assert core.l0(sparse) == pytest.approx(1.5)
    assert core.feature_density(sparse).tolist() == [0.0, 0.5, 1.0]


def test_accumulator_matches_pure_functions_and_hist():
    torch.manual_seed(1)
    x = torch.randn(64, 5) * 2 + 1
    x_hat = x + 0.3 * torch.randn(64, 5)
    codes = torch.relu(torch.randn(64, 7))
    codes[:, 0] = 0.0  # dead
    codes[:, 1] = 1.0  # dense
    acc = core.CoreAccumulator(5, 7)
    for s in range(0, 64, 16):
        acc.update(x[s : s + 16], x_hat[s : s + 16], codes[s : s + 16])
    r = acc.result()
    assert r["n_tokens"] == 64
    assert r["fve"] == pytest.approx(core.fve(x, x_hat), rel=1e-10)
    assert r["nmse"] == pytest.approx(core.nmse(x, x_hat))
    assert r["nmse_pooled"] == pytest.approx(core.nmse_pooled(x, x_hat))
    assert r["cos"] == pytest.approx(core.cosine(x, x_hat))
    assert r["l2_ratio"] == pytest.approx(core.l2_ratio(x, x_hat))
    assert r["rel_bias"] == pytest.approx(core.relative_reconstruction_bias(x, x_hat))
    assert r["l0"] == pytest.approx(core.l0(codes))
    assert r["l1"] == pytest.approx(core.l1(codes))
    # legacy uses per-batch means: equals the mean of per-batch legacy values
    per_batch = [core.fve_legacy(x[s : s + 16], x_hat[s : s + 16]) for s in range(0, 64, 16)]
    assert r["fve_legacy"] == pytest.approx(sum(per_batch) / 4)
    assert r["dead_frac"] == pytest.approx(1 / 7) and r["n_dead"] == 1
    dens = core.feature_density(codes)
    assert r["dense_frac"] == pytest.approx(float((dens > 0.1).double().mean()))
    assert sum(r["density_hist"]["counts"]) == 6 and r["density_hist"]["dead"] == 1
    h = acc.l0_histogram()
    assert sum(h["count"]) == 64


def test_accumulator_rejects_bad_shapes():
    acc = core.CoreAccumulator(4, 8)
    with pytest.raises(ValueError, match="must both be"):
        acc.update(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="d_sae"):
        acc.update(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 9))


# ------------------------------------------------------------------ ground truth


def test_mcc_true_dictionary_is_one_random_is_low():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(128, 64, generator=g)
    perm = torch.randperm(128, generator=g)
    signs = torch.where(torch.rand(128, generator=g) < 0.5, -1.0, 1.0)
    W = (G[perm] * signs[:, None]) * 3.0  # permuted, sign-flipped, rescaled
    m = ground_truth.dictionary_metrics(W, G)
    assert m["mcc"] == pytest.approx(1.0)
    assert m["mmcs"] == pytest.approx(1.0)
    assert m["uniqueness"] == pytest.approx(1.0)
    assert m["recovery"] == pytest.approx(1.0)
    R = torch.randn(128, 64, generator=g)
    # chance level of Hungarian-matched |cos| is ~0.33 for 128 random atoms in d=64
    assert ground_truth.mcc(R, G) < 0.36
    assert ground_truth.recovery(R, G) == 0.0
    # 64 random atoms vs 64 true features in d=128: ~0.21
    G2, R2 = torch.randn(64, 128, generator=g), torch.randn(64, 128, generator=g)
    assert ground_truth.mcc(R2, G2) < 0.3


def test_mcc_by_hand():
    G = torch.eye(3)
    W = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    # |cos|: row0 -> f1 (1), row1 -> f0 / f1 (0.707), row2 -> f2 (1); Hungarian: 1, .707, 1
    assert ground_truth.mcc(W, G) == pytest.approx((2 + 1 / math.sqrt(2)) / 3)
    # mmcs: f0 best .707, f1 best 1, f2 best 1
    assert ground_truth.mmcs(W, G) == pytest.approx((2 + 1 / math.sqrt(2)) / 3)
    # best matches: row0 f1, row1 f0 (tie: argmax takes first), row2 f2 -> 3 unique / 3
    assert ground_truth.uniqueness(W, G) == pytest.approx(1.0)
    assert ground_truth.recovery(W, G, 0.9) == pytest.approx(2 / 3)


def test_detection_precision_recall_by_hand():
    G = torch.eye(2)
    W = torch.eye(2)
    true = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    acc = ground_truth.DetectionAccumulator(W, G)
    acc.update(codes[:2], true[:2])
    acc.update(codes[2:], true[2:])
    r = acc.result()
    # latent 0: tp 1 (t0), fp 1 (t2), fn 1 (t1) -> P .5 R .5; latent 1: tp 2, fp 0, fn 0
    assert r["precision"] == pytest.approx(0.75)
    assert r["recall"] == pytest.approx(0.75)
    assert r["f1"] == pytest.approx(0.75)
    assert r["accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert r["n_tokens"] == 4


def test_absorption_by_hand():
    G = torch.eye(3)
    W = torch.eye(3)
    parent = [-1, 0, -1]  # feature 1 is a child of feature 0
    true = torch.tensor([[1.0, 1.0, 0], [1.0, 1.0, 0], [1.0, 1.0, 0], [1.0, 1.0, 0], [1.0, 0, 1]])
    # child-active tokens 0..3: parent latent silent while child latent fires on 0, 1
    codes = torch.tensor([[0.0, 1, 0], [0.0, 1, 0], [1.0, 1, 0], [1.0, 0, 0], [1.0, 0, 1]])
    acc = ground_truth.AbsorptionAccumulator(W, G, parent, min_support=1)
    acc.update(codes, true)
    r = acc.result()
    assert r["absorption"] == pytest.approx(0.5) and r["n_pairs"] == 1


# ------------------------------------------------------------------ AFA


def test_eps_lbo_by_hand():
    cfg = SAEConfig(d_in=2, d_sae=3, k=2, rule="topk")
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([0.0, 1.0]))
    codes = torch.tensor([[1.0, 2.0, 0.0]])
    # f~ = [1*2, 2*1, 0, ||b_dec||=1] -> ||f~||^2 = 4 + 4 + 1 = 9
    fsq = afa.f_tilde_sq_norm(codes, sae.W_dec.norm(dim=1), sae.b_dec)
    assert float(fsq[0]) == pytest.approx(9.0)
    zsq = torch.tensor([12.0])
    # |12 - 9| / ((3 - 1) * 9) = 1/6
    assert float(afa.eps_lbo(zsq, fsq, 3)[0]) == pytest.approx(1 / 6)
    acc = afa.AFAAccumulator(sae)
    acc.update_from(torch.tensor([[2.0, 2.0 * math.sqrt(2)]]), codes)  # ||z||^2 = 12
    r = acc.result()
    assert r["eps_lbo_mean"] == pytest.approx(1 / 6) and r["n_tokens"] == 1


# ------------------------------------------------------------------ independence


def test_decoder_max_cos_chunked():
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]])
    m = independence.decoder_max_cos(W, chunk=3)
    s = 1 / math.sqrt(2)
    assert m.tolist() == pytest.approx([1.0, s, s, 1.0])
    torch.manual_seed(0)
    R = torch.randn(50, 8)
    full = (
        torch.nn.functional.normalize(R, dim=1) @ torch.nn.functional.normalize(R, dim=1).T
    ).abs()
    full.fill_diagonal_(-1)
    assert independence.decoder_max_cos(R, chunk=7) == pytest.approx(full.max(1).values, abs=1e-6)


def test_ablation_effect_equals_redecoding():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=6, d_sae=12, k=3, rule="topk"))
    x = torch.randn(20, 6)
    with torch.no_grad():
        out = sae(x)
        dense = out.codes.to_dense()
        base = (x - out.x_hat).pow(2).sum(-1)
        want = torch.zeros(12, dtype=torch.float64)
        for f in range(12):
            d = dense.clone()
            d[:, f] = 0
            xh = d @ sae.W_dec + sae.b_dec
            want[f] = ((x - xh).pow(2).sum(-1) - base).double().sum()
    acc = independence.AblationAccumulator(sae)
    acc.update(x, out.x_hat, out.codes)  # sparse path
    assert acc.sum_delta == pytest.approx(want, abs=1e-4)
    acc2 = independence.AblationAccumulator(sae)
    acc2.update(x, out.x_hat, dense)  # dense path
    assert acc2.sum_delta == pytest.approx(want, abs=1e-4)
    r = acc.result()
    alive = acc.fires > 0
    assert r["ablation_dmse_mean"] == pytest.approx(float((want[alive] / 20).mean()), rel=1e-5)


# ------------------------------------------------------------------ baselines


def test_pca_baseline_is_projection():
    torch.manual_seed(0)
    x = torch.randn(200, 5) @ torch.randn(5, 5) + 2.0
    pca = baselines.fit_pca([x[:100], x[100:]], 5, l0=2.2)
    assert pca.r == 2
    mu = x.double().mean(0)
    _, _, Vh = torch.linalg.svd(x.double() - mu, full_matrices=False)
    U = Vh[:2]
    want = mu + (x.double() - mu) @ U.T @ U
    out = pca(x)
    assert out.x_hat.double() == pytest.approx(want, abs=1e-4)
    assert core.l0(out.codes) == pytest.approx(2.0)
    full = baselines.PCABaseline(5, 5).fit([x])
    assert full(x).x_hat == pytest.approx(x, abs=1e-4)


def test_random_sae_baseline():
    sae = SAE(SAEConfig(d_in=8, d_sae=32, k=4, rule="topk"))
    with torch.no_grad():
        sae.b_dec.fill_(0.5)
    r = baselines.random_sae(sae, seed=3)
    assert r.cfg.rule == "topk" and r.cfg.k == 4
    assert torch.allclose(r.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(r.W_enc, r.W_dec.t())
    assert torch.equal(r.b_dec, sae.b_dec)
    assert not torch.equal(r.W_dec, sae.W_dec)
    bt = SAE(SAEConfig(d_in=8, d_sae=32, k=4, rule="batchtopk"))
    with pytest.raises(ValueError, match="l0"):
        baselines.random_sae(bt)
    rb = baselines.random_sae(bt, l0=6.4)
    assert rb.cfg.rule == "topk" and rb.cfg.k == 6


def test_trained_beats_floors_on_lowrank_data():
    # data in a 3-d subspace: PCA at L0 3 is perfect, a random SAE is not
    torch.manual_seed(0)
    x = torch.randn(300, 3) @ torch.randn(3, 10)
    pca = baselines.fit_pca([x], 10, l0=3)
    r_pca, _ = core.core_metrics(pca, [x])
    assert r_pca["fve"] == pytest.approx(1.0, abs=1e-6)
    rnd = baselines.random_sae(SAE(SAEConfig(d_in=10, d_sae=40, k=3, rule="topk")))
    r_rnd, _ = core.core_metrics(rnd, [x])
    assert r_rnd["fve"] < 0.9


# ------------------------------------------------------------------ probing


def test_probe_beats_chance_on_planted_direction():
    rng = np.random.default_rng(0)
    n, d = 200, 30
    y = np.array(["pos" if i % 2 else "neg" for i in range(n)])
    X = rng.normal(size=(n, d))
    X[:, 7] += np.where(y == "pos", 3.0, -3.0)  # planted direction
    tr, te = probing.train_test_split(y.tolist(), 0.25, seed=0)
    r = probing.sparse_probe_accuracy(X[tr], y[tr], X[te], y[te], ks=(1, 2))
    assert r["top_1_test_accuracy"] > 0.9
    assert probing.top_k_by_mean_diff(X[tr], (y[tr] == "pos").astype(int), 1).tolist() == [7]
    # noise only: near chance
    r0 = probing.sparse_probe_accuracy(
        rng.normal(size=(150, d)), y[tr], rng.normal(size=(50, d)), y[te], ks=(1,)
    )
    assert r0["top_1_test_accuracy"] < 0.8


def test_probe_is_balanced_one_vs_rest():
    """Issue 10, fidelity 8: on 5 classes an uninformed probe scored 0.8 ("always no")."""
    rng = np.random.default_rng(2)
    y = np.array(list("abcde") * 40)
    X = rng.normal(size=(200, 6))  # no signal at all
    r = probing.sparse_probe_accuracy(X[:150], y[:150], X[150:], y[150:], ks=(1, 2))
    assert 0.3 < r["top_1_test_accuracy"] < 0.7  # chance on a balanced set is 0.5
    assert r["balanced_sizes"] == {c: [60, 20] for c in "abcde"}
    idx = probing.balanced_one_vs_rest(y, "a", np.random.default_rng(0))
    assert (y[idx] == "a").sum() == 40 and len(idx) == 80 and len(set(idx.tolist())) == 80
    neg = y[idx][y[idx] != "a"]
    assert sorted(np.unique(neg, return_counts=True)[1].tolist()) == [10, 10, 10, 10]
    few = np.array(["a"] * 10 + ["b"] * 3)
    idx = probing.balanced_one_vs_rest(few, "a", np.random.default_rng(0))
    assert (few[idx] == "a").sum() == 3 and len(idx) == 6  # the class is subsampled


def test_probe_multiclass_and_bad_file(tmp_path):
    rng = np.random.default_rng(1)
    y = np.array(["a", "b", "c"] * 40)
    X = rng.normal(size=(120, 10))
    for j, c in enumerate("abc"):
        X[y == c, j] += 4.0
    r = probing.sparse_probe_accuracy(X[:90], y[:90], X[90:], y[90:], ks=(1,))
    assert r["classes"] == ["a", "b", "c"] and r["top_1_test_accuracy"] > 0.9
    with pytest.raises(FileNotFoundError, match="not found"):
        probing.read_labelled_jsonl(tmp_path / "nope.jsonl")
    p = tmp_path / "one.jsonl"
    p.write_text('{"text": "x", "label": 1}\n{"text": "y", "label": 1}\n')
    with pytest.raises(ValueError, match="two distinct"):
        probing.read_labelled_jsonl(p)
