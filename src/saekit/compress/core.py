"""Layer-by-layer low-rank compression of a transformer: SVD, ASVD, SVD-LLM, SAES-SVD.

:func:`compress_model` streams the model block by block (:mod:`saekit.compress.stream`):
the calibration batches' first-block inputs are captured once; then, for each block, the
hidden states of the compressed path ``X`` and, where needed, of the full-precision path
``X_f`` are pushed through that block only. Within a block the layers are compressed in
steps (:func:`~saekit.compress.lowrank.compression_groups`); for each step the block runs
on every batch with hooks that accumulate float64 statistics (:mod:`saekit.compress.stats`),
shared by layers that read one input. The full-precision path runs through an untouched
copy of the current block (or the given ``teacher``'s block), never a copy of the model.

Block forwards per block and batch: 1 when only full-precision statistics are needed
(svd, asvd, svdllm), ``G + 1`` with compressed-path statistics only, ``2G + 1`` with both
(saes, svdllm with ``update_u``), for ``G`` steps per block (2 with ``order="block"``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from saekit.compress.config import CompressConfig
from saekit.compress.factor import (
    asvd_factor,
    rank_for_ratio,
    saes_factor,
    saves_params,
    svd_factor,
    svdllm_update_u,
)
from saekit.compress.lowrank import (
    LowRankLinear,
    block_of,
    compression_groups,
    count_params,
    dense_weight,
    find_linear_layers,
    get_module,
    layer_kind,
    set_module,
)
from saekit.compress.memory import PeakMemory
from saekit.compress.stats import GroupStats, LayerStatsView
from saekit.compress.stream import ActivationCache, BlockStream, relative_name
from saekit.errors import ConfigError


@dataclass
class LayerReport:
    """What happened to one layer."""

    shape: tuple[int, int]  # [out, in]
    rank: int  # 0 = kept dense
    params_before: int
    params_after: int
    kind: str = "mlp"  # attn | mlp
    rel_err: float | None = None  # ‖(W − AB)X‖² / ‖WX‖² on the inputs it was fitted to
    rel_err_fp: float | None = None  # ‖ABX − W X_f‖² / ‖W X_f‖² (both paths known)
    beta: float | None = None
    rho: float | None = None  # exact retained-energy ratio at β
    rho0: float | None = None  # at β = 0
    beta_max: float | None = None  # ACES/grid range is [0, beta_max]
    beta_capped: bool | None = None  # β at the cap
    beta_closed_form: float | None = None  # the paper's frozen-subspace formula
    rho_closed_form: float | None = None
    beta_grid: float | None = None  # best β of the check grid
    rho_grid: float | None = None
    ridge: float | None = None
    seconds: float = 0.0  # factorisation time
    block: int = -1


@dataclass
class BlockReport:
    """Cost of one block: wall time, peak memory and what was held."""

    index: int
    seconds: float
    forwards: int  # block forward passes (one per batch each)
    peak_bytes: int | None  # see peak_kind
    peak_kind: str  # cuda (device allocator) | rss (whole process) | none
    cache_bytes: int  # cached hidden states (all paths)
    stats_bytes: int  # float64 statistics of the largest step


@dataclass
class CompressResult:
    """The compressed model (modified in place) and per-layer and per-block reports."""

    model: nn.Module
    config: CompressConfig
    layers: dict[str, LayerReport]
    params_before: int
    params_after: int
    blocks: list[BlockReport] = field(default_factory=list)
    block_forwards: int = 0

    def summary(self) -> dict:
        d = {
            "config": asdict(self.config),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "block_forwards": self.block_forwards,
            "layers": {k: asdict(v) for k, v in self.layers.items()},
            "blocks": [asdict(b) for b in self.blocks],
        }
        agree = aces_agreement(self.layers)
        if agree:
            d["aces_vs_grid"] = agree
        return d


def aces_agreement(layers: dict[str, LayerReport]) -> dict:
    """ACES's β and ρ against the check grid's, over layers (ρ gap > 0: the grid did better)."""
    rows = [v for v in layers.values() if v.beta is not None and v.rho_grid is not None]
    if not rows:
        return {}
    db = [abs(v.beta - v.beta_grid) for v in rows]  # type: ignore[operator]
    drho = [v.rho_grid - v.rho for v in rows]  # type: ignore[operator]
    return {
        "layers": len(rows),
        "capped": sum(bool(v.beta_capped) for v in rows),
        "mean_beta": sum(v.beta for v in rows) / len(rows),  # type: ignore[misc]
        "mean_abs_beta_diff": sum(db) / len(db),
        "max_abs_beta_diff": max(db),
        "mean_rho_gap": sum(drho) / len(drho),
        "max_rho_gap": max(drho),
    }


def _quad(E: Tensor, H: Tensor) -> float:
    """tr(E H Eᵀ)."""
    return float(((E @ H) * E).sum())


def layer_rank(cfg: CompressConfig, name: str, shape: tuple[int, int]) -> int:
    """The uniform rank of a layer: ``cfg.rank`` or from its kind's ratio."""
    m, n = shape
    if cfg.rank > 0:
        return min(cfg.rank, m, n)
    return rank_for_ratio(m, n, cfg.ratio_for(layer_kind(name)))


