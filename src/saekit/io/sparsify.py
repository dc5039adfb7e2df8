"""EleutherAI sparsify's ``SparseCoder`` directories: ``cfg.json`` + ``sae.safetensors``.

Layout (sparsify 1.x): ``cfg.json`` holds the ``SparseCoderConfig`` fields (``activation``,
``expansion_factor``, ``normalize_decoder``, ``num_latents``, ``k``, ``multi_topk``,
``skip_connection``, ``transcode``) and ``d_in``; ``sae.safetensors`` holds
``encoder.weight [F, d]``, ``encoder.bias [F]``, ``W_dec [F, d]``, ``b_dec [d]`` and, with
``skip_connection``, ``W_skip [d, d]``. Encoding is ``TopK(ReLU((x - b_dec) W^T + b))``
(no ``b_dec`` subtraction for transcoders), decoding ``z W_dec + b_dec`` (+ ``x W_skip^T``).
A directory is named after its hookpoint (``layers.6``, ``layers.6.mlp``, ``embed_tokens``);
a ``config.json`` one level up records the model and dataset of the training run.

Read: TopK SAEs, and transcoders (``layers.N.mlp_in`` -> ``layers.N.mlp_out``) and
skip-transcoders (``W_skip``) as saekit transcoders (:mod:`saekit.arch.transcoder`).
``groupmax`` activations are refused with a FormatError. Write: TopK-inference SAEs
(``saelens_architecture == "topk"``, unsigned).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from saekit.errors import FormatError
from saekit.io.atomic import load_tensors, read_json, save_tensors, write_json
from saekit.io.formats import Format, register_format
from saekit.io.portable import Portable, refuse, with_b_dec_input

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def detect(p: Path) -> bool:
    if p.is_file():
        return p.name == WEIGHTS_FILE and (p.parent / CFG_FILE).is_file()
    return (p / CFG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def hookpoint_site(hookpoint: str, transcode: bool) -> tuple[str | None, str | None]:
    """saekit ``(input site, output site)`` of a sparsify hookpoint (None: no saekit site)."""
    m = re.fullmatch(
        r"(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)[._](\d+)(\.mlp)?", hookpoint
    )
    if not m:
        return None, None
    layer, mlp = m.group(1), m.group(2)
    if not mlp:  # a transcoder of a whole block: its input to its output
        return f"layers.{layer}.resid_pre" if transcode else f"layers.{layer}.resid_post", (
            f"layers.{layer}.resid_post"
        )
    if transcode:
        return f"layers.{layer}.mlp_in", f"layers.{layer}.mlp_out"
    return f"layers.{layer}.mlp_out", f"layers.{layer}.mlp_out"


def read(p: Path, hints: dict[str, Any]) -> Portable:
    d = p.parent if p.is_file() else p
    cfg = read_json(d / CFG_FILE)
    if not isinstance(cfg, dict) or "d_in" not in cfg or "k" not in cfg:
        raise FormatError(f"{d / CFG_FILE}: not a sparsify cfg (needs d_in and k)")
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise FormatError(f"{d / CFG_FILE}: activation {act!r}; saekit reads sparsify topk only")
    w = load_tensors(d / WEIGHTS_FILE)
    missing = [n for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if n not in w]
    if missing:
        raise FormatError(
            f"{d / WEIGHTS_FILE}: missing {missing} (the file was saved without its decoder?)"
        )
    transcode = bool(cfg.get("transcode", False))
    if "W_skip" in w and not transcode:
        raise FormatError(
            f"{d / WEIGHTS_FILE}: a skip connection (W_skip) on an SAE that is not a transcoder;"
            " saekit has skip paths for transcoders only"
        )
    site_in, site_out = hookpoint_site(d.name, transcode)
    run = read_json(d.parent / "config.json") if (d.parent / "config.json").is_file() else {}
    run = run if isinstance(run, dict) else {}
    meta = {
        "model_name": hints.get("model") or run.get("model"),
        "hook_name": site_in,
        "hook_name_out": site_out if site_out != site_in else None,
        "dataset_path": run.get("dataset"),
        "context_size": run.get("ctx_len"),
        "sparsify_hookpoint": d.name,
        "transcoder": transcode,
    }
    return Portable(
        architecture="topk",
        W_enc=w["encoder.weight"].t().contiguous(),
        b_enc=w["encoder.bias"],
        W_dec=w["W_dec"],
        b_dec=w["b_dec"],
        k=int(hints.get("k") or cfg["k"]),
        apply_b_dec_to_input=not transcode,
        extra={"W_skip": w["W_skip"]} if "W_skip" in w else {},
        meta={k: v for k, v in meta.items() if v is not None},
    )


def write(p: Portable, out: Path) -> Path:
    refuse("sparsify", p, ("topk",), " (sparsify SparseCoders are TopK)")
    if p.k is None:
        raise FormatError("a TopK SAE without k cannot be written for sparsify")
    p = with_b_dec_input(p, True)
    norms = p.W_dec.float().norm(dim=1)
    cfg = {
        "activation": "topk",
        "expansion_factor": max(p.d_sae // p.d_in, 1),
        "normalize_decoder": bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-4)),
        "num_latents": p.d_sae,
        "k": int(p.k),
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": p.d_in,
    }
    weights = {
        "encoder.weight": p.W_enc.t(),
        "encoder.bias": p.b_enc,
        "W_dec": p.W_dec,
        "b_dec": p.b_dec,
    }
    save_tensors(out / WEIGHTS_FILE, weights, metadata={"format": "pt"})
    write_json(out / CFG_FILE, cfg)
    return out


FORMAT = register_format(
    Format("sparsify", "EleutherAI sparsify cfg.json + sae.safetensors", detect, read, write)
)
