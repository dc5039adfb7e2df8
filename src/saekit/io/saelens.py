"""The SAELens (v6) directory format: ``cfg.json`` + ``sae_weights.safetensors``.

Export: :func:`saelens_cfg` builds the SAELens fields of ``cfg.json`` for an SAE. The
weights are folded (``SAE.folded_weights``), so ``normalize_activations`` is always
``"none"``. The architecture comes from the rule's ``saelens_architecture``; rules with a
threshold at inference (JumpReLU, BatchTopK) export as ``"jumprelu"`` with a per-latent
``threshold`` tensor.

Import: :func:`sae_from_saelens` builds a saekit SAE from a plain SAELens directory (no
``saekit`` section): ``standard`` -> relu, ``topk`` -> topk (``k`` from the cfg),
``jumprelu`` -> jumprelu (``log_threshold = log(threshold)``), ``batchtopk`` -> batchtopk.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import Tensor

from saekit.config import SAEConfig
from saekit.errors import FormatError
from saekit.sae import SAE

#: written as ``metadata.sae_lens_version``: the cfg follows the SAELens 6 layout
SAELENS_FORMAT_VERSION = "6.0.0"

SUPPORTED_ARCHITECTURES = ("standard", "topk", "jumprelu", "batchtopk")


def _layer_of(site: str) -> int | None:
    m = re.search(r"(?:layers|blocks|layer|h)\.(\d+)", site)
    return int(m.group(1)) if m else None


def saelens_cfg(sae: SAE, site: str = "", model: str = "", data: dict | None = None) -> dict:
    """SAELens ``cfg.json`` fields for ``sae`` (weights folded, so no normalisation)."""
    import saekit

    cfg = sae.cfg
    arch = sae.rule.saelens_architecture
    out: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if arch == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    if sae.rule.signed:
        warnings.warn(
            f"rule {cfg.rule!r} has signed codes; SAELens's {arch!r} inference applies a ReLU,"
            " so only saekit reproduces this SAE exactly",
            stacklevel=3,
        )
    data = data or {}
    out["metadata"] = {
        "model_name": model or data.get("model") or None,
        "hook_name": site or None,
        "hook_layer": _layer_of(site) if site else None,
        "hook_head_index": None,
        "context_size": data.get("context_len"),
        "prepend_bos": True,
        "exclude_special_tokens": data.get("exclude_special"),
        "dataset_path": data.get("dataset") or None,
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "saekit_version": saekit.__version__,
        "saekit_rule": cfg.rule,
    }
    return out


def _get(cfg: dict, key: str, default: Any = None) -> Any:
    """A field from the top level, else from ``metadata`` (v6) or ``meta`` (early v6)."""
    if key in cfg:
        return cfg[key]
    for sec in ("metadata", "meta"):
        if isinstance(cfg.get(sec), dict) and key in cfg[sec]:
            return cfg[sec][key]
    return default


def saekit_config_from_saelens(cfg: dict, k: int | None = None) -> SAEConfig:
    """The SAEConfig equivalent to a plain SAELens ``cfg.json``."""
    arch = cfg.get("architecture", "standard")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise FormatError(
            f"unsupported SAELens architecture {arch!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", False, None):
        raise FormatError(
            f"SAELens cfg has normalize_activations={norm!r}; only 'none' can be loaded"
            " (fold the scaling factor into the weights first)"
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise FormatError("SAELens topk cfg with rescale_acts_by_decoder_norm=true is unsupported")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise FormatError(f"SAELens cfg needs a positive integer {key!r}, got {cfg.get(key)!r}")
    rule = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}
    sae_cfg = SAEConfig(
        d_in=cfg["d_in"],
        d_sae=cfg["d_sae"],
        rule=rule[arch],
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        unit_norm_decoder=False,  # the loaded decoder is used as is
    )
    if arch in ("topk", "batchtopk"):
        kk = k if k is not None else cfg.get("k")
        if kk is None:
            raise FormatError(f"SAELens {arch} cfg has no 'k'; pass k=")
        if float(kk) != int(kk):
            raise FormatError(f"fractional k={kk} is not supported")
        sae_cfg.k = int(kk)
    return sae_cfg


def sae_from_saelens(cfg: dict, weights: dict[str, Tensor], k: int | None = None) -> SAE:
    """Build an SAE from a plain SAELens cfg dict and its ``sae_weights`` tensors."""
    sae_cfg = saekit_config_from_saelens(cfg, k)
    with torch.random.fork_rng(devices=[]):
        sae = SAE(sae_cfg)
    dtype = weights["W_enc"].dtype if "W_enc" in weights else torch.float32
    sae.to(dtype)
    state = {n: weights[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n in weights}
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(state)
    if missing:
        raise FormatError(f"SAELens weights lack {sorted(missing)}")
    if sae_cfg.rule == "jumprelu":
        if "threshold" in weights:
            th = weights["threshold"].to(dtype)
            state["rule.log_threshold"] = th.clamp_min(0).log()
        elif "log_threshold" in weights:
            state["rule.log_threshold"] = weights["log_threshold"]
        else:
            raise FormatError("SAELens jumprelu weights lack 'threshold'")
    elif sae_cfg.rule == "batchtopk":
        for key in ("topk_threshold", "threshold"):
            if key in weights:
                state["rule.threshold"] = weights[key].reshape(-1)[0].reshape(())
                break
    load_state(sae, state, strict=False, where="SAELens weights")
    return sae


def load_state(sae: SAE, state: dict[str, Tensor], strict: bool, where: str) -> None:
    """Copy ``state`` into ``sae`` checking every shape; ``strict``: every entry present."""
    own = sae.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise FormatError(f"{where}: unexpected tensors {unknown}")
    if strict:
        missing = sorted(set(own) - set(state))
        if missing:
            raise FormatError(f"{where}: missing tensors {missing}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(own[name].shape):
            hint = ""
            if name in ("W_enc", "W_dec", "b_dec"):
                hint = f" (cfg says d_in={sae.d_in}, d_sae={sae.d_sae})"
            raise FormatError(
                f"{where}: {name} has shape {tuple(t.shape)}, expected"
                f" {tuple(own[name].shape)}{hint}"
            )
    sae.load_state_dict(state, strict=False)


def log10_density(freq: Tensor, eps: float = 1e-10) -> Tensor:
    """``log10(density + eps)``, SAELens's ``sparsity`` convention."""
    return torch.log10(freq.detach().float().cpu() + eps)


def density_from_log10(sparsity: Tensor, eps: float = 1e-10) -> Tensor:
    return (10.0**sparsity - eps).clamp_min(0.0)


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "log10_density",
    "sae_from_saelens",
    "saekit_config_from_saelens",
    "saelens_cfg",
]
