"""Plain ``torch.save`` tensor dicts: Goodfire SAEs and Qwen-Scope files.

Both are read with ``torch.load(weights_only=True)`` (tensors only, never unpickled) and
told apart by their keys. Goodfire (``Llama-3.1-8B-Instruct-SAE-l19.pth``):
``encoder_linear.weight [F, d]``, ``encoder_linear.bias``, ``decoder_linear.weight [d, F]``,
``decoder_linear.bias``; ``ReLU(x W_e^T + b_e)``, no ``b_dec`` subtraction; the model and
layer come from the file name (``<model>-SAE-l<L>`` -> ``layers.L.resid_post``). The
DeepSeek-R1 SAEs (``DeepSeek-R1-Distill-Llama-8B-SAE-l19.pt``) are ``nn.Linear`` pairs:
``encoder.weight [F, d]``, ``encoder.bias``, ``decoder.weight [d, F]``, ``decoder.bias``, read
as SAELens's ``deepseek_r1`` loader does (ReLU, no ``b_dec`` subtraction). Qwen-Scope:
:mod:`saekit.io.qwenscope`. Write: ``goodfire`` (ReLU SAEs), ``qwenscope`` (TopK SAEs).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor

from saekit.errors import FormatError
from saekit.io import qwenscope
from saekit.io.atomic import atomic_path, torch_load_tensors
from saekit.io.formats import Format, register_format
from saekit.io.portable import Portable, refuse, with_b_dec_input
from saekit.sources.sites import parse_site

GOODFIRE_KEYS = (
    "encoder_linear.weight",
    "encoder_linear.bias",
    "decoder_linear.weight",
    "decoder_linear.bias",
)
LINEAR_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
SUFFIXES = (".pt", ".pth")


def save_tensor_dict(path: Path, obj: dict[str, Tensor]) -> None:
    """Atomically ``torch.save`` a dict of (contiguous CPU) tensors."""
    import torch

    clean = {k: v.detach().cpu().contiguous().clone() for k, v in obj.items()}
    with atomic_path(path) as tmp:
        torch.save(clean, tmp)


def detect(p: Path) -> bool:
    return p.is_file() and p.suffix in SUFFIXES


#: Hugging Face organisation of the models in ``<model>-SAE-l<L>`` file names
ORGS = {"Llama": "meta-llama", "DeepSeek": "deepseek-ai"}


def goodfire_meta(path: Path) -> dict[str, Any]:
    m = re.search(r"([A-Za-z0-9.\-]+?)-SAE-l(\d+)", path.name)
    if not m:
        return {}
    model = m.group(1)
    org = next((o for prefix, o in ORGS.items() if model.startswith(prefix)), None)
    return {
        "model_name": f"{org}/{model}" if org else model,
        "hook_name": f"layers.{m.group(2)}.resid_post",
    }


def read(p: Path, hints: dict[str, Any]) -> Portable:
    obj = torch_load_tensors(p)
    if isinstance(obj, dict) and all(isinstance(obj.get(n), Tensor) for n in GOODFIRE_KEYS):
        enc, b, dec, b_dec = (obj[n] for n in GOODFIRE_KEYS)
        meta = {"format": "goodfire", **goodfire_meta(p)}
        return Portable(
            "standard",
            enc.t().contiguous(),
            b,
            dec.t().contiguous(),
            b_dec,
            apply_b_dec_to_input=False,
            meta=meta,
        )
    if isinstance(obj, dict) and all(isinstance(obj.get(n), Tensor) for n in LINEAR_KEYS):
        enc, b, dec, b_dec = (obj[n] for n in LINEAR_KEYS)  # DeepSeek-R1 SAEs (qresearch)
        return Portable(
            "standard",
            enc.t().contiguous(),
            b,
            dec.t().contiguous(),
            b_dec,
            apply_b_dec_to_input=False,
            meta={"format": "torch", **goodfire_meta(p)},
        )
    if qwenscope.is_qwenscope(obj):
        return qwenscope.portable(obj, p, hints.get("k"))
    have = sorted(obj)[:12] if isinstance(obj, dict) else type(obj).__name__
    raise FormatError(
        f"{p}: a torch file that is neither a Goodfire SAE ({', '.join(GOODFIRE_KEYS)}), a"
        f" DeepSeek-R1 SAE ({', '.join(LINEAR_KEYS)}) nor a Qwen-Scope SAE"
        f" ({', '.join(qwenscope.KEYS)}); it has {have}"
    )


def write_goodfire(p: Portable, out: Path) -> Path:
    refuse("Goodfire", p, ("standard",), " (Goodfire SAEs are ReLU)")
    p = with_b_dec_input(p, False)
    if out.suffix not in SUFFIXES:
        try:
            layer = parse_site(str(p.meta.get("hook_name", "")))[0]
        except ValueError:
            layer = 0
        model = str(p.meta.get("model_name") or "model").split("/")[-1]
        out = out / f"{model}-SAE-l{layer}.pth"
    obj = {
        "encoder_linear.weight": p.W_enc.t(),
        "encoder_linear.bias": p.b_enc,
        "decoder_linear.weight": p.W_dec.t(),
        "decoder_linear.bias": p.b_dec,
    }
    save_tensor_dict(out, obj)
    return out


def _never(p: Path) -> bool:
    return False


register_format(Format("torch", "Goodfire .pth / Qwen-Scope .sae.pt tensor dicts", detect, read))
register_format(Format("goodfire", "Goodfire .pth (ReLU)", _never, read, write_goodfire))
register_format(
    Format("qwenscope", "Qwen-Scope layer{L}.sae.pt (TopK)", _never, read, qwenscope.write)
)
