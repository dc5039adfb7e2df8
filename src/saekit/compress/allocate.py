"""Per-layer rank allocation: ASVD's sensitivity search.

ASVD (its ``sensitivity.py`` / ``binary_search.py``): for every layer and every candidate
*kept* parameter fraction ``p``, compress that layer alone (rank ``⌊p·mn/(m+n)⌋``, the
method's own factorisation on full-precision statistics) and measure the calibration
perplexity of the whole model. Then sort all (layer, p, ppl) entries by perplexity and
binary-search the threshold: each layer takes the smallest ``p`` whose perplexity is under
the threshold (no entry: the layer stays dense), and the threshold is the lowest for which
the kept parameters meet the budget ``1 − ratio``. With ``ratio_attn`` / ``ratio_mlp`` set,
attention and MLP layers are searched separately against their own budgets.

Statistics come from one block-streamed pass of the full-precision model; each perplexity
is a full-model forward over ``sensitivity_seqs`` calibration sequences (the whole model on
its device, as in ASVD). Candidates ``p ∈ {0.1, …, 0.9}`` [our choice: ASVD's list stops at
0.4, too little for ratios above 0.6].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from saekit.compress.config import CompressConfig
from saekit.compress.lowrank import (
    LowRankLinear,
    block_of,
    dense_weight,
    find_linear_layers,
    get_module,
    layer_kind,
    set_module,
)
from saekit.compress.metrics import perplexity
from saekit.compress.stats import GroupStats
from saekit.compress.stream import BlockStream, relative_name

CANDIDATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def kept_rank(m: int, n: int, p: float) -> int:
    """ASVD's rank for kept fraction ``p``: ``⌊⌊p·mn⌋ / (m + n)⌋`` (at least 1)."""
    return max(1, int(m * n * p) // (m + n))


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    cfg: CompressConfig,
    batches: list[Tensor],
    candidates: tuple[float, ...] = CANDIDATES,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[float, float]]:
    """Calibration perplexity with one layer compressed at each kept fraction ``p``."""
    from saekit.compress.core import compress_layer

    names = find_linear_layers(model, cfg.include or None, cfg.exclude or None)
    fcfg = dataclasses.replace(
        cfg,
        method="svdllm" if cfg.method == "saes" else cfg.method,
        update_u=False,
        grid=0,
        sequential="false",
    )
    eval_batches = list(torch.cat(batches)[: cfg.sensitivity_seqs].split(len(batches[0])))
    stream = BlockStream(model, names, cfg.device or None, cfg.cache, cfg.cache_dir)
    X = stream.capture(batches) if cfg.method != "svd" else None
    out: dict[str, dict[float, float]] = {}
    for i, bname in enumerate(stream.blocks):
        block = stream.block(i)
        full = [n for n in names if block_of(n) == bname]
        rel = [relative_name(bname, n) for n in full]
        gs = None
        if X is not None:
            sizes = {n: dense_weight(block.get_submodule(n)).shape[1] for n in rel}
            gs = GroupStats(sizes, False, True, False, cfg.method == "asvd")
            for b in range(len(X)):
                got: dict[str, Tensor] = {}
                hs = [
                    block.get_submodule(n).register_forward_pre_hook(_keeper(got, n)) for n in rel
                ]
                try:
                    X.put(b, stream.forward(block, i, b, X.get(b)))
                finally:
                    for h in hs:
                        h.remove()
                if rel:
                    gs.add_batch(None, got)
        for name, r_name in zip(full, rel):
            mod = get_module(model, name)
            W = dense_weight(mod).detach()
            m, n = W.shape
            st = gs.view(r_name, "teacher") if gs is not None else None
            A, B, _ = compress_layer(W, st, fcfg, min(m, n), name)
            bias = getattr(mod, "bias", None)
            out[name] = {}
            for p in candidates:
                r = kept_rank(m, n, p)
                low = LowRankLinear.from_factors(
                    A[:, :r], B[:r], None if bias is None else bias.detach(), W
                )
                set_module(model, name, low)
                try:
                    out[name][p] = perplexity(model, eval_batches)
                finally:
                    set_module(model, name, mod)
            if progress:
                row = " ".join(f"{p:g}:{v:.2f}" for p, v in out[name].items())
                progress(f"sensitivity {name}: {row}")
    return out


def _keeper(store: dict[str, Tensor], name: str) -> Callable:
    def hook(_m: nn.Module, args: tuple) -> None:
        store[name] = args[0].detach()

    return hook


def search_ranks(
    sens: dict[str, dict[float, float]],
    shapes: dict[str, tuple[int, int]],
    kept_target: float,
) -> dict[str, int]:
    """ASVD's binary search: per-layer ranks keeping at most ``kept_target`` of the
    layers' parameters with the lowest perplexity threshold (rank 0 = stays dense)."""
    entries = sorted(
        ((name, p, ppl) for name, row in sens.items() for p, ppl in row.items()),
        key=lambda e: -e[2],
    )
    total = sum(m * n for m, n in (shapes[k] for k in sens))

    def ranks_at(mid: int) -> dict[str, int]:
        best: dict[str, float] = {}
        for name, p, _ in entries[mid:]:
            best[name] = min(best.get(name, 1.0), p)
        return {k: kept_rank(*shapes[k], best[k]) if k in best else 0 for k in sens}

    def kept(ranks: dict[str, int]) -> float:
        s = sum(r * sum(shapes[k]) if r else shapes[k][0] * shapes[k][1] for k, r in ranks.items())
        return s / max(total, 1)

    lo, hi = 0, len(entries)  # largest mid with kept(mid) <= target; mid = 0 admits all
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kept(ranks_at(mid)) <= kept_target:
            lo = mid
        else:
            hi = mid - 1
    return ranks_at(lo)


def sensitivity_ranks(
    model: nn.Module,
    cfg: CompressConfig,
    batches: list[Tensor],
    progress: Callable[[str], None] | None = None,
    table: dict[str, dict[float, float]] | None = None,
) -> tuple[dict[str, int], dict[str, dict[float, float]]]:
    """Per-layer ranks from ASVD's sensitivity search; (ranks, sensitivity table).

    ``table``: a table from an earlier call on the same model, method and calibration data
    (it does not depend on the ratios), skipping the perplexity measurements."""
    sens = table if table is not None else layer_sensitivity(model, cfg, batches, progress=progress)
    shapes = {n: tuple(dense_weight(get_module(model, n)).shape) for n in sens}
    if cfg.ratio_attn is None and cfg.ratio_mlp is None:
        groups = {"all": list(sens)}
    else:
        groups = {k: [n for n in sens if layer_kind(n) == k] for k in ("attn", "mlp")}
    ranks: dict[str, int] = {}
    for kind, members in groups.items():
        if not members:
            continue
        ratio = cfg.ratio if kind == "all" else cfg.ratio_for(kind)
        sub = {n: sens[n] for n in members}
        ranks.update(search_ranks(sub, shapes, 1.0 - ratio))  # type: ignore[arg-type]
    return ranks, sens
