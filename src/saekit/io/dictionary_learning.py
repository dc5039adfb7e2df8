"""dictionary_learning (saprmarks) checkpoints: ``ae.pt`` state dict + ``config.json``.

``ae.pt`` is read with ``torch.load(weights_only=True)``; ``config.json``'s
``trainer.dict_class`` names the dictionary class (else it is inferred from the keys):

==========================  =========================================================  ==========
class                       tensors                                                    saekit
==========================  =========================================================  ==========
``AutoEncoder``             ``encoder.weight [F,d]``, ``encoder.bias``,                relu
                            ``decoder.weight [d,F]``, ``bias [d]`` (= b_dec)
``AutoEncoderNew``          ``encoder.*``, ``decoder.weight``, ``decoder.bias``;       relu
                            no b_dec subtraction
``AutoEncoderTopK``         ``encoder.*``, ``decoder.weight``, ``b_dec``, ``k``,       topk
                            ``threshold`` (unused by its default encode)
``BatchTopKSAE``            as TopK; inference ``ReLU(pre) * 1[ReLU(pre) > theta]``    batchtopk
``MatryoshkaBatchTopKSAE``  ``W_enc [d,F]``, ``b_enc``, ``W_dec [F,d]``, ``b_dec``,    batchtopk,
                            ``k``, ``threshold``, ``group_sizes``                      matryoshka
``JumpReluAutoEncoder``     ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``,                jumprelu
                            ``threshold [F]``; no b_dec subtraction
``GatedAutoEncoder``        ``encoder.weight``, ``r_mag``, ``gate_bias``,              relu,
                            ``mag_bias``, ``decoder.weight``, ``decoder_bias``         gated
==========================  =========================================================  ==========

Codes equal the class's own ``encode`` on the loaded state dict (``from_pretrained``'s
optional decoder renormalisation of ``AutoEncoder`` is not applied; it rescales codes).
Matryoshka SAEs are BatchTopK at inference (every group active) with the ``matryoshka`` part
(:mod:`saekit.arch`; widths: the cumulative ``group_sizes``). Write: ``relu`` ->
``AutoEncoder``, ``topk`` -> ``AutoEncoderTopK``, ``jumprelu`` -> ``JumpReluAutoEncoder``,
gated ``relu`` -> ``GatedAutoEncoder``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.errors import FormatError
from saekit.io.atomic import atomic_path, read_json, torch_load_tensors, write_json
from saekit.io.formats import Format, register_format
from saekit.io.portable import Portable, refuse, with_b_dec_input
from saekit.sources.sites import parse_site

AE_FILE = "ae.pt"
CONFIG_FILE = "config.json"


def detect(p: Path) -> bool:
    if p.is_file():
        return p.name == AE_FILE
    return (p / AE_FILE).is_file()


def _trainer_cfg(d: Path) -> dict[str, Any]:
    cfg = read_json(d / CONFIG_FILE) if (d / CONFIG_FILE).is_file() else {}
    trainer = cfg.get("trainer") if isinstance(cfg, dict) else None
    out = dict(trainer) if isinstance(trainer, dict) else {}
    buffer = cfg.get("buffer") if isinstance(cfg, dict) else None
    if isinstance(buffer, dict) and "ctx_len" in buffer:
        out.setdefault("ctx_len", buffer["ctx_len"])
    return out


def _infer_class(sd: dict[str, Tensor], where: Path) -> str:
    keys = set(sd)
    if {"r_mag", "gate_bias", "mag_bias"} <= keys:
        return "GatedAutoEncoder"
    if "group_sizes" in keys:
        return "MatryoshkaBatchTopKSAE"
    if "W_enc" in keys and "threshold" in keys and "k" not in keys:
        return "JumpReluAutoEncoder"
    if "bias" in keys and "encoder.weight" in keys:
        return "AutoEncoder"
    if "decoder.bias" in keys:
        return "AutoEncoderNew"
    if "k" in keys:
        raise FormatError(
            f"{where}: a TopK-family state dict (AutoEncoderTopK or BatchTopKSAE, whose"
            f" encodes differ) without {CONFIG_FILE}; put the trainer's config.json beside it"
            " or pass hints={'dict_class': ...}"
        )
    raise FormatError(f"{where}: unrecognised dictionary_learning keys {sorted(keys)}")


def _get(sd: dict[str, Tensor], where: Path, *names: str) -> list[Tensor]:
    missing = [n for n in names if n not in sd]
    if missing:
        raise FormatError(f"{where}: missing tensors {missing} (has {sorted(sd)})")
    return [sd[n] for n in names]


def _meta(tc: dict[str, Any]) -> dict[str, Any]:
    layer = tc.get("layer")
    meta = {
        "model_name": tc.get("lm_name"),
        "hook_name": f"layers.{layer}.resid_post" if isinstance(layer, int) else None,
        "context_size": tc.get("ctx_len"),
        "dictionary_learning_class": tc.get("dict_class"),
        "submodule_name": tc.get("submodule_name"),
    }
    return {k: v for k, v in meta.items() if v is not None}


def read(p: Path, hints: dict[str, Any]) -> Portable:
    d = p.parent if p.is_file() else p
    path = d / AE_FILE
    sd = torch_load_tensors(path)
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise FormatError(f"{path}: expected a state dict of tensors")
    tc = _trainer_cfg(d)
    cls = hints.get("dict_class") or tc.get("dict_class") or _infer_class(sd, path)
    meta = {**_meta(tc), "dictionary_learning_class": cls}
    k = hints.get("k") or (int(sd["k"]) if "k" in sd else tc.get("k"))
    if cls in ("AutoEncoder", "AutoEncoderNew"):
        enc, b, dec = _get(sd, path, "encoder.weight", "encoder.bias", "decoder.weight")
        b_dec = _get(sd, path, "bias" if cls == "AutoEncoder" else "decoder.bias")[0]
        return Portable(
            "standard",
            enc.t().contiguous(),
            b,
            dec.t().contiguous(),
            b_dec,
            apply_b_dec_to_input=cls == "AutoEncoder",
            meta=meta,
        )
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        enc, b, dec, b_dec = _get(
            sd, path, "encoder.weight", "encoder.bias", "decoder.weight", "b_dec"
        )
        th = None
        if cls == "BatchTopKSAE":
            th = _get(sd, path, "threshold")[0].reshape(-1)[0].expand(enc.shape[0]).clone()
        arch = "topk" if cls == "AutoEncoderTopK" else "batchtopk"
        return Portable(
            arch, enc.t().contiguous(), b, dec.t().contiguous(), b_dec, th, k, meta=meta
        )
    if cls == "MatryoshkaBatchTopKSAE":
        W, b, Wd, b_dec, th = _get(sd, path, "W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        sizes = [int(g) for g in sd.get("group_sizes", torch.tensor([])).tolist()]
        meta["group_sizes"] = sizes
        th = th.reshape(-1)[0].expand(W.shape[1]).clone()
        widths = [int(w) for w in torch.tensor(sizes, dtype=torch.long).cumsum(0).tolist()]
        extra_cfg = {"matryoshka_widths": widths} if widths else {}
        return Portable("batchtopk", W, b, Wd, b_dec, th, k, meta=meta, cfg_extra=extra_cfg)
    if cls == "JumpReluAutoEncoder":
        W, b, Wd, b_dec, th = _get(sd, path, "W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        return Portable("jumprelu", W, b, Wd, b_dec, th, apply_b_dec_to_input=False, meta=meta)
    if cls == "GatedAutoEncoder":
        names = (
            "encoder.weight",
            "r_mag",
            "gate_bias",
            "mag_bias",
            "decoder.weight",
            "decoder_bias",
        )
        enc, r, bg, bm, dec, b_dec = _get(sd, path, *names)
        gated = Portable(
            "gated",
            enc.t().contiguous(),
            bm,
            dec.t().contiguous(),
            b_dec,
            extra={"r_mag": r, "b_gate": bg, "b_mag": bm},
            meta=meta,
        )
        return gated  # read as the relu rule with the gated part (saekit.arch.gated)
    raise FormatError(f"{path}: dictionary_learning class {cls!r} is not supported")


def write(p: Portable, out: Path) -> Path:
    refuse("dictionary_learning", p, ("standard", "topk", "jumprelu", "gated"))
    site = p.meta.get("hook_name") or ""
    try:
        layer: int | None = parse_site(str(site))[0]
    except ValueError:
        layer = None
    trainer: dict[str, Any] = {
        "activation_dim": p.d_in,
        "dict_size": p.d_sae,
        "lm_name": p.meta.get("model_name") or "",
        "layer": layer,
        "submodule_name": site,
    }
    if p.architecture == "standard":
        p = with_b_dec_input(p, True)
        sd = {
            "bias": p.b_dec,
            "encoder.weight": p.W_enc.t(),
            "encoder.bias": p.b_enc,
            "decoder.weight": p.W_dec.t(),
        }
        trainer.update(dict_class="AutoEncoder", trainer_class="StandardTrainer")
    elif p.architecture == "topk":
        if p.k is None:
            raise FormatError("a TopK SAE without k cannot be written for dictionary_learning")
        p = with_b_dec_input(p, True)
        sd = {
            "k": torch.tensor(int(p.k), dtype=torch.int),
            "threshold": torch.tensor(-1.0),
            "decoder.weight": p.W_dec.t(),
            "encoder.weight": p.W_enc.t(),
            "encoder.bias": p.b_enc,
            "b_dec": p.b_dec,
        }
        trainer.update(dict_class="AutoEncoderTopK", trainer_class="TopKTrainer", k=int(p.k))
    elif p.architecture == "gated":
        p = with_b_dec_input(p, True)
        sd = {
            "decoder_bias": p.b_dec,
            "encoder.weight": p.W_enc.t(),
            "r_mag": p.extra["r_mag"],
            "gate_bias": p.extra["b_gate"],
            "mag_bias": p.extra["b_mag"],
            "decoder.weight": p.W_dec.t(),
        }
        trainer.update(dict_class="GatedAutoEncoder", trainer_class="GatedSAETrainer")
    else:
        assert p.threshold is not None
        p = with_b_dec_input(p, False)
        sd = {"W_enc": p.W_enc, "b_enc": p.b_enc, "W_dec": p.W_dec, "b_dec": p.b_dec}
        sd["threshold"] = p.threshold
        trainer.update(dict_class="JumpReluAutoEncoder", trainer_class="JumpReluTrainer")
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / AE_FILE) as tmp:
        torch.save(clean, tmp)
    write_json(
        out / CONFIG_FILE, {"trainer": trainer, "buffer": {"ctx_len": p.meta.get("context_size")}}
    )
    return out


FORMAT = register_format(
    Format(
        "dictionary_learning",
        "dictionary_learning ae.pt + config.json",
        detect,
        read,
        write,
        gated=True,
    )
)