def compress_layer(
    W: Tensor, st: LayerStatsView | None, cfg: CompressConfig, r: int, name: str = ""
) -> tuple[Tensor, Tensor, LayerReport]:
    """Factor one ``[out, in]`` weight at rank ``r`` with the configured method (float64)."""
    t0 = time.perf_counter()
    m, n = W.shape
    rep = LayerReport(
        shape=(m, n), rank=r, params_before=m * n, params_after=r * (m + n), kind=layer_kind(name)
    )
    Wd = W.double()
    if cfg.method == "svd":
        A, B = svd_factor(Wd, r)
    elif cfg.method == "asvd":
        A, B = asvd_factor(Wd, st.abs_mean, r, cfg.alpha)  # type: ignore[union-attr,arg-type]
    else:
        saes = cfg.method == "saes"
        A, B, info = saes_factor(
            Wd,
            st.H,  # type: ignore[union-attr,arg-type]
            st.delta if saes else None,  # type: ignore[union-attr]
            r,
            beta=cfg.beta_value() if saes else 0.0,
            ridge=cfg.ridge,
            auto_ridge=cfg.auto_ridge,
            beta_max=cfg.beta_max,
            shrink=cfg.shrink,
            grid=cfg.grid if saes else 0,
            aces_method=cfg.aces,
            name=name,
        )
        rep.ridge = info.ridge
        if cfg.update_u:
            A = svdllm_update_u(Wd, B, st.H_student, cfg.ridge)  # type: ignore[union-attr,arg-type]
        if saes:
            rep.beta, rep.rho, rep.rho0 = info.beta, info.rho, info.rho0
            rep.beta_grid, rep.rho_grid = info.beta_grid, info.rho_grid
            rep.beta_max = cfg.beta_max
            rep.beta_capped = cfg.beta_max > 0 and info.beta >= cfg.beta_max - 1e-12
            if info.aces is not None:
                rep.beta_closed_form = info.aces.beta_closed_form
                rep.rho_closed_form = info.aces.rho_closed_form
    _errors(rep, Wd, A @ B, st)
    rep.seconds = time.perf_counter() - t0
    return A, B, rep


def _errors(rep: LayerReport, Wd: Tensor, AB: Tensor, st: LayerStatsView | None) -> None:
    """Relative errors on the compressed-path inputs (else the fitted ones) and against W X_f."""
    if st is None:
        return
    H = st.H_student if st.H_student is not None else st.H
    if H is None:
        return
    rep.rel_err = _quad(Wd - AB, H) / max(_quad(Wd, H), 1e-300)
    if st.delta is not None and st.fp_target is not None and st.H_student is not None:
        Hs = st.H_student
        cross = float(((Wd @ (Hs + st.delta)) * AB).sum())  # tr(W X X_fᵀ... ) = ⟨ABX, WX_f⟩
        rep.rel_err_fp = (_quad(AB, Hs) - 2 * cross + st.fp_target) / max(st.fp_target, 1e-300)


