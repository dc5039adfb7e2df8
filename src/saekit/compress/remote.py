"""The modeling file written beside a saved compressed model (transformers remote code).

The saved ``config.json`` names a model type of its own (``saekit_lowrank_<base>``) and an
``auto_map`` pointing at ``modeling_saekit_lowrank.py``, so that

- ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` builds the base
  architecture, swaps the recorded layers for rank-r ``LowRankLinear`` and loads the
  factors: the compressed model, equal to :func:`saekit.compress.load_compressed`;
- without ``trust_remote_code`` transformers refuses (unknown model type with custom code);
- the base class itself (``LlamaForCausalLM.from_pretrained(dir)``) finds no
  ``model.safetensors`` (the weights carry the variant ``saekit-lowrank``) and refuses.

The file needs only torch and transformers (not saekit), like ASVD's released checkpoints.
"""

from __future__ import annotations

MODULE = "modeling_saekit_lowrank"
VARIANT = "saekit-lowrank"
CONFIG_CLASS = "SaekitLowRankConfig"

TEMPLATE = '''"""{base_model} with low-rank (A·B) linear layers, written by saekit compress.

Load with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``; needs only
torch and transformers. The layers and ranks are listed in config.json under
``saekit_lowrank``.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import {base_config} as _BaseConfig
from transformers import {base_model} as _BaseModel

VARIANT = "{variant}"


class LowRankLinear(nn.Module):
    """y = x Bᵀ Aᵀ + bias with A [out, rank], B [rank, in]."""

    def __init__(self, in_features, out_features, rank, bias=True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.zeros(out_features, rank))
        self.B = nn.Parameter(torch.zeros(rank, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return F.linear(F.linear(x, self.B), self.A, self.bias)


class {config_class}(_BaseConfig):
    model_type = "{model_type}"


class {model_class}(_BaseModel):
    config_class = {config_class}

    def __init__(self, config):
        super().__init__(config)
        for name, spec in config.saekit_lowrank["layers"].items():
            parent, _, child = name.rpartition(".")
            new = LowRankLinear(
                spec["in_features"], spec["out_features"], spec["rank"], spec["bias"]
            )
            setattr(self.get_submodule(parent) if parent else self, child, new)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("variant", VARIANT)
        return super().from_pretrained(*args, **kwargs)
'''


def model_type(base_type: str) -> str:
    return f"saekit_lowrank_{base_type}"


def model_class(base_model: str) -> str:
    return f"SaekitLowRank{base_model}"


def modeling_source(base_config: str, base_model: str, base_type: str) -> str:
    """Source of the modeling file for a model of class ``base_model`` (in ``transformers``)."""
    return TEMPLATE.format(
        base_config=base_config,
        base_model=base_model,
        variant=VARIANT,
        config_class=CONFIG_CLASS,
        model_type=model_type(base_type),
        model_class=model_class(base_model),
    )
