"""Activation-aware low-rank compression of transformer linear layers (not an SAE method).

Methods: plain truncated SVD, ASVD, SVD-LLM and SAES-SVD (CEALC + ACES); see
:mod:`saekit.compress.factor` for the maths and :func:`compress_model` for the layer-by-layer
pipeline. Compressed models are saved with :func:`save_compressed` (safetensors + JSON) and
rebuilt with :func:`load_compressed`.
"""

from saekit.compress.core import (
    CompressConfig,
    CompressResult,
    LayerReport,
    collect_stats,
    compress_layer,
    compress_model,
)
from saekit.compress.factor import (
    METHODS,
    IllConditionedError,
    aces_beta,
    asvd_factor,
    grid_beta,
    rank_for_ratio,
    retained_energy,
    saes_factor,
    svd_factor,
    svdllm_factor,
)
from saekit.compress.io import load_compressed, save_compressed
from saekit.compress.lowrank import LowRankLinear, count_params, find_linear_layers
from saekit.compress.metrics import layer_output_errors, perplexity

__all__ = [
    "METHODS",
    "CompressConfig",
    "CompressResult",
    "IllConditionedError",
    "LayerReport",
    "LowRankLinear",
    "aces_beta",
    "asvd_factor",
    "collect_stats",
    "compress_layer",
    "compress_model",
    "count_params",
    "find_linear_layers",
    "grid_beta",
    "layer_output_errors",
    "load_compressed",
    "perplexity",
    "rank_for_ratio",
    "retained_energy",
    "saes_factor",
    "save_compressed",
    "svd_factor",
    "svdllm_factor",
]
