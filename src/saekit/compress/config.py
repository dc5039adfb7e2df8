"""Options of low-rank compression (saekit's config convention, :mod:`saekit.options`).

:class:`CompressConfig` is the method (what :func:`~saekit.compress.compress_model` does);
:class:`CompressRunConfig` is a ``saekit compress`` run around it (model, data, evaluation,
output). Each field is declared once; the CLI flags, the JSON in ``report.json`` and the
validation come from the declarations.
"""

from __future__ import annotations

from dataclasses import dataclass

from saekit.options import Options, fail, option

METHODS = ("svd", "asvd", "svdllm", "saes")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _beta_problem(v: str) -> str | None:
    if v in ("aces", "grid"):
        return None
    try:
        b = float(v)
    except ValueError:
        return "is neither a number nor 'aces' / 'grid'"
    return None if 0.0 <= b < 1.0 else "is outside β's range [0, 1) (β = α/(1+α))"


def _ratio(help_: str, default: float | None = None):
    return option(default, help_, ge=0.0, lt=1.0)


@dataclass
class CompressConfig(Options):
    """How to compress: method, ranks, per-method options, and how the pipeline streams."""

    method: str = option("saes", "svd | asvd | svdllm | saes", choices=METHODS)
    ratio: float = _ratio(
        "fraction of each layer's parameters removed; r = ⌊mn(1−ratio)/(m+n)⌋ (0 = dense)", 0.4
    )
    ratio_attn: float | None = _ratio("ratio for attention layers (unset: --ratio)")
    ratio_mlp: float | None = _ratio("ratio for MLP layers (unset: --ratio)")
    rank: int = option(0, "fixed rank for every layer (0 = from the ratios)", ge=0)
    allocation: str = option(
        "uniform",
        "uniform: every layer at its ratio; sensitivity: ASVD's per-layer search (calibration "
        "perplexity with one layer compressed, then a threshold meeting the parameter budget)",
        choices=("uniform", "sensitivity"),
    )
    sensitivity_seqs: int = option(8, "calibration sequences per sensitivity perplexity", ge=1)
    alpha: float = option(0.5, "ASVD exponent: S_jj = mean|x_j|^alpha", ge=0.0)
    ridge: float = option(
        1e-6, "Cholesky ridge λ relative to mean(diag H) (SVD-LLM, SAES-SVD)", ge=0.0
    )
    auto_ridge: bool = option(False, "raise the ridge ×10 until Cholesky succeeds")
    update_u: bool = option(
        False,
        "SVD-LLM: after whitening, refit U in closed form on the compressed model's inputs "
        "(the SVD-LLM repository's whitening + update step)",
    )
    beta: str = option(
        "aces",
        "SAES-SVD β: a number in [0,1), 'aces' (maximise ρ(β)) or 'grid' (best grid β)",
        check=_beta_problem,
    )
    beta_max: float = option(0.9, "β is searched in [0, beta_max] (ACES and grid)", ge=0.0, lt=1.0)
    shrink: float = option(1.0, "ACES guardrail: β ← shrink·β after the search", ge=0.0, le=1.0)
    aces: str = option(
        "exact",
        "ACES search: exact (maximise the exact ρ) or closed_form (the paper's frozen-subspace "
        "formula alone)",
        choices=("exact", "closed_form"),
    )
    grid: int = option(
        11, "grid points of the exact ρ(β) reported per layer as a check (0 = off)", ge=0
    )
    order: str = option(
        "block",
        "block: q/k/v/gate/up then o/down per block; layer: one layer at a time",
        choices=("block", "layer"),
    )
    sequential: str = option(
        "auto",
        "whiten by inputs from the already-compressed model: auto (saes only), true, false",
        choices=("auto", "true", "false"),
    )
    include: str = option("", "regex: only layers whose name matches")
    exclude: str = option("", "regex: skip layers whose name matches")
    device: str = option(
        "", "device blocks run on, one at a time ('' = the model's)", flag="block-device"
    )
    cache: str = option(
        "cpu",
        "where cached block inputs live: cpu, disk or device",
        choices=("cpu", "disk", "device"),
    )
    cache_dir: str = option("", "directory for cache=disk ('' = the system temp directory)")

    def check(self) -> None:
        if self.method == "saes" and self.sequential == "false":
            fail(
                "CompressConfig",
                "sequential",
                self.sequential,
                "turns SAES-SVD into SVD-LLM (Δ = (X_f − X)Xᵀ needs the compressed model)",
                "use sequential auto/true, or method svdllm",
            )
        if self.update_u and self.method != "svdllm":
            fail(
                "CompressConfig",
                "update_u",
                self.update_u,
                f"is SVD-LLM's step, not {self.method}'s",
                "use it with method svdllm",
            )

    def beta_value(self) -> float | str:
        """β as a float, or the search name ``"aces"`` / ``"grid"``."""
        return self.beta if self.beta in ("aces", "grid") else float(self.beta)

    def ratio_for(self, kind: str) -> float:
        """The ratio of a layer of ``kind`` (``"attn"`` or ``"mlp"``)."""
        v = self.ratio_attn if kind == "attn" else self.ratio_mlp
        return self.ratio if v is None else v

    def is_sequential(self) -> bool:
        """Whether the factorisation whitens by the compressed model's inputs."""
        return self.method == "saes" if self.sequential == "auto" else self.sequential == "true"

    def needs_student(self) -> bool:
        """Statistics of the compressed path are needed."""
        return self.method != "svd" and (self.is_sequential() or self.update_u)

    def needs_teacher(self) -> bool:
        """Statistics of the full-precision path are needed."""
        if self.method == "svd":
            return False
        return self.method == "saes" or not self.is_sequential()


