"""Options of low-rank compression: one dataclass, the source of the CLI flags and the JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from saekit.errors import ConfigError

METHODS = ("svd", "asvd", "svdllm", "saes")


def _opt(default, help_: str, **kw):
    return field(default=default, metadata={"help": help_, **kw})


@dataclass
class CompressConfig:
    """How to compress: method, ranks, per-method options, and how the pipeline streams."""

    method: str = _opt("saes", "svd | asvd | svdllm | saes", choices=METHODS)
    ratio: float = _opt(
        0.4, "fraction of each layer's parameters removed; r = ⌊mn(1−ratio)/(m+n)⌋ (0 = dense)"
    )
    ratio_attn: float = _opt(-1.0, "ratio for attention layers (-1 = --ratio)")
    ratio_mlp: float = _opt(-1.0, "ratio for MLP layers (-1 = --ratio)")
    rank: int = _opt(0, "fixed rank for every layer (0 = from the ratios)")
    allocation: str = _opt(
        "uniform",
        "uniform: every layer at its ratio; sensitivity: ASVD's per-layer search (calibration "
        "perplexity with one layer compressed, then a threshold meeting the parameter budget)",
        choices=("uniform", "sensitivity"),
    )
    sensitivity_seqs: int = _opt(8, "calibration sequences per sensitivity perplexity")
    alpha: float = _opt(0.5, "ASVD exponent: S_jj = mean|x_j|^alpha")
    ridge: float = _opt(1e-6, "Cholesky ridge λ relative to mean(diag H) (SVD-LLM, SAES-SVD)")
    auto_ridge: bool = _opt(False, "raise the ridge ×10 until Cholesky succeeds")
    update_u: bool = _opt(
        False,
        "SVD-LLM: after whitening, refit U in closed form on the compressed model's inputs "
        "(the SVD-LLM repository's whitening + update step)",
    )
    beta: str = _opt(
        "aces", "SAES-SVD β: a number in [0,1), 'aces' (maximise ρ(β)) or 'grid' (best grid β)"
    )
    beta_max: float = _opt(0.9, "β is searched in [0, beta_max] (ACES and grid)")
    shrink: float = _opt(1.0, "ACES guardrail: β ← shrink·β after the search")
    aces: str = _opt(
        "exact",
        "ACES search: exact (maximise the exact ρ) or closed_form (the paper's frozen-subspace "
        "formula alone)",
        choices=("exact", "closed_form"),
    )
    grid: int = _opt(11, "grid points of the exact ρ(β) reported per layer as a check (0 = off)")
    order: str = _opt(
        "block",
        "block: q/k/v/gate/up then o/down per block; layer: one layer at a time",
        choices=("block", "layer"),
    )
    sequential: str = _opt(
        "auto",
        "whiten by inputs from the already-compressed model: auto (saes only), true, false",
        choices=("auto", "true", "false"),
    )
    include: str = _opt("", "regex: only layers whose name matches")
    exclude: str = _opt("", "regex: skip layers whose name matches")
    device: str = _opt("", "device blocks run on, one at a time ('' = the model's)")
    cache: str = _opt(
        "cpu",
        "where cached block inputs live: cpu, disk or device",
        choices=("cpu", "disk", "device"),
    )
    cache_dir: str = _opt("", "directory for cache=disk ('' = the system temp directory)")

    def __post_init__(self) -> None:
        for f in self.__dataclass_fields__.values():
            choices = f.metadata.get("choices")
            if choices and str(getattr(self, f.name)).lower() not in choices:
                raise ConfigError(
                    f"{f.name} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}"
                )
        for name in ("ratio", "ratio_attn", "ratio_mlp"):
            v = getattr(self, name)
            if not (0.0 <= v < 1.0 or (name != "ratio" and v == -1.0)):
                raise ConfigError(f"{name} must be in [0, 1) (fraction removed), got {v}")
        if self.rank < 0:
            raise ConfigError(f"rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.beta_max < 1.0:
            raise ConfigError(f"beta_max must be in [0, 1), got {self.beta_max}")
        if not 0.0 <= self.shrink <= 1.0:
            raise ConfigError(f"shrink must be in [0, 1], got {self.shrink}")
        if self.method == "saes" and str(self.sequential).lower() == "false":
            raise ConfigError(
                "method saes needs statistics from the compressed model (Δ = (X_f − X)Xᵀ is 0 "
                "otherwise): use sequential auto/true, or method svdllm"
            )
        if self.update_u and self.method != "svdllm":
            raise ConfigError("update_u is SVD-LLM's step: use it with method svdllm")
        self.beta_value()

    def beta_value(self) -> float | str:
        """β as a float, or the search name ``"aces"`` / ``"grid"``."""
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

    def ratio_for(self, kind: str) -> float:
        """The ratio of a layer of ``kind`` (``"attn"`` or ``"mlp"``)."""
        v = self.ratio_attn if kind == "attn" else self.ratio_mlp
        return self.ratio if v == -1.0 else v

    def is_sequential(self) -> bool:
        """Whether the factorisation whitens by the compressed model's inputs."""
        s = str(self.sequential).lower()
        return self.method == "saes" if s == "auto" else s == "true"

    def needs_student(self) -> bool:
        """Statistics of the compressed path are needed."""
        return self.method != "svd" and (self.is_sequential() or self.update_u)

    def needs_teacher(self) -> bool:
        """Statistics of the full-precision path are needed."""
        if self.method == "svd":
            return False
        return self.method == "saes" or not self.is_sequential()
