"""Named hook sites on Hugging Face transformer models.

A site is ``layers.{i}.{kind}`` with kind one of ``resid_pre`` (block input),
``resid_post`` (block output), ``mlp_in`` (the MLP's input, after its norm: what a
transcoder reads), ``mlp_out`` (the MLP's output before the residual add) and ``attn_out``
(the attention's output before the residual add). The block list is found
generically (the ``nn.ModuleList`` with ``num_hidden_layers`` entries), so BERT, GPT-2 and
Llama/Qwen-style models work, and most others. In transformers 5 a decoder block returns a
tensor, elsewhere a tuple: :func:`get_hidden` / :func:`with_hidden` accept both.

TransformerLens hook names are accepted as aliases (:func:`canonical_site`):
``blocks.N.hook_resid_pre`` / ``hook_resid_post`` / ``hook_mlp_out`` / ``hook_attn_out`` name
``layers.N.resid_pre`` / ``resid_post`` / ``mlp_out`` / ``attn_out``, and
``blocks.N.ln2.hook_normalized`` (the normalised MLP input, where SAELens's transcoders read)
names ``layers.N.mlp_in``; :func:`transformer_lens_name` goes the other way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

from saekit.errors import ConfigError

KINDS = ("resid_pre", "resid_post", "mlp_in", "mlp_out", "attn_out")
_SITE_RE = re.compile(r"^layers\.(\d+)\.(" + "|".join(KINDS) + r")$")
_TL_RE = re.compile(r"^blocks\.(\d+)\.hook_(" + "|".join(KINDS) + r")$")
#: TransformerLens names that are not ``hook_<kind>``: kind -> name after ``blocks.N.``
_TL_SPECIAL = {"mlp_in": "ln2.hook_normalized"}
_TL_SPECIAL_RE = re.compile(
    r"^blocks\.(\d+)\.(" + "|".join(re.escape(v) for v in _TL_SPECIAL.values()) + r")$"
)

# sub-module paths inside a block, tried in order
_SUBMODULES = {
    "mlp_out": ("mlp", "feed_forward", "ffn", "output.dense"),
    "mlp_in": ("mlp", "feed_forward", "ffn", "intermediate"),
    "attn_out": ("self_attn", "attn", "attention.output.dense", "self_attention", "attention"),
}


@dataclass(frozen=True)
class Site:
    """A resolved site: the module to hook, and whether to hook its input (``pre``)."""

    name: str
    layer: int
    kind: str
    module: nn.Module
    pre: bool  # True: the module's input (forward pre-hook); False: its output


def canonical_site(name: str) -> str:
    """``name`` with a TransformerLens hook name (``blocks.3.hook_resid_post``) translated."""
    m = _TL_RE.match(name)
    if m:
        return f"layers.{m.group(1)}.{m.group(2)}"
    m = _TL_SPECIAL_RE.match(name)
    if m:
        kind = next(k for k, v in _TL_SPECIAL.items() if v == m.group(2))
        return f"layers.{m.group(1)}.{kind}"
    return name


def transformer_lens_name(site: str) -> str:
    """The TransformerLens hook name of a saekit site (``layers.3.mlp_out`` ->
    ``blocks.3.hook_mlp_out``)."""
    layer, kind = parse_site(site)
    return f"blocks.{layer}.{_TL_SPECIAL.get(kind, 'hook_' + kind)}"


def parse_site(name: str) -> tuple[int, str]:
    m = _SITE_RE.match(canonical_site(name))
    if not m:
        raise ConfigError(
            f"bad hook site {name!r}: expected layers.<i>.<kind> with kind in {', '.join(KINDS)}"
            " (or a TransformerLens name such as blocks.<i>.hook_resid_post)"
        )
    return int(m.group(1)), m.group(2)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n is None:
        n = getattr(getattr(model, "config", None), "n_layer", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for ml in lists:
        if n is None or len(ml) == n:
            return ml
    raise ConfigError(f"could not find the transformer blocks of {type(model).__name__}")


def _get_path(mod: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        mod = getattr(mod, part, None)  # type: ignore[assignment]
        if not isinstance(mod, nn.Module):
            return None
    return mod


def resolve_site(model: nn.Module, name: str) -> Site:
    """Resolve ``layers.3.resid_post`` etc. to a module on ``model``; a model with
    TransformerLens hook points (``hook_dict``) resolves to the hook point itself."""
    layer, kind = parse_site(name)
    hooks = getattr(model, "hook_dict", None)
    if isinstance(hooks, dict) and transformer_lens_name(name) in hooks:
        return Site(name, layer, kind, hooks[transformer_lens_name(name)], pre=False)
    blocks = find_blocks(model)
    if layer >= len(blocks):
        raise ConfigError(
            f"site {name!r}: the model has {len(blocks)} layers (0..{len(blocks) - 1})"
        )
    block = blocks[layer]
    if kind in ("resid_pre", "resid_post"):
        return Site(name, layer, kind, block, pre=kind == "resid_pre")
    for path in _SUBMODULES[kind]:
        sub = _get_path(block, path)
        if sub is not None:
            return Site(name, layer, kind, sub, pre=kind == "mlp_in")
    raise ConfigError(f"site {name!r}: no {kind} sub-module found in {type(block).__name__}")


def get_hidden(output: object) -> Tensor:
    """The hidden-state tensor of a module output (a tensor, a tuple, or a ModelOutput)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state  # type: ignore[no-any-return,union-attr]
    raise TypeError(f"cannot find a hidden-state tensor in {type(output).__name__}")


def with_hidden(output: object, hidden: Tensor) -> object:
    """``output`` with its hidden-state tensor replaced, keeping its type."""
    if isinstance(output, Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    raise TypeError(f"cannot replace the hidden state in {type(output).__name__}")


def _pre_hidden(args: tuple, kwargs: dict) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    return kwargs["hidden_states"]


def _pre_replace(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], Tensor):
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextmanager
def hook_site(site: Site, fn: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
    """Call ``fn(hidden)`` at ``site`` during forwards; a returned tensor replaces it."""
    if site.pre:

        def pre_hook(_m: nn.Module, args: tuple, kwargs: dict):
            new = fn(_pre_hidden(args, kwargs))
            return None if new is None else _pre_replace(args, kwargs, new)

        handle = site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def hook(_m: nn.Module, _args: tuple, output: object):
            new = fn(get_hidden(output))
            return None if new is None else with_hidden(output, new)

        handle = site.module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the last needed site has run."""