def _capture_inputs(
    block: nn.Module, names: list[str], want_out: dict[str, Tensor] | None, stop: bool
) -> tuple[dict[str, Tensor], list]:
    """Hooks storing the inputs of ``names`` (relative to ``block``) in a dict; with
    ``want_out`` also Σ‖y − b‖² of their outputs (into ``want_out``); ``stop``: cut the
    forward once everything asked for is recorded."""
    got: dict[str, Tensor] = {}
    handles = []

    def pre(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            got[name] = args[0].detach()
            if stop and want_out is None and len(got) == len(names):
                raise _StopBlock

        return hook

    def post(name: str) -> Callable:
        def hook(mod: nn.Module, _a: tuple, out: Tensor) -> None:
            y = out.detach().double()
            bias = getattr(mod, "bias", None)
            if bias is not None:
                y = y - bias.detach().double()
            want_out[name] = float((y * y).sum())  # type: ignore[index]
            if stop and len(want_out) == len(names):  # type: ignore[arg-type]
                raise _StopBlock

        return hook

    for n in names:
        mod = block.get_submodule(n)
        handles.append(mod.register_forward_pre_hook(pre(n)))
        if want_out is not None:
            handles.append(mod.register_forward_hook(post(n)))
    return got, handles


class _StopBlock(Exception):
    pass


class _Pipeline:
    """State of one :func:`compress_model` run (kept small: one block at a time)."""

    def __init__(
        self,
        model: nn.Module,
        cfg: CompressConfig,
        names: list[str],
        ranks: dict[str, int],
        teacher: nn.Module | None,
        progress: Callable[[str], None] | None,
    ) -> None:
        self.model, self.cfg, self.names, self.ranks = model, cfg, names, ranks
        self.teacher, self.progress = teacher, progress
        self.stream = BlockStream(model, names, cfg.device or None, cfg.cache, cfg.cache_dir)
        self.student_path = cfg.needs_student()
        self.teacher_path = cfg.needs_teacher() and self.student_path
        self.reports: dict[str, LayerReport] = {}
        self.blocks: list[BlockReport] = []
        self.mem = PeakMemory(self.stream.device)

    def run(self, batches: list) -> None:
        X = self.stream.capture(batches)
        Xf = X.copy() if self.teacher_path else None
        for i in range(len(self.stream.blocks)):
            X, Xf = self.block(i, X, Xf)

    def _pass(
        self,
        i: int,
        block: nn.Module,
        X: ActivationCache,
        names: list[str],
        tblock: nn.Module | None,
        Xf: ActivationCache | None,
        advance_teacher: bool,
    ) -> GroupStats:
        """One step's statistics: ``block`` on ``X`` and ``tblock`` on ``Xf`` (the latter's
        outputs replace ``Xf`` batch by batch when ``advance_teacher``)."""
        cfg = self.cfg
        sizes = {n: dense_weight(block.get_submodule(n)).shape[1] for n in names}
        fp_only = tblock is None and not self.student_path
        gs = GroupStats(
            sizes,
            want_student=self.student_path,
            want_teacher=fp_only or (tblock is not None and not cfg.is_sequential()),
            want_delta=cfg.method == "saes",
            want_abs=cfg.method == "asvd",
        )
        for b in range(len(X)):
            xs = xfs = None
            outs: dict[str, float] | None = None
            if fp_only:  # the untouched block on the full-precision path: also its output
                xfs, hs = _capture_inputs(block, names, None, stop=False)
                try:
                    X.put(b, self.stream.forward(block, i, b, X.get(b)))
                finally:
                    for h in hs:
                        h.remove()
            else:
                xs, hs = _capture_inputs(block, names, None, stop=True)
                try:
                    self.stream.forward(block, i, b, X.get(b))
                except _StopBlock:
                    pass
                finally:
                    for h in hs:
                        h.remove()
                if tblock is not None:
                    outs = {}
                    xfs, hs = _capture_inputs(tblock, names, outs, stop=not advance_teacher)
                    try:
                        y = self.stream.forward(tblock, i, b, Xf.get(b))  # type: ignore[union-attr]
                        Xf.put(b, y)  # type: ignore[union-attr]
                    except _StopBlock:
                        pass
                    finally:
                        for h in hs:
                            h.remove()
            gs.add_batch(xs, xfs, outs)
        return gs

    def _teacher_block(self, i: int, block: nn.Module) -> nn.Module | None:
        if not self.teacher_path:
            return None
        if self.teacher is not None:
            return self.teacher.get_submodule(self.stream.blocks[i]).to(self.stream.device)
        return copy.deepcopy(block)

    @torch.no_grad()
    def block(
        self, i: int, X: ActivationCache, Xf: ActivationCache | None
    ) -> tuple[ActivationCache, ActivationCache | None]:
        t0, f0 = time.perf_counter(), self.stream.forwards
        self.mem.reset()
        bname = self.stream.blocks[i]
        block = self.stream.block(i)
        home = next(block.parameters()).device
        block.to(self.stream.device)
        full = [n for n in self.names if block_of(n) == bname]
        layers = [relative_name(bname, n) for n in full]
        tblock = self._teacher_block(i, block) if layers else None
        stats_bytes = 0
        if not self.student_path:  # full-precision statistics: one pass, then compress all
            groups = [layers] if layers else []
        else:
            groups = [
                [relative_name(bname, n) for n in g]
                for g in compression_groups(full, self.cfg.order)
            ]
        for g, names in enumerate(groups):
            last = g == len(groups) - 1
            gs = self._pass(i, block, X, names, tblock, Xf, advance_teacher=last)
            stats_bytes = max(stats_bytes, gs.nbytes())
            path = "student" if self.cfg.is_sequential() else "teacher"
            for n in names:
                self._compress(block, bname, n, gs.view(n, path), i)
            del gs
        if self.student_path or not groups:  # push the compressed path through the block
            for b in range(len(X)):
                X.put(b, self.stream.forward(block, i, b, X.get(b)))
        if Xf is not None and (tblock is None or not groups):
            src = block if tblock is None else tblock
            for b in range(len(Xf)):
                Xf.put(b, self.stream.forward(src, i, b, Xf.get(b)))
        if self.teacher is not None and tblock is not None:
            tblock.to(home)
        del tblock
        block.to(home)
        self.blocks.append(
            BlockReport(
                index=i,
                seconds=time.perf_counter() - t0,
                forwards=self.stream.forwards - f0,
                peak_bytes=self.mem.peak(),
                peak_kind=self.mem.kind,
                cache_bytes=X.nbytes() + (Xf.nbytes() if Xf is not None else 0),
                stats_bytes=stats_bytes,
            )
        )
        return X, Xf

    def _compress(
        self, block: nn.Module, bname: str, rel: str, st: LayerStatsView | None, i: int
    ) -> None:
        name = f"{bname}.{rel}"
        mod = block.get_submodule(rel)
        W = dense_weight(mod).detach()
        r = self.ranks[name]
        m, n = W.shape
        if r <= 0 or not saves_params(m, n, r):
            self.reports[name] = LayerReport((m, n), 0, m * n, m * n, layer_kind(name), block=i)
            return
        A, B, rep = compress_layer(W, st, self.cfg, r, name)
        rep.block = i
        bias = getattr(mod, "bias", None)
        new = LowRankLinear.from_factors(A, B, None if bias is None else bias.detach(), W)
        set_module(block, rel, new)
        self.reports[name] = rep
        if self.progress:
            err = "" if rep.rel_err is None else f", rel_err={rep.rel_err:.4g}"
            beta = "" if rep.beta is None else f", β={rep.beta:.3f}"
            self.progress(f"{name}: {rep.shape} -> rank {rep.rank}{err}{beta}")


def compress_model(
    model: nn.Module,
    cfg: CompressConfig,
    batches: list[Tensor] | list[dict] | None = None,
    teacher: nn.Module | None = None,
    progress: Callable[[str], None] | None = None,
    ranks: dict[str, int] | None = None,
) -> CompressResult:
    """Replace the model's block linears by :class:`LowRankLinear` (in place), in order.

    ``batches`` (token-id tensors or kwargs dicts) are the calibration data; required for all
    methods but ``svd``. ``teacher``: an untouched full-precision model with the same blocks
    whose blocks carry the full-precision path (default: a copy of the current block only).
    ``ranks``: per-layer ranks (e.g. from :func:`saekit.compress.allocate.sensitivity_ranks`;
    default: the config's uniform ranks). Layers whose rank saves no parameters stay dense.
    The model keeps its dtype; statistics and factorisations are float64.
    """
    names = find_linear_layers(model, cfg.include or None, cfg.exclude or None)
    if not names:
        raise ConfigError("no nn.Linear/Conv1D layers inside numbered blocks to compress")
    if cfg.method != "svd" and not batches:
        raise ConfigError(f"method {cfg.method!r} needs calibration batches")
    params_before = count_params(model)
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    shapes = {n: tuple(dense_weight(get_module(model, n)).shape) for n in names}
    all_ranks = {n: layer_rank(cfg, n, shapes[n]) for n in names}  # type: ignore[arg-type]
    all_ranks.update(ranks or {})
    pipe = _Pipeline(model, cfg, names, all_ranks, teacher, progress)
    if cfg.method == "svd":  # data-free: no forward passes
        with torch.no_grad():
            for n in names:
                blk = block_of(n)
                pipe._compress(get_module(model, blk), blk, relative_name(blk, n), None, -1)  # type: ignore[arg-type]
    else:
        pipe.run(list(batches))  # type: ignore[arg-type]
    model.train(was_training)
    return CompressResult(
        model,
        cfg,
        {n: pipe.reports[n] for n in names},
        params_before,
        count_params(model),
        pipe.blocks,
        pipe.stream.forwards,
    )
