"""Helpers shared by the per-rule test files."""

import torch

from saekit import SAE, SAEConfig


def make(rule: str, d_in: int = 12, d_sae: int = 48, k: int = 3, **kw) -> SAE:
    return SAE(SAEConfig(d_in=d_in, d_sae=d_sae, rule=rule, k=k, **kw))


def dense_codes(sae: SAE, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return sae(x, **kw).codes.to_dense()
