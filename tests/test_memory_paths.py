"""No ``[B, d_sae]`` tensor beyond the pre-activations in a training step (sparse rules)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from saekit import SAEConfig
from saekit.config import TrainConfig
from saekit.sources.base import MemorySource
from saekit.train import Trainer

B, D, F = 64, 16, 256


class NewBigTensors(TorchDispatchMode):
    """Records every op whose output is a *new* tensor of at least ``n`` elements."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.ops = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
               if isinstance(t, torch.Tensor)}  # fmt: skip
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.numel() >= self.n
                    and t.untyped_storage().data_ptr() not in ins):  # fmt: skip
                self.ops.append(str(func))
        return out


def _trainer(tmp: Path, rule: str, autocast: str) -> Trainer:
    x = torch.randn(B * 4, D)
    cfg = SAEConfig(d_sae=F, k=4, rule=rule, aux_k=8, dead_tokens=B)  # aux-k active
    tcfg = TrainConfig(out_dir=str(tmp), total_tokens=B * 8, batch_size=B, lr=1e-3,
                       autocast=autocast, progress=False, checkpoint_every=0)  # fmt: skip
    return Trainer(cfg, tcfg, MemorySource(x))


@pytest.mark.parametrize("rule", ["topk", "batchtopk", "abstopk"])
@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_step_allocates_no_dense_latent_tensor(tmp_path: Path, rule: str, autocast: str) -> None:
    t = _trainer(tmp_path, rule, autocast)
    for _ in range(3):  # init, and dead latents for the aux-k loss
        t.train_step(t.source.next_batch(B))
    assert bool((t.slots[0].sae.tokens_since_fired >= B).any())  # the aux loss runs
    with NewBigTensors(B * F) as mode:
        t.train_step(t.source.next_batch(B))
    # fp32: the pre-activation buffer is reused (nothing new); bf16: the new bf16 pre only
    allowed = 0 if autocast == "none" else 1
    assert len(mode.ops) <= allowed, mode.ops


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("n_allowed", [1, 37, F])
def test_masked_row_topk_equals_masked_full_topk(monkeypatch, absolute, n_allowed) -> None:
    from saekit import kernels

    monkeypatch.setattr(kernels, "MASKED_TOPK_ELEMENTS", 1000)  # several row chunks
    pre = torch.randn(B, F)
    allowed = torch.zeros(F, dtype=torch.bool)
    allowed[torch.randperm(F)[:n_allowed]] = True
    k = min(5, n_allowed)
    got = kernels.masked_row_topk(pre, allowed, k, absolute=absolute)
    score = torch.where(allowed, pre.abs() if absolute else pre, torch.tensor(float("-inf")))
    ref = score.topk(k, dim=1).indices
    assert allowed[got].all()
    assert torch.equal(got.sort(1).values, ref.sort(1).values)
