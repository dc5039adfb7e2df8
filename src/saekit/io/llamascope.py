"""Llama Scope SAEs (OpenMOSS lm-saes): ``hyperparams.json`` + ``checkpoints/final.safetensors``.

The weights are ``encoder.weight [F, d]``, ``encoder.bias``, ``decoder.weight [d, F]``,
``decoder.bias``; ``hyperparams.json`` gives ``d_model``, ``d_sae``, ``hook_point_in`` /
``hook_point_out`` (TransformerLens names), ``act_fn`` (``jumprelu``),
``jump_relu_threshold`` (one scalar) and ``dataset_average_activation_norm`` ``{"in",
"out"}`` (inputs were scaled to norm ``sqrt(d_model)`` in training).

saekit reads them as SAELens converts them [our choice: the peer's conversion]: with
``s = sqrt(d_model) / norm_in`` (or a registry's ``norm_scaling_factor``), JumpReLU on
``x (s W_enc) + b_enc`` with threshold ``s * jump_relu_threshold`` on every latent, no
``b_dec`` subtraction, decoder ``W_dec / s``, ``b_dec / s``. ``topk`` checkpoints read as
TopK with ``top_k``. Write: JumpReLU SAEs with one threshold for every latent (and ReLU as
threshold 0), with ``norm_in = sqrt(d)`` so that ``s = 1``.

The later Llama Scope R1-Distill layout (format ``llamascope_r1``, read only): ``config.json``
(``d_model``, ``expansion_factor``, ``hook_point_in``) + ``sae_weights.safetensors`` with the
same four tensors and ``log_jumprelu_threshold [F]``; read as SAELens converts it: threshold
``exp(log_jumprelu_threshold)`` on ``x (s W_enc) + b_enc`` (``s``: the registry's
``norm_scaling_factor``, SAELens's ``expected_average_only_in`` fold), decoder ``/ s``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from saekit.errors import FormatError
from saekit.io.atomic import load_tensors, read_json, save_tensors, write_json
from saekit.io.formats import Format, register_format
from saekit.io.portable import Portable, refuse, with_b_dec_input
from saekit.sources.sites import canonical_site, transformer_lens_name

HPARAMS = "hyperparams.json"
WEIGHTS = Path("checkpoints") / "final.safetensors"


def _root(p: Path) -> Path:
    if p.is_file():
        return p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return p


def detect(p: Path) -> bool:
    r = _root(p)
    return (r / HPARAMS).is_file() and (r / WEIGHTS).is_file()


def read(p: Path, hints: dict[str, Any]) -> Portable:
    r = _root(p)
    hp = read_json(r / HPARAMS)
    if not isinstance(hp, dict) or "d_model" not in hp:
        raise FormatError(f"{r / HPARAMS}: not a Llama Scope hyperparams file (no d_model)")
    w = load_tensors(r / WEIGHTS)
    names = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
    missing = [n for n in names if n not in w]
    if missing:
        raise FormatError(f"{r / WEIGHTS}: missing {missing}")
    d = int(hp["d_model"])
    norm = hp.get("dataset_average_activation_norm") or {}
    norm_in = norm.get("in") if isinstance(norm, dict) else norm
    if hints.get("norm_scaling_factor"):
        s = float(hints["norm_scaling_factor"])
    elif hp.get("norm_activation", "dataset-wise") == "dataset-wise" and norm_in:
        s = math.sqrt(d) / float(norm_in)
    else:
        s = 1.0
    dt = w["encoder.weight"].dtype
    W_enc = (w["encoder.weight"].t().double() * s).to(dt)
    W_dec = (w["decoder.weight"].t().double() / s).to(dt)
    b_dec = (w["decoder.bias"].double() / s).to(dt)
    act = str(hp.get("act_fn", "jumprelu")).lower()
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out")
    meta = {
        "model_name": hints.get("model") or "meta-llama/Llama-3.1-8B",
        "hook_name": canonical_site(hook_in) if hook_in else None,
        "hook_name_out": canonical_site(hook_out) if hook_out and hook_out != hook_in else None,
        "llama_scope_norm_scaling_factor": s,
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    if act == "topk":
        k = hints.get("k") or hp.get("top_k")
        return Portable(
            "topk",
            W_enc,
            w["encoder.bias"],
            W_dec,
            b_dec,
            k=int(k),
            apply_b_dec_to_input=False,
            meta=meta,
        )
    if act != "jumprelu":
        raise FormatError(f"{r / HPARAMS}: act_fn {act!r}; saekit reads jumprelu and topk")
    th = torch.full((W_enc.shape[1],), float(hp["jump_relu_threshold"]) * s, dtype=dt)
    return Portable(
        "jumprelu",
        W_enc,
        w["encoder.bias"],
        W_dec,
        b_dec,
        threshold=th,
        apply_b_dec_to_input=False,
        meta=meta,
    )


def write(p: Portable, out: Path) -> Path:
    refuse("Llama Scope", p, ("jumprelu", "standard"), " (Llama Scope SAEs are JumpReLU)")
    th = p.threshold if p.threshold is not None else torch.zeros_like(p.b_enc)
    if not bool(torch.all(th == th.reshape(-1)[0])):
        raise FormatError(
            "Llama Scope holds one jump_relu_threshold for all latents; this SAE has per-latent"
            " thresholds (write it as saelens or gemmascope instead)"
        )
    p = with_b_dec_input(p, False)
    site = p.meta.get("hook_name") or ""
    try:
        hook = transformer_lens_name(str(site))
    except ValueError:
        hook = str(site)
    norms = p.W_dec.float().norm(dim=1)
    hp = {
        "d_model": p.d_in,
        "d_sae": p.d_sae,
        "expansion_factor": max(p.d_sae // p.d_in, 1),
        "hook_point_in": hook,
        "hook_point_out": hook,
        "act_fn": "jumprelu",
        "jump_relu_threshold": float(th.reshape(-1)[0]),
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": math.sqrt(p.d_in), "out": math.sqrt(p.d_in)},
        "sparsity_include_decoder_norm": bool(
            torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
        ),
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
    }
    weights = {
        "encoder.weight": p.W_enc.t(),
        "encoder.bias": p.b_enc,
        "decoder.weight": p.W_dec.t(),
        "decoder.bias": p.b_dec,
    }
    save_tensors(out / WEIGHTS, weights)
    write_json(out / HPARAMS, hp)
    return out


FORMAT = register_format(
    Format(
        "llamascope",
        "Llama Scope hyperparams.json + checkpoints/final.safetensors",
        detect,
        read,
        write,
    )
)

R1_CONFIG, R1_WEIGHTS = "config.json", "sae_weights.safetensors"


def detect_r1(p: Path) -> bool:
    r = p.parent if p.is_file() else p
    if not ((r / R1_CONFIG).is_file() and (r / R1_WEIGHTS).is_file()):
        return False
    try:
        cfg = read_json(r / R1_CONFIG)
    except ValueError:
        return False
    return isinstance(cfg, dict) and "d_model" in cfg and "expansion_factor" in cfg


def read_r1(p: Path, hints: dict[str, Any]) -> Portable:
    r = p.parent if p.is_file() else p
    cfg = read_json(r / R1_CONFIG)
    w = load_tensors(r / R1_WEIGHTS)
    names = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
    missing = [n for n in (*names, "log_jumprelu_threshold") if n not in w]
    if missing:
        raise FormatError(f"{r / R1_WEIGHTS}: missing {missing}")
    if not hints.get("norm_scaling_factor"):
        raise FormatError(
            f"{r}: a Llama Scope R1-Distill SAE needs its norm_scaling_factor (kept in SAELens's"
            " registry, not in the files): load it as saelens:llama_scope_r1_distill/<SAE_ID>"
        )
    s = float(hints["norm_scaling_factor"])
    dt = w["encoder.weight"].dtype
    hook = cfg.get("hook_point_in")
    meta = {
        "model_name": hints.get("model") or "meta-llama/Llama-3.1-8B",
        "hook_name": canonical_site(hook) if hook else None,
        "llama_scope_norm_scaling_factor": s,
    }
    return Portable(
        "jumprelu",
        (w["encoder.weight"].t().double() * s).to(dt),
        w["encoder.bias"],
        (w["decoder.weight"].t().double() / s).to(dt),
        (w["decoder.bias"].double() / s).to(dt),
        threshold=w["log_jumprelu_threshold"].double().exp().to(dt),
        apply_b_dec_to_input=False,
        meta={k: v for k, v in meta.items() if v is not None},
    )


R1_FORMAT = register_format(
    Format(
        "llamascope_r1",
        "Llama Scope R1-Distill config.json + sae_weights.safetensors (JumpReLU)",
        detect_r1,
        read_r1,
    )
)
