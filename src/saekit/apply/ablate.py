"""Feature ablation: zero chosen SAE features at a site and measure the next-token loss change.

With ``keep_error=True`` (default) the site's hidden state becomes
``h' = x_hat_ablated + (h - x_hat) = h - sum_{i ablated} f_i d_i``: only the ablated
features' contribution is removed and the SAE's reconstruction error is kept, so ablating no
feature leaves the model unchanged. ``keep_error=False`` replaces ``h`` by ``x_hat_ablated``
(the spliced-in SAE, as in CE-loss-recovered evaluations).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saekit.apply.common import (
    check_features,
    encode_texts,
    model_device,
    next_token_loss,
    pad_batch,
)
from saekit.apply.steer import top_features
from saekit.errors import DataError
from saekit.options import Options, option
from saekit.sae import SAE, Codes
from saekit.sources.sites import hook_site, resolve_site


@dataclass
class AblateConfig(Options):
    """Which features :func:`ablation_effects` ablates and how (its keyword options)."""

    features: list[int] | None = option(
        None, "features to ablate (default: the top-n by firing)", metavar="F"
    )
    top_n: int = option(10, "without features: this many top features by firing", ge=1)
    keep_error: bool = option(True, "keep the SAE error term (see the module doc)")


def ablation_fn(
    sae: SAE, features: Iterable[int], keep_error: bool = True
) -> Callable[[Tensor], Tensor]:
    """The hidden-state transform that removes ``features`` (see the module doc)."""
    idx = check_features(sae, features)

    def fn(h: Tensor) -> Tensor:
        shape = h.shape
        with torch.no_grad():
            p = next(sae.parameters())
            x = h.reshape(-1, shape[-1]).to(p.device, p.dtype)
            codes = sae.encode(x)
            dense = codes.to_dense()
            x_hat = sae.decode(codes, like=x)
            if idx:
                dense = dense.clone()
                dense[:, idx] = 0
            x_abl = sae.decode(Codes(sae.d_sae, dense=dense), like=x)
            new = x_abl + (x - x_hat) if keep_error else x_abl
        return new.reshape(shape).to(h.device, h.dtype)

    return fn


@contextmanager
def ablate(
    model: nn.Module, sae: SAE, site: str, features: Iterable[int], keep_error: bool = True
) -> Iterator[None]:
    """Context manager: forwards of ``model`` inside it run with ``features`` ablated."""
    fn = ablation_fn(sae, features, keep_error)
    with hook_site(resolve_site(model, site), fn):
        yield


@torch.no_grad()
def mean_loss(model: nn.Module, tok: Any, texts: list[str], max_len: int = 128) -> float:
    """Token-weighted mean next-token loss of ``model`` over ``texts``."""
    dev = model_device(model)
    ids = [x for x in encode_texts(tok, texts, max_len) if len(x) > 1]
    if not ids:
        raise DataError("every text is shorter than 2 tokens: no next-token loss")
    total, count = 0.0, 0
    for b in range(0, len(ids), 8):
        chunk = ids[b : b + 8]
        input_ids, mask = pad_batch(chunk, dev)
        per_seq = next_token_loss(model, input_ids, mask)
        n = torch.tensor([len(x) - 1 for x in chunk], dtype=per_seq.dtype, device=per_seq.device)
        total += float((per_seq * n).sum())
        count += int(n.sum())
    return total / count


def ablation_effects(
    model: nn.Module,
    tok: Any,
    sae: SAE,
    site: str,
    texts: list[str],
    features: Iterable[int] | None = None,
    top_n: int = 10,
    keep_error: bool = True,
    max_len: int = 128,
) -> dict[str, Any]:
    """Next-token loss change when each feature is ablated on its own (and all together).

    ``features=None`` picks the ``top_n`` features by mean ``|f_i|`` over ``texts``.
    Returns ``{"clean_loss", "per_feature": [{feature, loss, delta}], "all": {...}}``; the
    per-feature list is sorted by ``delta`` (largest loss increase first).
    """
    if not texts:
        raise DataError("no texts given")
    if features is None:
        ranked = top_features(sae, model, tok, site, texts, n=top_n, by="mean", max_len=max_len)
        feats = [r["feature"] for r in ranked]
    else:
        feats = check_features(sae, features)
    if not feats:
        raise DataError("no features to ablate (none fired on the texts)")
    clean = mean_loss(model, tok, texts, max_len)
    rows = []
    for f in feats:
        with ablate(model, sae, site, [f], keep_error):
            loss = mean_loss(model, tok, texts, max_len)
        rows.append({"feature": f, "loss": loss, "delta": loss - clean})
    with ablate(model, sae, site, feats, keep_error):
        all_loss = mean_loss(model, tok, texts, max_len)
    rows.sort(key=lambda r: -r["delta"])
    return {
        "clean_loss": clean,
        "keep_error": keep_error,
        "per_feature": rows,
        "all": {"features": feats, "loss": all_loss, "delta": all_loss - clean},
    }
