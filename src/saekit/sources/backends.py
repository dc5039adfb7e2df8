"""Models from other libraries as activation sources: TransformerLens and nnsight.

:func:`adapt_model` turns a model passed in-process into what :class:`~saekit.sources.hf.
HFSource` drives (a module called as ``model(input_ids=..., attention_mask=...)`` with a
``config``, hookable sites and, for decoder LMs, ``.logits``), plus its tokenizer:

- a TransformerLens ``HookedTransformer``: wrapped in :class:`TransformerLensModel`; sites
  resolve to its hook points (``layers.3.resid_post`` is ``blocks.3.hook_resid_post``), so
  the activations are exactly the ones ``run_with_cache`` returns;
- a TransformerLens ``TransformerBridge`` or an nnsight ``LanguageModel``: both wrap a
  Hugging Face model, which is used directly (the bridge's ``original_model``, nnsight's
  ``_model``), with the wrapper's tokenizer;
- anything else: returned unchanged.

Neither library is imported here; they are recognised by their attributes.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from torch import Tensor, nn


class TransformerLensModel(nn.Module):
    """A ``HookedTransformer`` seen as a Hugging Face causal LM by saekit's sources."""

    def __init__(self, tl: nn.Module) -> None:
        super().__init__()
        self.tl = tl
        cfg = tl.cfg  # type: ignore[attr-defined]
        self.config = SimpleNamespace(
            num_hidden_layers=cfg.n_layers,
            max_position_embeddings=cfg.n_ctx,
            architectures=["HookedTransformerForCausalLM"],
            model_type="hooked_transformer",
            name_or_path=getattr(cfg, "model_name", ""),
        )

    @property
    def hook_dict(self) -> dict[str, nn.Module]:
        return self.tl.hook_dict  # type: ignore[attr-defined,no-any-return]

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any
    ) -> SimpleNamespace:
        return SimpleNamespace(logits=self.tl(input_ids, attention_mask=attention_mask))

    def get_input_embeddings(self) -> nn.Module:
        return self.tl.embed  # type: ignore[attr-defined,no-any-return]

    def get_output_embeddings(self) -> nn.Module:
        return self.tl.unembed  # type: ignore[attr-defined,no-any-return]


def is_hooked_transformer(model: Any) -> bool:
    return hasattr(model, "hook_dict") and hasattr(model, "blocks") and hasattr(model, "unembed")


def adapt_model(model: Any, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for the sources (see the module doc)."""
    if isinstance(model, TransformerLensModel):
        return model, tokenizer if tokenizer is not None else model.tl.tokenizer
    original = getattr(model, "original_model", None)  # TransformerLens TransformerBridge
    if isinstance(original, nn.Module):
        return original, tokenizer if tokenizer is not None else model.tokenizer
    inner = getattr(model, "_model", None)  # nnsight LanguageModel / NNsight
    if isinstance(inner, nn.Module) and type(model).__module__.startswith("nnsight"):
        return inner, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if is_hooked_transformer(model):
        return TransformerLensModel(model), tokenizer if tokenizer is not None else model.tokenizer
    return model, tokenizer


__all__ = ["TransformerLensModel", "adapt_model", "is_hooked_transformer"]
