"""Evaluation of a compressed model: perplexity, per-layer output error, throughput, size."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saekit.compress.lowrank import get_module
from saekit.errors import DataError


def _logits(out: object) -> Tensor:
    return out.logits if hasattr(out, "logits") else out[0]  # type: ignore[index,attr-defined]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_context(model: nn.Module, default: int = 2048) -> int:
    """The model's full context length (``max_position_embeddings`` / ``n_positions``)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 1:
            return v
    return default


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Tensor]) -> float:
    """exp(mean next-token NLL) over every predicted token of the ``[B, T]`` id batches."""
    model.eval()
    dev = _device(model)
    nll, n = 0.0, 0
    for ids in batches:
        ids = ids.to(dev)
        logits = _logits(model(ids, use_cache=False)).float()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        n += ids[:, 1:].numel()
    if n == 0:
        raise DataError("perplexity needs at least one batch with 2+ tokens")
    return math.exp(nll / n)


@torch.no_grad()
def throughput(model: nn.Module, batches: list[Tensor], repeats: int = 2) -> dict:
    """Forward (prefill) tokens per second over ``batches``, best of ``repeats`` passes
    after one warm-up batch (synchronising CUDA)."""
    model.eval()
    dev = _device(model)
    if not batches:
        raise DataError("throughput needs at least one batch")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    model(batches[0].to(dev), use_cache=False)
    sync()
    best = math.inf
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        for ids in batches:
            model(ids.to(dev), use_cache=False)
        sync()
        best = min(best, time.perf_counter() - t0)
    tokens = sum(b.numel() for b in batches)
    return {"tokens": tokens, "seconds": best, "tokens_per_s": tokens / best}


@torch.no_grad()
def layer_output_errors(
    model: nn.Module, reference: nn.Module, names: list[str], batches: Iterable[Tensor]
) -> dict[str, float]:
    """Per layer ``‖y − y_ref‖² / ‖y_ref‖²`` of the layer outputs of ``model`` vs ``reference``
    on the same inputs (end to end: includes the error carried from earlier layers)."""
    num = dict.fromkeys(names, 0.0)
    den = dict.fromkeys(names, 0.0)
    for ids in batches:
        outs: list[dict[str, Tensor]] = []
        for mdl in (model, reference):
            got: dict[str, Tensor] = {}
            hs = [get_module(mdl, n).register_forward_hook(_keep(got, n)) for n in names]
            try:
                mdl(ids.to(_device(mdl)), use_cache=False)
            finally:
                for h in hs:
                    h.remove()
            outs.append(got)
        for n in names:
            y, yr = outs[0][n].double(), outs[1][n].double()
            num[n] += float(((y - yr) ** 2).sum())
            den[n] += float((yr**2).sum())
    return {n: num[n] / max(den[n], 1e-300) for n in names}


def _keep(store: dict[str, Tensor], name: str) -> Callable:
    def hook(_m: nn.Module, _a: tuple, out: Tensor) -> None:
        store[name] = out.detach()

    return hook
