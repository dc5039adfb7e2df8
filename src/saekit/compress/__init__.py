"""Activation-aware low-rank compression of transformer linear layers (not an SAE method).

Methods: plain truncated SVD, ASVD, SVD-LLM and SAES-SVD (CEALC + ACES); see
:mod:`saekit.compress.factor` for the maths, :mod:`saekit.compress.aces` for the choice of β
and :func:`compress_model` for the block-streamed pipeline. Compressed models are saved
with :func:`save_compressed` (safetensors + JSON + modeling code, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` rebuilds them) and
reloaded with :func:`load_compressed`.
"""

from saekit.compress.aces import AcesResult, aces_beta, grid_beta, retained_energy
from saekit.compress.config import METHODS, CompressConfig
from saekit.compress.core import (
    BlockReport,
    CompressResult,
    LayerReport,
    compress_layer,
    compress_model,
)
from saekit.compress.factor import (
    IllConditionedError,
    asvd_factor,
    cealc_objective,
    rank_for_ratio,
    saes_factor,
    svd_factor,
    svdllm_factor,
    svdllm_update_u,
)
from saekit.compress.io import load_compressed, save_compressed
from saekit.compress.lowrank import LowRankLinear, count_params, find_linear_layers
from saekit.compress.metrics import layer_output_errors, perplexity

__all__ = [
    "METHODS",
    "AcesResult",
    "BlockReport",
    "CompressConfig",
    "CompressResult",
    "IllConditionedError",
    "LayerReport",
    "LowRankLinear",
    "aces_beta",
    "asvd_factor",
    "cealc_objective",
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
    "svdllm_update_u",
]