@dataclass
class CompressRunConfig(Options):
    """A ``saekit compress`` run: the model, calibration and evaluation data, outputs."""

    model: str = option("", "local transformers causal-LM directory (or one saved by compress)")
    tokenizer: str = option("", "tokenizer directory ('' = --model)")
    out: str = option("", "output directory: the compressed model and report.json (table.json)")
    dataset: str = option(
        "",
        "text: '' (built-in pydoc corpus), a .txt/.jsonl file or a dataset directory; "
        "calibration from its training part, evaluation from its held-out part (every 10th "
        "document, saekit's one split)",
    )
    text_field: str = option("text", "JSONL / dataset field holding the text", nonempty=True)
    calib_seqs: int = option(64, "calibration sequences", ge=1)
    calib_seed: int | None = option(
        0, "seed drawing the calibration windows from the training text (unset: the first ones)"
    )
    seq_len: int = option(128, "tokens per calibration sequence", ge=2)
    batch_size: int = option(8, "sequences per forward pass", ge=1)
    eval_file: str = option(
        "", "a local text file for perplexity (read whole); '' = the held-out part of --dataset"
    )
    eval_seq_len: int = option(
        0, "tokens per perplexity window (0 = the model's full context)", ge=0
    )
    eval_seqs: int = option(0, "perplexity windows (0 = all)", ge=0)
    eval_batch_size: int = option(4, "windows per perplexity forward pass", ge=1)
    device: str = option("cpu", "device for evaluation and for the blocks during compression")
    dtype: str = option(
        "auto",
        "model dtype: auto = the checkpoint's on CUDA, float32 on CPU (bf16 matmuls are slow on "
        "CPUs), or float32 / bfloat16 / float16",
        choices=DTYPES,
    )
    throughput: bool = option(True, "measure forward throughput (tokens/s) before and after")
    table: bool = option(
        False, "compare methods × ratios × seeds instead of saving one model", switch=True
    )
    ratios: list[float] = option([0.2, 0.4, 0.6], "ratios for --table", nonempty=True)
    methods: list[str] = option(list(METHODS), "methods for --table", nonempty=True)
    seeds: list[int] = option([0], "calibration seeds for --table (mean ± sd)", nonempty=True)

    def check(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            fail("CompressRunConfig", "methods", bad, "are not methods", f"use {METHODS}")
