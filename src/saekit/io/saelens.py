"""The SAELens (v6) directory format: ``cfg.json`` + ``sae_weights.safetensors``.

Export: :func:`saelens_export` gives the SAELens fields of ``cfg.json`` and the tensors of
``sae_weights.safetensors`` for an SAE. The weights are folded (``SAE.folded_weights``), so
``normalize_activations`` is always ``"none"``. Everything rule-specific (architecture, extra
cfg fields such as ``k``, extra tensors such as ``threshold``) comes from the rule's
``saelens_export`` hook, which raises :class:`~saekit.errors.FormatError` when SAELens has
no equivalent; then the SAE's architecture parts (:mod:`saekit.arch`: ``gated``,
``transcoder``, ...) turn that export into theirs (or refuse the same way).

Import: :func:`sae_from_saelens` builds a saekit SAE from a plain SAELens directory (no
``saekit`` section): the rule whose ``saelens_imports`` names the architecture loads it
through its ``from_saelens`` hook (``standard`` -> relu, ``topk`` -> topk, ``jumprelu`` ->
jumprelu, ``batchtopk`` -> batchtopk, ``abstopk`` -> abstopk among the built-in rules).
First the architecture parts (:func:`saekit.arch.arch_from_saelens`) take what is theirs:
``gated`` becomes the relu rule with the ``gated`` part, ``matryoshka_widths`` (also in an
inference save's metadata) the ``matryoshka`` part, ``matryoshka_batchtopk`` then being
``batchtopk``. Then :func:`saekit.io.portable.canonical_saelens` folds
``rescale_acts_by_decoder_norm`` (SAELens's TopK default) and converts what no rule or part
claims exactly (``gated`` -> ``jumprelu``).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import Tensor

from saekit.arch import ArchImport, arch_from_saelens, arch_sites
from saekit.config import SAEConfig
from saekit.errors import FormatError
from saekit.rules.base import saelens_import_architectures, saelens_import_rule
from saekit.sae import SAE

#: written as ``metadata.sae_lens_version``: the cfg follows the SAELens 6 layout
SAELENS_FORMAT_VERSION = "6.0.0"


def supported_architectures() -> list[str]:
    """SAELens architectures some registered rule loads (or saekit converts exactly)."""
    from saekit.io.portable import CONVERTED

    return sorted({*saelens_import_architectures(), *CONVERTED})


def _layer_of(site: str) -> int | None:
    m = re.search(r"(?:layers|blocks|layer|h)\.(\d+)", site)
    return int(m.group(1)) if m else None


def saelens_export(
    sae: SAE, site: str = "", model: str = "", data: dict | None = None
) -> tuple[dict, dict[str, Tensor]]:
    """SAELens ``cfg.json`` fields and ``sae_weights`` tensors for ``sae`` (folded weights).

    Raises :class:`~saekit.errors.FormatError` when the rule refuses (no SAELens equivalent).
    """
    exp = sae.rule.saelens_export()
    weights = sae.folded_weights()
    clash = sorted(set(exp.tensors) & set(weights))
    if clash:
        raise FormatError(f"rule {sae.cfg.rule!r} exports tensors {clash} that clash with W/b")
    weights.update({k: v.detach().clone() for k, v in exp.tensors.items()})
    sae.arch.saelens_export(sae, exp, weights)  # architecture parts (saekit.arch), in place
    return _cfg(sae, exp.architecture, exp.cfg, site, model, data), weights


def saelens_cfg(sae: SAE, site: str = "", model: str = "", data: dict | None = None) -> dict:
    """SAELens ``cfg.json`` fields for ``sae`` (weights folded, so no normalisation)."""
    return saelens_export(sae, site, model, data)[0]


def base_cfg(sae: SAE, site: str = "", model: str = "", data: dict | None = None) -> dict:
    """The shared cfg fields for an SAE whose rule refused the export: the architecture is
    ``saekit.<rule>``, which SAELens refuses instead of loading it as something else."""
    return _cfg(sae, f"saekit.{sae.cfg.rule}", {}, site, model, data)


def _cfg(sae: SAE, arch: str, extra: dict, site: str, model: str, data: dict | None) -> dict:
    import saekit

    cfg = sae.cfg
    out: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
    }
    if sae.rule.signed and not arch.startswith("saekit.") and arch != "abstopk":
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
    if cfg.arch:
        out["metadata"]["saekit_arch"] = list(cfg.arch)
    ins, outs = arch_sites(cfg, site) if site else ([], [])
    if ins != outs and len(outs) == 1:  # a transcoder: where its prediction goes
        out["metadata"].update(hook_name_out=outs[0], hook_layer_out=_layer_of(outs[0]))
    return out


def _get(cfg: dict, key: str, default: Any = None) -> Any:
    """A field from the top level, else from ``metadata`` (v6) or ``meta`` (early v6)."""
    if key in cfg:
        return cfg[key]
    for sec in ("metadata", "meta"):
        if isinstance(cfg.get(sec), dict) and key in cfg[sec]:
            return cfg[sec][key]
    return default


def saekit_config_from_saelens(
    cfg: dict,
    k: int | None = None,
    weights: dict[str, Tensor] | None = None,
    parts: ArchImport | None = None,
) -> tuple[SAEConfig, dict[str, Tensor]]:
    """The SAEConfig equivalent to a plain SAELens ``cfg.json``, and the rule's own state
    (``rule.*`` tensors) from ``weights``; ``k`` overrides the cfg's; ``parts``: the
    architecture parts found in it (:func:`saekit.arch.arch_from_saelens`)."""
    arch = cfg.get("architecture", "standard")
    cls = saelens_import_rule(arch)
    if cls is None:
        raise FormatError(
            f"unsupported SAELens architecture {arch!r}; supported: "
            f"{', '.join(supported_architectures())}"
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
    fields, rule_state = cls.from_saelens(cfg if k is None else {**cfg, "k": k}, weights or {})
    base = {
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "rule": cls.name,
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
        "unit_norm_decoder": False,  # the loaded decoder is used as is
    }
    if parts is not None and parts.arch:
        base.update(arch=parts.arch, arch_options=parts.options)
        if isinstance(cfg.get("d_out"), int) and cfg["d_out"] != cfg["d_in"]:
            base["d_out"] = cfg["d_out"]  # a transcoder's target width
    sae_cfg = SAEConfig(**{**base, **fields})  # validated as a whole (k <= d_sae)
    return sae_cfg, {f"rule.{n}": t for n, t in rule_state.items()}


def sae_from_saelens(cfg: dict, weights: dict[str, Tensor], k: int | None = None) -> SAE:
    """Build an SAE from a plain SAELens cfg dict and its ``sae_weights`` tensors."""
    from saekit.io.portable import canonical_saelens

    parts = arch_from_saelens(cfg, weights)  # e.g. gated -> standard + the gated part
    cfg, weights = parts.cfg, parts.weights
    if cfg.get("architecture", "standard") not in supported_architectures():
        saekit_config_from_saelens(cfg, k, weights)  # raises: unsupported architecture
    cfg, weights = canonical_saelens(cfg, weights)
    sae_cfg, rule_state = saekit_config_from_saelens(cfg, k, weights, parts)
    with torch.random.fork_rng(devices=[]):
        sae = SAE(sae_cfg)
    dtype = weights["W_enc"].dtype if "W_enc" in weights else torch.float32
    sae.to(dtype)
    state = {n: weights[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n in weights}
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(state)
    if missing:
        raise FormatError(f"SAELens weights lack {sorted(missing)}")
    state.update({n: t.to(dtype) for n, t in {**rule_state, **parts.state}.items()})
    load_state(sae, state, strict=False, where="SAELens weights")
    return sae


def load_state(sae: SAE, state: dict[str, Tensor], strict: bool, where: str) -> None:
    """Copy ``state`` into ``sae`` checking every shape; ``strict``: every entry present."""
    own = sae.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise FormatError(f"{where}: unexpected tensors {unknown}")
    if strict:
        optional = {
            f"{mod}.{b}" if mod else b
            for mod, m in sae.named_modules()
            for b in getattr(m, "optional_state", ())
        }
        missing = sorted(set(own) - set(state) - optional)
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
    "base_cfg",
    "log10_density",
    "sae_from_saelens",
    "saekit_config_from_saelens",
    "saelens_cfg",
    "saelens_export",
    "supported_architectures",
]
