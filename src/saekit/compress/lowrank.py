"""``LowRankLinear`` and discovery/replacement of a model's linear layers.

transformers' GPT-2 ``Conv1D`` (weight ``[in, out]``, ``y = x W + b``) is handled like
``nn.Linear`` (weight ``[out, in]``): :func:`dense_weight` returns ``[out, in]`` for both.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saekit.errors import ConfigError


class LowRankLinear(nn.Module):
    """``y = x Bᵀ Aᵀ + bias`` with ``A [out, r]``, ``B [r, in]``: a rank-r ``nn.Linear``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ConfigError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.B = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(cls, A: Tensor, B: Tensor, bias: Tensor | None, like: Tensor) -> LowRankLinear:
        """Build from float factors, cast to ``like``'s dtype/device."""
        m, r = A.shape
        mod = cls(B.shape[1], m, r, bias is not None, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            mod.A.copy_(A.to(like))
            mod.B.copy_(B.to(like))
            if bias is not None:
                mod.bias.copy_(bias.to(like))  # type: ignore[union-attr]
        return mod

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def dense(self) -> Tensor:
        """The equivalent dense weight ``A B`` (``[out, in]``)."""
        return self.A @ self.B

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )


def is_conv1d(mod: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight ``[in, out]``)."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and hasattr(mod, "weight")


def is_linear_like(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


def dense_weight(mod: nn.Module) -> Tensor:
    """Weight as ``[out, in]`` (transposes ``Conv1D``)."""
    if isinstance(mod, LowRankLinear):
        return mod.dense()
    w = mod.weight  # type: ignore[union-attr]
    return w.T if is_conv1d(mod) else w


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


_BLOCK = re.compile(r"^(.*?\.\d+)\.")
#: layer-name endings that read a block's *internal* result (compressed second within a block)
OUTPUT_SIDE = (
    "o_proj",
    "down_proj",
    "out_proj",
    "fc2",
    "wo",
    "dense_4h_to_h",
    "attn.c_proj",
    "mlp.c_proj",
    "attention.output.dense",
    "output.dense",
    "attn.out_proj",
)


def block_of(name: str) -> str | None:
    """``'model.layers.3.self_attn.q_proj' -> 'model.layers.3'`` (first numbered component)."""
    m = _BLOCK.match(name)
    return m.group(1) if m else None


def is_output_side(name: str) -> bool:
    """True for o/down-type projections (their input is produced inside the same block)."""
    if name.endswith("attention.output.dense") or name.endswith("attn.c_proj"):
        return True
    if name.endswith("intermediate.dense"):
        return False
    return any(name == e or name.endswith("." + e) for e in OUTPUT_SIDE)


_ATTN = re.compile(r"(^|\.)[^.]*(attn|attention)[^.]*\.")


def layer_kind(name: str) -> str:
    """``"attn"`` for layers inside an attention module (a path component containing
    ``attn``/``attention``: ``self_attn.q_proj``, ``attn.c_proj``), else ``"mlp"``."""
    return "attn" if _ATTN.search(name) else "mlp"


def find_linear_layers(
    model: nn.Module, include: str | None = None, exclude: str | None = None
) -> list[str]:
    """Names of compressible linear/Conv1D layers inside numbered blocks, in module order.

    Layers outside the repeated blocks (embeddings, ``lm_head``, poolers) are skipped, as in
    SVD-LLM/SAES-SVD. ``include``/``exclude`` are regexes searched in the name.
    """
    names = []
    for name, mod in model.named_modules():
        if not is_linear_like(mod) or block_of(name) is None:
            continue
        if include and not re.search(include, name):
            continue
        if exclude and re.search(exclude, name):
            continue
        names.append(name)
    return names


def compression_groups(names: list[str], order: str = "block") -> list[list[str]]:
    """Group layers into the steps of sequential compression.

    ``order="block"``: per block, first the input-side layers (q/k/v/gate/up, ``c_attn``,
    ``c_fc``), then the output-side ones (o/down, ``c_proj``) — two calibration passes per
    block, as in the SAES-SVD reproduction. ``order="layer"``: every layer is its own step.
    """
    if order == "layer":
        return [[n] for n in names]
    if order != "block":
        raise ConfigError(f"order must be 'block' or 'layer', got {order!r}")
    groups: list[list[str]] = []
    blocks: dict[str, tuple[list[str], list[str]]] = {}
    for n in names:
        b = block_of(n) or n
        if b not in blocks:
            blocks[b] = ([], [])
        blocks[b][1 if is_output_side(n) else 0].append(n)
    for first, second in blocks.values():
        groups += [g for g in (first, second) if g]
    return groups


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
