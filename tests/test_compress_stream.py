"""The block-streamed pipeline: equal to the whole-model computation, O(L) block forwards,
shared statistics, caches, dtypes, ranks, and a teacher passed in."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from compress_helpers import BUILDERS, batches, gpt2, llama, perturb, qwen3
from saekit.compress import CompressConfig, LowRankLinear, compress_layer, compress_model
from saekit.compress.core import layer_rank
from saekit.compress.lowrank import compression_groups, dense_weight, find_linear_layers
from saekit.compress.stats import LayerStatsView
from saekit.compress.stream import find_stack


def _inputs(model, names, batch, outs=None):
    """Inputs (and Σ‖y − b‖² of outputs) of ``names`` in a whole-model forward."""
    got, hs = {}, []
    for n in names:
        mod = model.get_submodule(n)
        hs.append(mod.register_forward_pre_hook(lambda _m, a, n=n: got.__setitem__(n, a[0])))
        if outs is not None:

            def post(m, _a, y, n=n):
                y = y.double() - (0 if m.bias is None else m.bias.double())
                outs[n] = outs.get(n, 0.0) + float((y * y).sum())

            hs.append(mod.register_forward_hook(post))
    with torch.no_grad():
        model(batch)
    for h in hs:
        h.remove()
    return got


def reference_compress(model, cfg, data):
    """The whole-model computation the pipeline streams: every step re-runs the student and
    a full untouched copy from the embeddings (2L(L+1) block forwards per batch)."""
    teacher = copy.deepcopy(model)
    names = find_linear_layers(model)
    seq = cfg.is_sequential()
    steps = compression_groups(names, cfg.order) if seq else [names]
    for group in steps:
        H, Hf, D, A1, tgt, N = {}, {}, {}, {}, {}, 0
        for b in data:
            xs = _inputs(model, group, b) if seq else None
            xfs = _inputs(teacher, group, b, tgt)
            for n in group:
                x = (xs or xfs)[n].reshape(-1, xfs[n].shape[-1]).double()
                xf = xfs[n].reshape(-1, x.shape[1]).double()
                H[n] = H.get(n, 0) + x.T @ x
                Hf[n] = Hf.get(n, 0) + xf.T @ xf
                D[n] = D.get(n, 0) + (xf - x).T @ x
                A1[n] = A1.get(n, 0) + xf.abs().sum(0)
            N += x.shape[0]
        for n in group:
            view = LayerStatsView(
                H=(H[n] if seq else Hf[n]) / N,
                delta=D[n] / N if cfg.method == "saes" else None,
                abs_mean=A1[n] / N,
                H_student=H[n] / N if seq else None,
                fp_target=tgt[n] / N if seq else None,
            )
            mod = model.get_submodule(n)
            W = dense_weight(mod).detach()
            r = layer_rank(cfg, n, tuple(W.shape))
            A, B, _ = compress_layer(W, view, cfg, r, n)
            bias = None if getattr(mod, "bias", None) is None else mod.bias.detach()
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent), child, LowRankLinear.from_factors(A, B, bias, W))
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("method", ["saes", "svdllm", "asvd"])
def test_streaming_equals_whole_model_computation(arch, method):
    model = BUILDERS[arch](3)
    perturb(model)
    data = batches(2)
    cfg = CompressConfig(method=method, ratio=0.5, grid=0)
    ref = reference_compress(copy.deepcopy(model), cfg, data)
    res = compress_model(model, cfg, data)
    for n in res.layers:
        a, b = model.get_submodule(n), ref.get_submodule(n)
        torch.testing.assert_close(a.A @ a.B, b.A @ b.B, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(data[0]).logits, ref(data[0]).logits, rtol=1e-5, atol=1e-5)


def _count_block_forwards(model, method, n_batches=2):
    calls = [0]
    _, blocks = find_stack(model, find_linear_layers(model))
    for name in blocks:  # deep copies of a block (the teacher) keep the hook
        model.get_submodule(name).register_forward_pre_hook(
            lambda *_: calls.__setitem__(0, calls[0] + 1)
        )
    res = compress_model(
        model, CompressConfig(method=method, ratio=0.5, grid=0), batches(n_batches)
    )
    assert res.block_forwards == calls[0]
    return calls[0]


@pytest.mark.parametrize("method", ["saes", "svdllm", "svd"])
def test_block_forward_counter_matches_hooks(method):
    """``CompressResult.block_forwards`` is the number of block forwards hooks on the blocks
    count (their linear growth in depth: ``test_compress_regressions.py``)."""
    n = _count_block_forwards(llama(3), method)  # asserts res.block_forwards == the hooks' count
    assert n == {"saes": 5, "svdllm": 1, "svd": 0}[method] * 3 * 2


def test_layers_sharing_an_input_share_statistics():
    """q/k/v read one tensor and gate/up another: one H each, fixed from tensor identity."""
    from saekit.compress.core import _Pipeline

    model = llama(1)
    cfg = CompressConfig(method="saes", ratio=0.5, grid=0)
    names = find_linear_layers(model)
    seen = {}
    orig = _Pipeline._pass

    def spy(self, *a, **k):
        gs = orig(self, *a, **k)
        seen[tuple(a[3])] = (dict(gs.share), len(gs.student), gs.nbytes())
        return gs

    _Pipeline._pass = spy
    try:
        compress_model(model, cfg, batches(2))
    finally:
        _Pipeline._pass = orig
    (share1, n1, bytes1), (share2, n2, _) = seen.values()
    assert share1["self_attn.k_proj"] == share1["self_attn.v_proj"] == "self_attn.q_proj"
    assert share1["mlp.up_proj"] == "mlp.gate_proj" and n1 == 2 and n2 == 2
    assert bytes1 == 2 * 2 * 32 * 32 * 8  # H and Δ for two distinct 32-wide inputs
    assert len(names) == 7


def test_disk_cache_equals_memory_cache(tmp_path):
    data = batches(2)
    out = {}
    base = gpt2(2)
    perturb(base)
    for where in ("cpu", "disk"):
        model = copy.deepcopy(base)
        compress_model(
            model,
            CompressConfig(method="saes", ratio=0.5, grid=0, cache=where, cache_dir=str(tmp_path)),
            data,
        )
        with torch.no_grad():
            out[where] = model(data[0]).logits
    assert torch.equal(out["cpu"], out["disk"])
    assert not list(tmp_path.iterdir())  # the temporary cache is removed


def test_block_reports_time_memory_and_cache():
    model = llama(2)
    res = compress_model(model, CompressConfig(method="saes", ratio=0.5, grid=0), batches(2, 4, 8))
    assert [b.index for b in res.blocks] == [0, 1]
    for b in res.blocks:
        assert b.seconds > 0 and b.forwards == 10
        assert b.cache_bytes == 2 * 2 * 4 * 8 * 32 * 4  # two paths, 2 batches of [4, 8, 32] f32
        assert b.stats_bytes > 0
        assert b.peak_kind in ("rss", "none") and (b.peak_bytes is None) == (b.peak_kind == "none")
    assert all(r.seconds > 0 and r.block in (0, 1) for r in res.layers.values())


def test_ratio_zero_leaves_the_model_dense():
    model = qwen3(2)
    ref = copy.deepcopy(model)
    data = batches(1)
    res = compress_model(model, CompressConfig(method="svdllm", ratio=0.0), data)
    assert all(r.rank == 0 and r.params_after == r.params_before for r in res.layers.values())
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(data[0]).logits, ref(data[0]).logits)


def test_separate_attention_and_mlp_ratios():
    model = llama(2)
    cfg = CompressConfig(method="svd", ratio=0.4, ratio_attn=0.2, ratio_mlp=0.6)
    res = compress_model(model, cfg)
    for n, rep in res.layers.items():
        m, k = rep.shape
        q = 0.2 if "self_attn" in n else 0.6
        assert rep.kind == ("attn" if "self_attn" in n else "mlp")
        assert rep.rank == math.floor(m * k * (1 - q) / (m + k))


@pytest.mark.parametrize("method", ["saes", "svdllm"])
def test_bf16_model_stays_bf16(method):
    """Weights stay in the model's dtype (no forced fp32); statistics are float64."""
    model = llama(2, dtype=torch.bfloat16)
    res = compress_model(model, CompressConfig(method=method, ratio=0.5, grid=0), batches(1, 2, 8))
    lows = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert lows and all(m.A.dtype == m.B.dtype == torch.bfloat16 for m in lows)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(0 <= r.rel_err < 1 for r in res.layers.values())
    with torch.no_grad():
        assert torch.isfinite(model(batches(1, 2, 8)[0]).logits).all()


def test_update_u_lowers_error_on_compressed_inputs():
    """SVD-LLM + closed-form U: whitened by the full-precision inputs, refit on the compressed
    model's: the reported error on the compressed inputs drops against whitening alone; the
    pipeline runs both paths (5 forwards per block and batch)."""
    from compress_helpers import data as mk

    W, Xf = mk(12, 10, 300, 4)
    g = torch.Generator().manual_seed(1)
    X = torch.rand(10, 1, generator=g, dtype=Xf.dtype).mul(3).add(0.2) * Xf  # rescaled channels
    view = LayerStatsView(H=Xf @ Xf.T / 300, H_student=X @ X.T / 300)
    reps = {}
    for upd in (False, True):
        cfg = CompressConfig(method="svdllm", update_u=upd)
        reps[upd] = compress_layer(W.float(), view, cfg, 4)[2]
    assert reps[True].rel_err < 0.9 * reps[False].rel_err
    model = llama(2)
    res = compress_model(model, CompressConfig(method="svdllm", update_u=True, grid=0), batches(2))
    assert res.block_forwards == 5 * 2 * 2
