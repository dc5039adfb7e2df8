"""Low-rank compression: SVD, ASVD, SVD-LLM, SAES-SVD (saekit.compress)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from saekit.compress import (
    METHODS,
    CompressConfig,
    IllConditionedError,
    LowRankLinear,
    aces_beta,
    asvd_factor,
    collect_stats,
    compress_model,
    find_linear_layers,
    grid_beta,
    load_compressed,
    rank_for_ratio,
    retained_energy,
    saes_factor,
    save_compressed,
    svd_factor,
    svdllm_factor,
)
from saekit.compress.factor import aces_coefficients
from saekit.compress.lowrank import compression_groups, dense_weight


def _data(m: int, n: int, N: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and anisotropic, correlated inputs X [n, N] (float64)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, 2, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    X = mix @ (scales[:, None] * torch.randn(n, N, generator=g, dtype=torch.float64))
    return W, X


def _factor(method: str, W: torch.Tensor, X: torch.Tensor, r: int, **kw):
    H = X @ X.T / X.shape[1]
    if method == "svd":
        return svd_factor(W, r)
    if method == "asvd":
        return asvd_factor(W, X.abs().mean(1), r)
    if method == "svdllm":
        return svdllm_factor(W, H, r, **kw)
    A, B, _ = saes_factor(W, H, None, r, beta="aces", **kw)
    return A, B


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def _qwen():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return Qwen3ForCausalLM(cfg).eval()


def _batches(n: int = 3, b: int = 4, t: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (b, t), generator=g) for _ in range(n)]


def test_rank_formula():
    assert rank_for_ratio(128, 512, 0.4) == math.floor(128 * 512 * 0.6 / 640) == 61
    assert rank_for_ratio(32, 32, 0.0) == 16
    assert rank_for_ratio(4, 4, 0.99) == 1
    with pytest.raises(ValueError, match="ratio"):
        rank_for_ratio(4, 4, 1.0)


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_reproduces_weight(method):
    W, X = _data(12, 8, 200, 0)
    A, B = _factor(method, W, X, 8, ridge=0.0)
    assert A.shape == (12, 8) and B.shape == (8, 8)
    torch.testing.assert_close(A @ B, W, rtol=1e-8, atol=1e-8)


def test_saes_full_rank_with_delta_targets_fp_outputs():
    """At full rank and β > 0 SAES-SVD gives AB = W(H + βΔ)H⁻¹ (not W): it shifts towards W X_f."""
    W, X = _data(10, 6, 100, 1)
    Xf = X + 0.1 * torch.randn_like(X)
    H, D = X @ X.T / 100, (Xf - X) @ X.T / 100
    A, B, info = saes_factor(W, H, D, 6, beta=0.5, ridge=0.0)
    assert info.beta == 0.5
    torch.testing.assert_close(A @ B, W @ (H + 0.5 * D) @ torch.linalg.inv(H))


@pytest.mark.parametrize("seed", range(6))
def test_svdllm_output_error_never_above_svd(seed):
    m, n = [(16, 12), (12, 16), (20, 20), (8, 24), (24, 8), (16, 16)][seed]
    W, X = _data(m, n, 3 * n, seed)
    for r in (1, min(m, n) // 2, min(m, n) - 1):
        As, Bs = svd_factor(W, r)
        Al, Bl = svdllm_factor(W, X @ X.T, r, ridge=0.0)
        err_svd = torch.linalg.norm((W - As @ Bs) @ X)
        err_llm = torch.linalg.norm((W - Al @ Bl) @ X)
        assert err_llm <= err_svd * (1 + 1e-10)
        Ad, Bd = svdllm_factor(W, X @ X.T, r)  # default small ridge: still not worse
        assert torch.linalg.norm((W - Ad @ Bd) @ X) <= err_svd * (1 + 1e-6)
    # and it is strictly better on anisotropic data at half rank
    r = min(m, n) // 2
    As, Bs = svd_factor(W, r)
    Al, Bl = svdllm_factor(W, X @ X.T, r, ridge=0.0)
    assert torch.linalg.norm((W - Al @ Bl) @ X) < 0.99 * torch.linalg.norm((W - As @ Bs) @ X)


def test_asvd_scaling_differs_from_svd_and_helps_scaled_channels():
    W, X = _data(16, 12, 300, 3)
    X = X.abs().mean(1, keepdim=True).reciprocal() * X  # equalise, then scale few channels up
    X[:3] *= 50
    r = 4
    As, Bs = svd_factor(W, r)
    Aa, Ba = asvd_factor(W, X.abs().mean(1), r, alpha=0.5)
    assert torch.linalg.norm((W - Aa @ Ba) @ X) < torch.linalg.norm((W - As @ Bs) @ X)
    with pytest.raises(ValueError, match="abs_mean"):
        asvd_factor(W, torch.ones(5), r)


def test_saes_beta_zero_equals_svdllm():
    W, X = _data(14, 10, 80, 4)
    Xf = X + 0.3 * torch.randn_like(X)
    H, D = X @ X.T / 80, (Xf - X) @ X.T / 80
    Al, Bl = svdllm_factor(W, H, 5)
    As, Bs, info = saes_factor(W, H, D, 5, beta=0.0)
    torch.testing.assert_close(As, Al)
    torch.testing.assert_close(Bs, Bl)
    assert info.beta == 0.0


def test_saes_beta_reduces_error_against_fp_outputs():
    """With β near 1 the CEALC target is W X_f: the error to the FP outputs drops vs β = 0."""
    W, X = _data(14, 10, 400, 5)
    Xf = X + 0.5 * torch.randn_like(X)
    H, D = X @ X.T / 400, (Xf - X) @ X.T / 400
    errs = []
    for beta in (0.0, 0.9):
        A, B, _ = saes_factor(W, H, D, 5, beta=beta)
        errs.append(float(torch.linalg.norm(A @ B @ X - W @ Xf)))
    assert errs[1] < errs[0]


def test_cholesky_failure_names_ridge():
    W, X = _data(8, 12, 5, 6)  # 5 samples, 12 inputs: H has rank 5
    H = X @ X.T
    with pytest.raises(IllConditionedError, match="ridge") as ei:
        svdllm_factor(W, H, 3, ridge=0.0, name="blk.0.q")
    assert isinstance(ei.value, ValueError)
    assert "blk.0.q" in str(ei.value) and "--ridge" in str(ei.value)
    fix = ei.value.ridge
    assert 0 < fix <= 1
    A, B = svdllm_factor(W, H, 3, ridge=fix)  # the suggested ridge works
    assert torch.isfinite(A @ B).all()
    A2, B2, info = saes_factor(W, H, None, 3, beta=0.0, ridge=0.0, auto_ridge=True)
    assert info.ridge == fix
    torch.testing.assert_close(A2 @ B2, A @ B)


def test_aces_closed_form_matches_grid_on_constructed_case():
    """Diagonal G0, G1 keep the top-1 subspace fixed, so the surrogate is exact; ρ(β) has an
    interior maximum (near β ≈ 0.58)."""
    G0 = torch.diag(torch.tensor([1.0, 0.3, 0.2], dtype=torch.float64))
    G1 = torch.diag(torch.tensor([1.0, -0.6, 0.0], dtype=torch.float64))
    beta = aces_beta(G0, G1, r=1, beta_max=0.9)
    b_grid, rho_grid = grid_beta(G0, G1, 1, 0.9, points=901)
    assert 0.0 < beta < 0.9
    assert abs(beta - b_grid) <= 0.001
    assert retained_energy(G0 + beta * G1, 1) >= rho_grid - 1e-12
    # the same through saes_factor: W = G0 with H = I (L = I), Δ chosen so that W Δ = G1
    W = G0.clone()
    D = torch.linalg.solve(W, G1)
    _, _, info = saes_factor(W, torch.eye(3, dtype=torch.float64), D, 1, ridge=0.0, grid=181)
    assert abs(info.beta - info.beta_grid) <= 0.005 + 1e-9
    assert abs(info.rho - info.rho_grid) < 1e-4
    _, _, ginfo = saes_factor(W, torch.eye(3, dtype=torch.float64), D, 1, beta="grid", ridge=0.0)
    assert ginfo.beta == ginfo.beta_grid and abs(ginfo.beta - beta) <= 0.9 / 20 / 2 + 1e-9


def test_aces_solves_surrogate_exactly():
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        G0 = torch.randn(9, 7, generator=g, dtype=torch.float64)
        G1 = torch.randn(9, 7, generator=g, dtype=torch.float64)
        a, b, c, A, B, C = aces_coefficients(G0, G1, 3)
        xs = torch.linspace(0, 0.9, 9001, dtype=torch.float64)
        tail = (a * xs**2 + b * xs + c) / (A * xs**2 + B * xs + C)
        beta = aces_beta(G0, G1, 3, 0.9)
        t = (a * beta**2 + b * beta + c) / (A * beta**2 + B * beta + C)
        assert t <= float(tail.min()) + 1e-12


@pytest.mark.parametrize("build", [_gpt2, _qwen], ids=["gpt2-conv1d", "qwen-linear"])
@pytest.mark.parametrize("method", METHODS)
def test_compressed_model_runs_and_ranks_match_ratio(build, method):
    model = build()
    names = find_linear_layers(model)
    shapes = {n: tuple(dense_weight(model.get_submodule(n)).shape) for n in names}
    ids = _batches()
    res = compress_model(model, CompressConfig(method=method, ratio=0.4, grid=5), ids)
    assert set(res.layers) == set(names)
    removed = 0
    for n, (m, k) in shapes.items():
        mod = model.get_submodule(n)
        assert isinstance(mod, LowRankLinear)
        r = math.floor(m * k * 0.6 / (m + k))
        assert mod.A.shape == (m, r) and mod.B.shape == (r, k)
        removed += m * k - r * (m + k)
    assert res.params_before - res.params_after == removed
    logits = model(ids[0]).logits
    assert logits.shape == (4, 16, 64) and torch.isfinite(logits).all()
    if method != "svd":
        assert all(0 <= rep.rel_err < 1 for rep in res.layers.values())


def test_block_order_puts_output_side_second():
    names = find_linear_layers(_qwen())
    groups = compression_groups(names)
    assert [g[0].split(".")[-1] for g in groups] == ["q_proj", "o_proj"] * 2
    assert groups[0] == [
        f"model.layers.0.{x}"
        for x in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        )
    ]
    assert groups[1] == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    g2 = compression_groups(find_linear_layers(_gpt2()))
    assert g2[1] == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]


def test_conv1d_full_rank_is_exact():
    model = _gpt2()
    ref = copy.deepcopy(model)
    ids = _batches(1)
    compress_model(model, CompressConfig(method="svd", rank=10**6), ids)
    torch.testing.assert_close(model(ids[0]).logits, ref(ids[0]).logits, rtol=1e-4, atol=1e-4)


def test_streaming_stats_equal_full_batch():
    model = _qwen()
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # perturb the student so x != x_f downstream
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    ids = _batches(3)
    name = "model.layers.1.self_attn.q_proj"
    st = collect_stats(model, teacher, [name], ids)[name]
    xs, xfs = [], []
    for mdl, store in ((model, xs), (teacher, xfs)):
        h = mdl.get_submodule(name).register_forward_pre_hook(
            lambda _m, a, s=store: s.append(a[0].reshape(-1, 32).double())
        )
        with torch.no_grad():
            for b in ids:
                mdl(b)
        h.remove()
    X, Xf = torch.cat(xs), torch.cat(xfs)
    assert st.count == X.shape[0] == 3 * 4 * 16
    torch.testing.assert_close(st.H, X.T @ X)
    torch.testing.assert_close(st.delta, (Xf - X).T @ X)
    assert float(st.delta.abs().max()) > 0


def test_saes_layer_reports():
    """SAES-SVD's per-layer report: error against FP outputs is finite and β within caps."""
    model = _qwen()
    res = compress_model(model, CompressConfig(method="saes", ratio=0.5, grid=5), _batches())
    for rep in res.layers.values():
        assert 0.0 <= rep.beta <= 0.9
        assert rep.rel_err_fp is not None and math.isfinite(rep.rel_err_fp)
        assert rep.beta_grid is not None
    assert "aces_vs_grid" in res.summary()


