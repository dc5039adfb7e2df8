"""The optimisation recipe's knobs (issue 10, item 11): the decoder's own lr scale and the
encoder's init scale (old checkpoints without them: test_checkpoint_compat.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saekit import SAE, SAEConfig, TrainConfig
from saekit.sources.base import MemorySource
from saekit.train import train

D = 8

pytestmark = pytest.mark.usefixtures("one_thread")


def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(512, 4, generator=g) @ torch.randn(4, D, generator=g)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_decoder_lr_scale_scales_the_decoder_step_only(
    tmp_path: Path, scale: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adam's first step moves every entry with a gradient by lr (m/sqrt(v) = sign g): with
    the decoder's projection, renormalisation, clipping and schedule off, W_dec's entries
    move by scale * lr and W_enc's by lr."""
    start: dict[str, torch.Tensor] = {}
    init = SAE.init_from_data

    def record(self, *a, **kw):  # the weights the first step starts from
        init(self, *a, **kw)
        start.update({n: p.detach().clone() for n, p in self.named_parameters()})

    monkeypatch.setattr(SAE, "init_from_data", record)
    lr = 1e-4
    t = TrainConfig(out_dir=str(tmp_path), total_tokens=32, batch_size=32, lr=lr, progress=False,
                    grad_clip=0.0, warmup_frac=0.0, decay_start_frac=1.0,
                    decoder_lr_scale=scale)  # fmt: skip
    cfg = SAEConfig(d_sae=32, k=3, unit_norm_decoder=False)
    res = train(cfg, t, MemorySource({"a": data()}, seed=0))
    moved = {n: (p.detach() - start[n]).abs() for n, p in res.sae.named_parameters()}
    assert float(moved["W_dec"].max()) == pytest.approx(scale * lr, rel=1e-3)
    assert float(moved["W_enc"].max()) == pytest.approx(lr, rel=1e-3)


def test_param_groups_keep_parameter_order() -> None:
    """Checkpoints index Adam's moments by position: the groups concatenate to parameters()."""
    for arch in ([], ["gated"]):
        sae = SAE(SAEConfig(d_in=D, d_sae=16, k=2, arch=arch))
        groups = sae.param_groups(10.0)
        flat = [p for g in groups for p in g["params"]]
        assert [id(p) for p in flat] == [id(p) for p in sae.parameters()]
        assert groups[0]["params"] == [sae.W_dec] and groups[0]["lr_scale"] == 10.0


@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_init_scale_sets_the_starting_reconstruction_norm(scale: float) -> None:
    x = data()
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D, d_sae=64, k=3, init_scale=scale))
    sae.init_from_data(x)
    sae.train()
    with torch.no_grad():
        out = sae(x)
        ratio = (out.x_hat - sae.b_dec).norm(dim=1).mean() / (x - sae.b_dec).norm(dim=1).mean()
    assert float(ratio) == pytest.approx(scale, rel=0.02)
