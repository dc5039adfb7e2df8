"""Steering: edit SAE features at a hook site during forwards and generation.

Modes (applied at every position of every forward while the context is active):

- ``add``: ``h' = h + sum_i alpha_i d_i`` (Qwen-Scope steering; ``d_i`` is decoder row i in
  raw activation units, so ``alpha`` is in units of the feature's activation). Negative
  ``alpha`` suppresses; for signed (AbsTopK) SAEs both directions are meaningful.
- ``clamp``: ``h' = h + sum_i (v_i - f_i(h)) d_i``: feature i is set to ``v_i`` wherever it
  fires or not, keeping the SAE error term (negative ``v_i`` allowed for signed rules).
- ``ablate``: clamp to 0 (values ignored).
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
    decoder_directions,
    dense_codes,
    model_device,
    site_activations,
)
from saekit.errors import ConfigError, DataError
from saekit.sae import SAE
from saekit.sources.sites import hook_site, resolve_site

MODES = ("add", "clamp", "ablate")


@dataclass(frozen=True)
class FeatureEdit:
    """Feature index and its steering value (alpha for ``add``, target for ``clamp``)."""

    feature: int
    value: float = 0.0


def parse_feature_spec(spec: str) -> FeatureEdit:
    """``"12:4.0"`` -> ``FeatureEdit(12, 4.0)``; ``"12"`` -> value 0 (for ablation)."""
    parts = spec.split(":")
    try:
        if len(parts) == 1:
            return FeatureEdit(int(parts[0]), 0.0)
        if len(parts) == 2:
            return FeatureEdit(int(parts[0]), float(parts[1]))
    except ValueError:
        pass
    raise ConfigError(f"bad feature spec {spec!r}: expected INDEX:VALUE, e.g. 12:4.0 or 7:-2")


EditsLike = dict[int, float] | Iterable[FeatureEdit] | Iterable[tuple[int, float]]


def as_edits(edits: EditsLike) -> list[FeatureEdit]:
    if isinstance(edits, dict):
        return [FeatureEdit(int(k), float(v)) for k, v in edits.items()]
    out = []
    for e in edits:
        out.append(e if isinstance(e, FeatureEdit) else FeatureEdit(int(e[0]), float(e[1])))
    return out


def steering_fn(sae: SAE, edits: EditsLike, mode: str = "add") -> Callable[[Tensor], Tensor]:
    """The hidden-state transform ``h -> h'`` for ``edits`` (see the module doc)."""
    if mode not in MODES:
        raise ConfigError(f"unknown steering mode {mode!r}; use one of {', '.join(MODES)}")
    ed = as_edits(edits)
    if not ed:
        raise ConfigError("no features to steer")
    idx = check_features(sae, [e.feature for e in ed])
    dirs = decoder_directions(sae, idx)  # [n, d]
    vals = torch.tensor([0.0 if mode == "ablate" else e.value for e in ed])
    if mode == "add":
        delta = (vals[:, None].to(dirs) * dirs).sum(0)

        def add(h: Tensor) -> Tensor:
            return h + delta.to(h.device, h.dtype)

        return add

    def clamp(h: Tensor) -> Tensor:
        shape = h.shape
        with torch.no_grad():
            p = next(sae.parameters())
            codes = sae.encode(h.reshape(-1, shape[-1]).to(p.device, p.dtype)).to_dense()
            cur = codes[:, idx]  # [N, n]
            change = (vals.to(cur)[None, :] - cur) @ dirs.to(cur)  # [N, d]
        return h + change.reshape(shape).to(h.device, h.dtype)

    return clamp


@contextmanager
def steer(
    model: nn.Module, sae: SAE, site: str, edits: EditsLike, mode: str = "add"
) -> Iterator[None]:
    """Context manager: every forward of ``model`` inside it is steered at ``site``."""
    fn = steering_fn(sae, edits, mode)
    with hook_site(resolve_site(model, site), fn):
        yield


@torch.no_grad()
def generate(model: nn.Module, tok: Any, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy (deterministic) continuation of ``prompt``; only the new text is returned."""
    if not hasattr(model, "generate"):
        raise ConfigError(f"{type(model).__name__} cannot generate: a causal LM is needed")
    dev = model_device(model)
    enc = tok(prompt, return_tensors="pt")
    input_ids = enc["input_ids"].to(dev)
    if input_ids.shape[1] == 0:
        raise DataError("the prompt is empty after tokenization")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad if pad is not None else 0,
    )
    return str(tok.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))


def steer_compare(
    model: nn.Module,
    tok: Any,
    sae: SAE,
    site: str,
    prompt: str,
    edits: EditsLike,
    mode: str = "add",
    max_new_tokens: int = 20,
) -> dict[str, Any]:
    """Unsteered and steered greedy continuations of ``prompt``."""
    base = generate(model, tok, prompt, max_new_tokens)
    with steer(model, sae, site, edits, mode):
        steered = generate(model, tok, prompt, max_new_tokens)
    return {
        "prompt": prompt,
        "mode": mode,
        "edits": [(e.feature, e.value) for e in as_edits(edits)],
        "unsteered": base,
        "steered": steered,
    }


def top_features(
    sae: SAE,
    model: nn.Module,
    tok: Any,
    site: str,
    text: str | list[str],
    n: int = 10,
    by: str = "max",
    max_len: int = 128,
) -> list[dict[str, Any]]:
    """Features ranked by how strongly they fire on ``text`` (special tokens skipped).

    ``by="max"`` ranks by the largest ``|f_i|`` over tokens, ``by="mean"`` by the mean
    ``|f_i|`` over tokens. ``max`` keeps the sign of the extreme value (signed rules).
    """
    if by not in ("max", "mean"):
        raise ConfigError(f"unknown ranking {by!r}; use max or mean")
    texts = [text] if isinstance(text, str) else list(text)
    recs = site_activations(model, tok, site, texts, max_len=max_len)
    acts = torch.cat([r.acts[r.keep] for r in recs])
    if acts.shape[0] == 0:
        raise DataError("the text has no non-special tokens")
    codes = dense_codes(sae, acts)
    a = codes.abs()
    amax, arg = a.max(0)
    signed_max = codes.gather(0, arg[None])[0]
    mean = a.mean(0)
    fired = (codes != 0).sum(0)
    score = amax if by == "max" else mean
    order = torch.argsort(score, descending=True)[:n]
    return [
        {
            "feature": int(i),
            "max": float(signed_max[i]),
            "mean_abs": float(mean[i]),
            "fired_tokens": int(fired[i]),
        }
        for i in order
        if score[i] > 0
    ]
