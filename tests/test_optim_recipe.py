"""The optimisation recipe's knobs (issue 10, item 11): the decoder's own lr scale, the
encoder's init scale, and old checkpoints (one Adam group, no such fields) resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saekit import SAE, SAEConfig, TrainConfig
from saekit.errors import CheckpointError
from saekit.io import checkpoint as ckpt
from saekit.io.integrity import seal
from saekit.sources.base import MemorySource
from saekit.train import train

D = 8


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(512, 4, generator=g) @ torch.randn(4, D, generator=g)


def tcfg(out: Path, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(out),
        total_tokens=32 * 12,
        batch_size=32,
        lr=3e-3,
        checkpoint_every=5,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


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
    t = tcfg(tmp_path, total_tokens=32, lr=lr, grad_clip=0.0, warmup_frac=0.0,
             decay_start_frac=1.0, decoder_lr_scale=scale)  # fmt: skip
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


def make_old(ckdir: Path) -> None:
    """Make ``ckdir`` look written before item 11: one Adam group, no decoder_lr_scale /
    init_scale fields (re-sealed)."""
    sj = ckdir / "state.json"
    state = json.loads(sj.read_text())
    del state["configs"]["train"]["decoder_lr_scale"]
    for slot in state["configs"]["saes"].values():
        del slot["sae"]["init_scale"]
    for osd in state["optim"].values():
        groups = osd["param_groups"]
        one = {k: v for k, v in groups[0].items() if k != "lr_scale"}
        one["params"] = [i for g in groups for i in g["params"]]
        groups[:] = [one]
    state = seal({k: v for k, v in state.items() if k != "state_sha256"}, ckpt.SEAL)
    sj.write_text(json.dumps(state))


def test_old_checkpoint_resumes_to_the_bit_under_its_values(tmp_path: Path) -> None:
    """A checkpoint without the fields meant decoder_lr_scale 1 and init_scale 1: it resumes,
    one Adam group regrouped, equal to the bit to an uninterrupted run under those values."""
    old = dict(decoder_lr_scale=1.0)
    cfg = SAEConfig(d_sae=32, k=3, init_scale=1.0)
    src = lambda: MemorySource({"a": data()}, seed=5)  # noqa: E731
    ref = train(cfg, tcfg(tmp_path / "ref", **old), src())
    train(cfg, tcfg(tmp_path / "old", stop_after_steps=5, **old), src())
    make_old(tmp_path / "old" / "checkpoint")
    res = train(cfg, tcfg(tmp_path / "old", **old), src())
    assert res.completed
    for k, v in ref.sae.state_dict().items():
        assert torch.equal(v, res.sae.state_dict()[k]), k


def test_old_checkpoint_under_new_values_names_the_fields(tmp_path: Path) -> None:
    cfg = SAEConfig(d_sae=32, k=3, init_scale=1.0)
    train(cfg, tcfg(tmp_path, stop_after_steps=5, decoder_lr_scale=1.0),
          MemorySource({"a": data()}))  # fmt: skip
    make_old(tmp_path / "checkpoint")
    with pytest.raises(CheckpointError, match=r"decoder_lr_scale: '<absent>' -> 10"):
        train(cfg, tcfg(tmp_path, decoder_lr_scale=10.0), MemorySource({"a": data()}))