@pytest.mark.parametrize("build", [_gpt2, _qwen], ids=["gpt2", "qwen"])
def test_save_load_identical_logits(tmp_path, build):
    model = build()
    ids = _batches(2)
    res = compress_model(model, CompressConfig(method="saes", ratio=0.4, grid=0), ids)
    size = save_compressed(model, tmp_path, res.summary())
    assert size == (tmp_path / "model.safetensors").stat().st_size > 0
    loaded = load_compressed(tmp_path)
    assert isinstance(loaded.get_submodule(next(iter(res.layers))), LowRankLinear)
    with torch.no_grad():
        assert torch.equal(loaded(ids[0]).logits, model(ids[0]).logits)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="compression.json"):
        load_compressed(tmp_path)
    with pytest.raises(ValueError, match="method"):
        CompressConfig(method="lora")
    with pytest.raises(ValueError, match="β"):
        CompressConfig(beta="1.5")
    with pytest.raises(ValueError, match="calibration"):
        compress_model(_qwen(), CompressConfig(method="svdllm"), None)


def test_lowrank_linear_matches_dense():
    lin = nn.Linear(6, 5)
    A, B = svd_factor(lin.weight.detach(), 5)
    low = LowRankLinear.from_factors(A, B, lin.bias.detach(), lin.weight)
    x = torch.randn(3, 2, 6)
    torch.testing.assert_close(low(x), lin(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(6, 5, 6)
