"""SAE-regularised fine-tuning (SASFT, Qwen-Scope / Aatrox103/SASFT).

During fine-tuning, penalise chosen SAE features at a hook site:

    L_sasft = λ · Σ_t Σ_{j∈J} ReLU(pre_j(h_t) − μ̄_j) / (N_tokens · |J|)

over the selected tokens t (e.g. response tokens of samples whose language is not the
feature's language). ``pre_j(h) = x_in · W_enc[:, j] + b_enc[j]`` is the SAE's
*pre-activation* (no ReLU / TopK), computed with the SAE's own input convention (``x - b_dec``
when ``apply_b_dec_to_input``, ``input_scale`` when ``normalize_input``). μ̄_j is a reference
level (the feature's mean pre-activation on the target language; 0 gives "SASFT_zero").
Gradients flow into the model only: the SAE's tensors are detached (frozen).

Feature choice: :func:`monolinguality` computes ν_j^L = μ_j^L − mean_{L'≠L} μ_j^{L'} from
per-group mean codes (:func:`group_mean_codes`); take the top 1-2 per layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from saekit.apply.common import check_features, dense_codes, site_activations
from saekit.errors import ConfigError, DataError
from saekit.sae import SAE
from saekit.sources.sites import get_hidden, resolve_site


def sasft_loss(
    pre_acts: Tensor,
    feature_ids: Iterable[int] | Tensor | None,
    ref_levels: Tensor | float,
    token_mask: Tensor | None = None,
    lam: float = 1e-3,
) -> Tensor:
    """``λ · Σ_t Σ_j ReLU(pre_j − μ̄_j) / (N_tokens · |J|)`` over tokens where ``token_mask``.

    ``pre_acts [..., d_sae]`` with ``feature_ids`` selecting J, or ``[..., |J|]`` already
    selected when ``feature_ids`` is None. ``ref_levels``: a scalar, ``[|J|]`` or anything
    broadcastable to ``[..., |J|]`` (e.g. per-sample levels). ``token_mask [...]`` (bool or
    0/1; None = every token). No selected token gives 0 (still differentiable).
    """
    if feature_ids is not None:
        idx = torch.as_tensor(
            list(feature_ids) if not isinstance(feature_ids, Tensor) else feature_ids,
            dtype=torch.long,
            device=pre_acts.device,
        )
        if idx.numel() == 0:
            raise ConfigError("no SASFT features given")
        pre = pre_acts.index_select(-1, idx)
    else:
        pre = pre_acts
    ref = torch.as_tensor(ref_levels, dtype=pre.dtype, device=pre.device)
    excess = torch.relu(pre - ref)
    n_feat = pre.shape[-1]
    if token_mask is None:
        m = torch.ones(pre.shape[:-1], dtype=pre.dtype, device=pre.device)
    else:
        if token_mask.shape != pre.shape[:-1]:
            raise DataError(
                f"token_mask has shape {tuple(token_mask.shape)}, expected {tuple(pre.shape[:-1])}"
            )
        m = token_mask.to(pre.dtype)
    n_tok = m.sum()
    total = (excess * m[..., None]).sum()
    return lam * total / (n_tok.clamp_min(1) * n_feat)


def selected_pre_acts(sae: SAE, h: Tensor, features: Iterable[int]) -> Tensor:
    """Pre-activations of ``features`` for ``h [..., d_in]`` (grad flows into h, not the SAE)."""
    idx = check_features(sae, features)
    if h.shape[-1] != sae.d_in:
        raise DataError(f"hidden width {h.shape[-1]} but the SAE expects d_in={sae.d_in}")
    W = sae.W_enc.detach()[:, idx].to(h.dtype)
    b = sae.b_enc.detach()[idx].to(h.dtype)
    x = h * sae.input_scale.detach().to(h.dtype) if sae.cfg.normalize_input else h
    if sae.cfg.apply_b_dec_to_input:  # b_dec lives in SAE units
        x = x - sae.b_dec.detach().to(h.dtype)
    return x @ W + b


class SASFTRegularizer:
    """Hooks ``site`` of ``model``; after each forward ``.loss`` holds the SASFT term.

    Set ``token_mask [B, T]`` before a forward to choose the penalised tokens (None: all).
    ``ref``: μ̄ as a scalar, ``[|J|]`` or per-sample ``[B, 1, |J|]``. Use as a context
    manager or with :meth:`attach` / :meth:`detach`. ``mean_pre`` is the detached mean
    pre-activation of the features over the masked tokens (for monitoring).
    """

    def __init__(
        self,
        model: nn.Module,
        sae: SAE,
        site: str,
        features: Iterable[int],
        ref: Tensor | float = 0.0,
        lam: float = 1e-3,
    ) -> None:
        self.model, self.sae, self.site_name = model, sae, site
        self.features = check_features(sae, features)
        if not self.features:
            raise ConfigError("no SASFT features given")
        self.ref = ref
        self.lam = lam
        self.site = resolve_site(model, site)
        self.token_mask: Tensor | None = None
        self.loss: Tensor = torch.zeros(())
        self.mean_pre: Tensor = torch.zeros(len(self.features))
        self._handle: Any = None
        for p in sae.parameters():
            p.requires_grad_(False)

    def _hook(self, _m: nn.Module, args: tuple, kwargs_or_out: Any, *rest: Any) -> None:
        if self.site.pre:
            h = args[0] if args and isinstance(args[0], Tensor) else kwargs_or_out["hidden_states"]
        else:
            h = get_hidden(kwargs_or_out)
        pre = selected_pre_acts(self.sae, h, self.features)
        mask = self.token_mask
        if mask is not None:
            mask = mask.to(h.device)
        self.loss = sasft_loss(pre, None, self._ref_for(pre), mask, self.lam)
        with torch.no_grad():
            m = torch.ones(pre.shape[:-1], device=pre.device) if mask is None else mask.float()
            self.mean_pre = (pre.detach() * m[..., None]).sum(tuple(range(pre.dim() - 1))) / (
                m.sum().clamp_min(1)
            )

    def _ref_for(self, pre: Tensor) -> Tensor:
        return torch.as_tensor(self.ref, dtype=pre.dtype, device=pre.device)

    def attach(self) -> SASFTRegularizer:
        if self._handle is None:
            if self.site.pre:
                self._handle = self.site.module.register_forward_pre_hook(
                    self._hook, with_kwargs=True
                )
            else:
                self._handle = self.site.module.register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> SASFTRegularizer:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()


class SASFTTrainerMixin:
    """``compute_loss`` mixin for ``transformers.Trainer``: adds the SASFT term to the loss.

    ``class MyTrainer(SASFTTrainerMixin, Trainer)``; pass ``sasft=SASFTRegularizer(...)``
    to the constructor. Penalised tokens: ``inputs["sasft_mask"]`` when the collator supplies
    it (e.g. response tokens of off-language samples), else ``labels != -100``, else the
    attention mask. (A ``TrainerCallback`` cannot change the loss, hence a mixin.)
    """

    def __init__(self, *args: Any, sasft: SASFTRegularizer | None = None, **kwargs: Any) -> None:
        if sasft is None:
            raise ConfigError("SASFTTrainerMixin needs sasft=SASFTRegularizer(...)")
        self.sasft = sasft.attach()
        super().__init__(*args, **kwargs)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        inputs = dict(inputs)
        mask = inputs.pop("sasft_mask", None)
        if mask is None and inputs.get("labels") is not None:
            mask = inputs["labels"] != -100
        if mask is None:
            mask = inputs.get("attention_mask")
        self.sasft.token_mask = mask
        loss, outputs = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=True, **kwargs
        )
        loss = loss + self.sasft.loss.to(loss.device)
        return (loss, outputs) if return_outputs else loss


@torch.no_grad()
def mean_pre_activation(
    model: nn.Module,
    tok: Any,
    sae: SAE,
    site: str,
    texts: list[str],
    features: Iterable[int],
    max_len: int = 128,
) -> Tensor:
    """Mean pre-activation ``[|J|]`` of ``features`` over the (non-special) tokens of ``texts``."""
    feats = check_features(sae, features)
    recs = site_activations(model, tok, site, texts, max_len=max_len)
    acts = torch.cat([r.acts[r.keep] for r in recs])
    p = next(sae.parameters())
    return selected_pre_acts(sae, acts.to(p.device, p.dtype), feats).mean(0).cpu()


@torch.no_grad()
def group_mean_codes(
    sae: SAE,
    model: nn.Module,
    tok: Any,
    site: str,
    groups: dict[str, list[str]],
    max_len: int = 128,
) -> dict[str, Tensor]:
    """Mean code (post-activation) per feature over each group's tokens, ``{group: [d_sae]}``."""
    out = {}
    for name, texts in groups.items():
        recs = site_activations(model, tok, site, texts, max_len=max_len)
        out[name] = dense_codes(sae, torch.cat([r.acts[r.keep] for r in recs])).mean(0)
    return out


def monolinguality(means: dict[str, Tensor]) -> dict[str, Tensor]:
    """ν_j^L = μ_j^L − mean_{L'≠L} μ_j^{L'} for every group L."""
    if len(means) < 2:
        raise DataError("monolinguality needs at least two groups")
    names = list(means)
    stack = torch.stack([means[n] for n in names])
    total = stack.sum(0)
    return {n: stack[i] - (total - stack[i]) / (len(names) - 1) for i, n in enumerate(names)}
