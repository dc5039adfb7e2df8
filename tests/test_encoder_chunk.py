"""``SAEConfig.encoder_chunk``: TopK without the dense ``[B, d_sae]`` pre-activations."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from saekit import SAE, SAEConfig, kernels
from saekit.config import TrainConfig
from saekit.sources.base import MemorySource
from saekit.train import Trainer
from test_memory_paths import NewBigTensors


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("subset", [False, True])
def test_chunked_row_topk_equals_dense_topk(chunk: int, absolute: bool, subset: bool) -> None:
    g = torch.Generator().manual_seed(chunk)
    x, W, b = torch.randn(9, 6, generator=g), torch.randn(6, 40, generator=g), torch.randn(40)
    cols = torch.randperm(40, generator=g)[:23].sort().values if subset else None
    k = 5
    v, i = kernels.chunked_row_topk(x, W, b, k, chunk, cols=cols, absolute=absolute)
    pre = torch.addmm(b, x, W)
    score = pre.abs() if absolute else pre.clone()
    if cols is not None:
        keep = torch.zeros(40, dtype=torch.bool)
        keep[cols] = True
        score[:, ~keep] = float("-inf")
    ref = score.topk(k, dim=1).indices
    assert torch.equal(i.sort(1).values, ref.sort(1).values)
    torch.testing.assert_close(v, pre.gather(1, i))


def _pair(**kw) -> tuple[SAE, SAE]:
    torch.manual_seed(1)
    a = SAE(SAEConfig(d_in=12, d_sae=96, k=5, aux_k=6, dead_tokens=10, **kw)).train()
    b = copy.deepcopy(a)
    b.cfg.encoder_chunk = 20  # 96 latents in 5 chunks, the last partial
    return a, b


@pytest.mark.parametrize("centered", [True, False])
def test_sae_with_encoder_chunk_equals_dense(centered: bool) -> None:
    a, b = _pair(apply_b_dec_to_input=centered)
    x = torch.randn(40, 12)
    a.init_from_data(x)
    b.load_state_dict(a.state_dict())
    a.tokens_since_fired[:50] = 100  # dead latents: the aux-k loss runs on both
    b.tokens_since_fired[:50] = 100
    res = []
    for sae in (a, b):
        loss, terms, out = sae.loss(x)
        loss.backward()
        res.append((loss, terms, out, {n: p.grad for n, p in sae.named_parameters()}))
    (la, ta, oa, ga), (lb, tb, ob, gb) = res
    assert oa.pre is not None and ob.pre is None  # never formed with encoder_chunk
    assert "aux" in tb and float(tb["aux"]) > 0
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ob.codes.to_dense(), oa.codes.to_dense(), rtol=1e-5, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():  # inference takes the chunked path too
        torch.testing.assert_close(b(x).x_hat, a(x).x_hat, rtol=1e-5, atol=1e-5)


def test_training_step_with_encoder_chunk_has_no_dense_latent_tensor(tmp_path: Path) -> None:
    B, F = 64, 256
    cfg = SAEConfig(d_sae=F, k=4, aux_k=8, dead_tokens=B, encoder_chunk=64)
    tcfg = TrainConfig(out_dir=str(tmp_path), total_tokens=B * 8, batch_size=B, lr=1e-3,
                       progress=False, checkpoint_every=0)  # fmt: skip
    t = Trainer(cfg, tcfg, MemorySource(torch.randn(B * 4, 16)))
    for _ in range(3):
        t.train_step(t.source.next_batch(B))
    assert bool((t.slots[0].sae.tokens_since_fired >= B).any())
    with NewBigTensors(B * F // 2) as mode:  # nothing even half as large as [B, d_sae]
        t.train_step(t.source.next_batch(B))
    assert mode.ops == []
