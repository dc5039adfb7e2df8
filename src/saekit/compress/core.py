"""Layer-by-layer low-rank compression of a transformer: SVD, ASVD, SVD-LLM, SAES-SVD.

Calibration statistics are streamed: for each step (a group of layers, see
:func:`~saekit.compress.lowrank.compression_groups`) the calibration batches are run one at
a time, forward pre-hooks capture the group's inputs of that batch only, and float64 sums
``H = Σ x xᵀ``, ``Δ = Σ (x_f − x) xᵀ``, ``Σ|x|`` are accumulated; the forward stops after
the group's last layer. SAES-SVD runs the compressed *student* and the untouched
full-precision *teacher* on the same batch to pair ``x`` with ``x_f``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from saekit.compress.factor import (
    METHODS,
    asvd_factor,
    rank_for_ratio,
    saes_factor,
    svd_factor,
)
from saekit.compress.lowrank import (
    LowRankLinear,
    compression_groups,
    count_params,
    dense_weight,
    find_linear_layers,
    get_module,
    set_module,
)
from saekit.errors import ConfigError


@dataclass
class CompressConfig:
    """How to compress: method, ratio and the per-method options."""

    method: str = field(default="saes", metadata={"help": "svd | asvd | svdllm | saes"})
    ratio: float = field(
        default=0.4,
        metadata={"help": "fraction of each layer's parameters removed; r = ⌊mn(1−ratio)/(m+n)⌋"},
    )
    rank: int = field(default=0, metadata={"help": "fixed rank for every layer (0 = from ratio)"})
    alpha: float = field(default=0.5, metadata={"help": "ASVD exponent: S_jj = mean|x_j|^alpha"})
    ridge: float = field(
        default=1e-6,
        metadata={"help": "Cholesky ridge λ relative to mean(diag H) (SVD-LLM, SAES-SVD)"},
    )
    auto_ridge: bool = field(
        default=False, metadata={"help": "raise the ridge ×10 until Cholesky succeeds"}
    )
    beta: str = field(
        default="aces",
        metadata={"help": "SAES-SVD β: a number in [0,1), 'aces' (closed form) or 'grid'"},
    )
    beta_max: float = field(default=0.9, metadata={"help": "ACES cap on β"})
    shrink: float = field(default=1.0, metadata={"help": "ACES shrinkage: β ← shrink·β"})
    grid: int = field(
        default=21, metadata={"help": "grid points of the ρ(β) search checked against ACES"}
    )
    order: str = field(
        default="block",
        metadata={"help": "block: q/k/v/gate/up then o/down per block; layer: one at a time"},
    )
    sequential: str = field(
        default="auto",
        metadata={
            "help": "statistics from the already-compressed model: auto (only saes), true, false"
        },
    )
    include: str = field(default="", metadata={"help": "regex: only layers whose name matches"})
    exclude: str = field(default="", metadata={"help": "regex: skip layers whose name matches"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.order not in ("block", "layer"):
            raise ConfigError(f"order must be 'block' or 'layer', got {self.order!r}")
        if str(self.sequential).lower() not in ("auto", "true", "false"):
            raise ConfigError(f"sequential must be auto/true/false, got {self.sequential!r}")
        self.beta_value()

    def beta_value(self) -> float | str:
        b = str(self.beta)
        if b in ("aces", "grid"):
            return b
        try:
            v = float(b)
        except ValueError:
            raise ConfigError(f"beta must be a number, 'aces' or 'grid'; got {b!r}") from None
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"β must be in [0, 1), got {v}")
        return v

    def is_sequential(self) -> bool:
        s = str(self.sequential).lower()
        return self.method == "saes" if s == "auto" else s == "true"


@dataclass
class LayerStats:
    """Streaming float64 input statistics of one layer."""

    n: int
    H: Tensor | None = None  # Σ x xᵀ (inputs as the statistics model sees them)
    delta: Tensor | None = None  # Σ (x_f − x) xᵀ
    Hf: Tensor | None = None  # Σ x_f x_fᵀ
    abs_sum: Tensor | None = None  # Σ |x|
    count: int = 0

    def add(self, x: Tensor, xf: Tensor | None) -> None:
        x = x.reshape(-1, self.n).double()
        if self.H is None:
            self.H = torch.zeros(self.n, self.n, dtype=torch.float64, device=x.device)
            self.abs_sum = torch.zeros(self.n, dtype=torch.float64, device=x.device)
        self.H.addmm_(x.T, x)
        self.abs_sum += x.abs().sum(0)  # type: ignore[operator]
        if xf is not None:
            xf = xf.reshape(-1, self.n).double()
            if self.delta is None:
                self.delta = torch.zeros_like(self.H)
                self.Hf = torch.zeros_like(self.H)
            self.delta.addmm_((xf - x).T, x)
            self.Hf.addmm_(xf.T, xf)  # type: ignore[union-attr]
        self.count += x.shape[0]

    def mean(self, t: Tensor | None) -> Tensor | None:
        return None if t is None else t / max(self.count, 1)


class _Stop(Exception):
    pass


def _run_capture(model: nn.Module, batch: Tensor | dict, names: list[str]) -> dict[str, Tensor]:
    """Inputs of ``names`` on one batch; the forward is cut after the last of them fires."""
    got: dict[str, Tensor] = {}
    handles = []

    def make(name: str) -> Callable:
        def pre(_m: nn.Module, args: tuple) -> None:
            got[name] = args[0].detach()
            if len(got) == len(names):
                raise _Stop

        return pre

    for n in names:
        handles.append(get_module(model, n).register_forward_pre_hook(make(n)))
    try:
        with torch.no_grad():
            _forward(model, batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in got]
    if missing:
        raise RuntimeError(f"layers never ran during the forward pass: {missing}")
    return got


def _forward(model: nn.Module, batch: Tensor | dict) -> object:
    dev = next(model.parameters()).device
    if isinstance(batch, dict):
        return model(**{k: v.to(dev) for k, v in batch.items()})
    return model(batch.to(dev))


def collect_stats(
    stats_model: nn.Module,
    teacher: nn.Module | None,
    names: list[str],
    batches: Iterable[Tensor | dict],
) -> dict[str, LayerStats]:
    """Stream statistics of ``names`` over ``batches``; with a ``teacher``, also Δ and H_f."""
    stats = {n: LayerStats(dense_weight(get_module(stats_model, n)).shape[1]) for n in names}
    for batch in batches:
        xs = _run_capture(stats_model, batch, names)
        xfs = _run_capture(teacher, batch, names) if teacher is not None else {}
        for n in names:
            stats[n].add(xs[n], xfs.get(n))
    return stats


@dataclass
class LayerReport:
    """What happened to one layer."""

    shape: tuple[int, int]  # [out, in]
    rank: int
    params_before: int
    params_after: int
    rel_err: float | None = None  # ‖(W − AB)X‖² / ‖WX‖² on the statistics used
    rel_err_fp: float | None = None  # ‖ABX − W X_f‖² / ‖W X_f‖² (SAES-SVD only)
    beta: float | None = None
    rho: float | None = None
    rho0: float | None = None
    beta_grid: float | None = None
    rho_grid: float | None = None
    ridge: float | None = None


@dataclass
class CompressResult:
    """The compressed model (modified in place) and per-layer reports."""

    model: nn.Module
    config: CompressConfig
    layers: dict[str, LayerReport]
    params_before: int
    params_after: int

    def summary(self) -> dict:
        d = {
            "config": asdict(self.config),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layers": {k: asdict(v) for k, v in self.layers.items()},
        }
        betas = [v for v in self.layers.values() if v.beta is not None and v.beta_grid is not None]
        if betas:
            d["aces_vs_grid"] = aces_agreement(self.layers)
        return d


def aces_agreement(layers: dict[str, LayerReport]) -> dict:
    """How close the ACES closed-form β is to the grid search, over layers."""
    rows = [v for v in layers.values() if v.beta is not None and v.beta_grid is not None]
    if not rows:
        return {}
    db = [abs(v.beta - v.beta_grid) for v in rows]  # type: ignore[operator]
    drho = [v.rho_grid - v.rho for v in rows]  # type: ignore[operator]
    return {
        "layers": len(rows),
        "mean_abs_beta_diff": sum(db) / len(db),
        "max_abs_beta_diff": max(db),
        "mean_rho_gap": sum(drho) / len(drho),
        "max_rho_gap": max(drho),
    }


def _quad(E: Tensor, H: Tensor) -> float:
    """tr(E H Eᵀ)."""
    return float(((E @ H) * E).sum())


def compress_layer(
    W: Tensor, st: LayerStats | None, cfg: CompressConfig, name: str = ""
) -> tuple[Tensor, Tensor, LayerReport]:
    """Factor one ``[out, in]`` weight with the configured method."""
    m, n = W.shape
    r = min(cfg.rank, m, n) if cfg.rank > 0 else rank_for_ratio(m, n, cfg.ratio)
    rep = LayerReport(shape=(m, n), rank=r, params_before=m * n, params_after=r * (m + n))
    Wd = W.double()
    H = st.mean(st.H) if st is not None else None
    if cfg.method == "svd":
        A, B = svd_factor(Wd, r)
    elif cfg.method == "asvd":
        A, B = asvd_factor(Wd, st.mean(st.abs_sum), r, cfg.alpha)  # type: ignore[union-attr,arg-type]
    else:
        delta = st.mean(st.delta) if cfg.method == "saes" else None  # type: ignore[union-attr]
        beta = cfg.beta_value() if cfg.method == "saes" else 0.0
        A, B, info = saes_factor(
            Wd,
            H,  # type: ignore[arg-type]
            delta,
            r,
            beta=beta,
            ridge=cfg.ridge,
            auto_ridge=cfg.auto_ridge,
            beta_max=cfg.beta_max,
            shrink=cfg.shrink,
            grid=cfg.grid if cfg.method == "saes" else 0,
            name=name,
        )
        rep.ridge = info.ridge
        if cfg.method == "saes":
            rep.beta, rep.rho, rep.rho0 = info.beta, info.rho, info.rho0
            rep.beta_grid, rep.rho_grid = info.beta_grid, info.rho_grid
    if H is not None:
        E = Wd - A @ B
        rep.rel_err = _quad(E, H) / max(_quad(Wd, H), 1e-300)
        if st is not None and st.delta is not None:
            Hf, D = st.mean(st.Hf), st.mean(st.delta)
            AB = A @ B
            # ‖ABX − W X_f‖² = tr(AB H ABᵀ) − 2 tr(AB (X X_fᵀ) Wᵀ) + tr(W H_f Wᵀ), X X_fᵀ = (Δ + H)ᵀ
            cross = float(((AB @ (D + H).T) * Wd).sum())  # type: ignore[operator]
            tgt = _quad(Wd, Hf)  # type: ignore[arg-type]
            rep.rel_err_fp = (_quad(AB, H) - 2 * cross + tgt) / max(tgt, 1e-300)
    return A, B, rep


def compress_model(
    model: nn.Module,
    cfg: CompressConfig,
    batches: list[Tensor] | list[dict] | None = None,
    teacher: nn.Module | None = None,
    progress: Callable[[str], None] | None = None,
) -> CompressResult:
    """Replace the model's block linears by :class:`LowRankLinear` (in place), in order.

    ``batches`` (token-id tensors or kwargs dicts) are the calibration data; required for all
    methods but ``svd``. ``teacher`` is the full-precision model (default: a deep copy made
    before any change) — used for SAES-SVD's Δ and for non-sequential statistics.
    """
    names = find_linear_layers(model, cfg.include or None, cfg.exclude or None)
    if not names:
        raise ConfigError("no nn.Linear/Conv1D layers inside numbered blocks to compress")
    if cfg.method != "svd" and not batches:
        raise ConfigError(f"method {cfg.method!r} needs calibration batches")
    params_before = count_params(model)
    seq = cfg.is_sequential()
    need_teacher = cfg.method == "saes" or (cfg.method != "svd" and not seq)
    if need_teacher and teacher is None:
        teacher = copy.deepcopy(model).eval()
    model.eval()
    reports: dict[str, LayerReport] = {}
    for group in compression_groups(names, cfg.order):
        stats: dict[str, LayerStats] = {}
        if cfg.method != "svd":
            if seq:
                t = teacher if cfg.method == "saes" else None
                stats = collect_stats(model, t, group, batches)  # type: ignore[arg-type]
            else:
                stats = collect_stats(teacher, None, group, batches)  # type: ignore[arg-type]
        for name in group:
            mod = get_module(model, name)
            W = dense_weight(mod).detach()
            A, B, rep = compress_layer(W, stats.get(name), cfg, name)
            bias = getattr(mod, "bias", None)
            new = LowRankLinear.from_factors(A, B, None if bias is None else bias.detach(), W)
            set_module(model, name, new)
            reports[name] = rep
            if progress:
                progress(f"{name}: {rep.shape} -> rank {rep.rank}, rel_err={rep.rel_err}")
    return CompressResult(model, cfg, reports, params_before, count_params(model))
