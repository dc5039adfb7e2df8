"""Checkpoints written before a config field existed still resume while it keeps its default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saekit import SAEConfig, TrainConfig
from saekit.io import checkpoint as ckpt
from saekit.sources.base import MemorySource
from saekit.train import train

D = 8


pytestmark = pytest.mark.usefixtures("one_thread")


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
        log_every=2,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


def drop_config_keys(
    ckdir: Path, train_keys: list[str], sae_keys: list[str], one_adam_group: bool = False
) -> None:
    """Make ``ckdir`` look written by a saekit without these fields (re-sealed);
    ``one_adam_group``: and from before the decoder had its own Adam group."""
    sj = ckdir / "state.json"
    state = json.loads(sj.read_text())
    for k in train_keys:
        del state["configs"]["train"][k]
    for slot in state["configs"]["saes"].values():
        for k in sae_keys:
            del slot["sae"][k]
    for osd in state["optim"].values() if one_adam_group else ():
        groups = osd["param_groups"]
        one = {k: v for k, v in groups[0].items() if k != "lr_scale"}
        one["params"] = [i for g in groups for i in g["params"]]
        groups[:] = [one]
    try:  # the seal exists since the reliability work; older code has none
        from saekit.io.integrity import seal

        state = seal({k: v for k, v in state.items() if k != "state_sha256"}, ckpt.SEAL)
    except ImportError:
        pass
    sj.write_text(json.dumps(state))


def test_absent_field_at_its_default_resumes_to_the_bit(tmp_path: Path) -> None:
    cfg = SAEConfig(d_sae=32, k=3)
    src = lambda: MemorySource({"a": data()}, seed=5)  # noqa: E731
    ref = train(cfg, tcfg(tmp_path / "ref"), src())
    part = tcfg(tmp_path / "old", stop_after_steps=5)
    train(cfg, part, src())
    drop_config_keys(tmp_path / "old" / "checkpoint", ["grad_clip", "beta1"], ["aux_coeff"])
    res = train(cfg, tcfg(tmp_path / "old"), src())
    assert res.completed
    for k, v in ref.sae.state_dict().items():
        assert torch.equal(v, res.sae.state_dict()[k]), k


def test_absent_field_not_at_its_default_is_a_difference(tmp_path: Path) -> None:
    cfg = SAEConfig(d_sae=32, k=3)
    train(cfg, tcfg(tmp_path, stop_after_steps=5, grad_clip=0.5), MemorySource({"a": data()}))
    drop_config_keys(tmp_path / "checkpoint", ["grad_clip"], [])
    with pytest.raises(ckpt.CheckpointError, match=r"other configs.*grad_clip: '<absent>' -> 0.5"):
        train(cfg, tcfg(tmp_path, grad_clip=0.5), MemorySource({"a": data()}))


def test_describe_diff_with_defaults() -> None:
    from saekit.config import DataConfig
    from saekit.train import run_configs

    t, d = TrainConfig(out_dir="x"), DataConfig()
    saes = {"s": ("a", SAEConfig(d_in=4, d_sae=8, k=2))}
    now = json.loads(json.dumps(run_configs(t, d, saes)))
    dflt = run_configs(t, d, saes, ckpt.field_defaults)
    old = json.loads(json.dumps(now))
    for k in ("data_files", "streaming"):  # DataConfig fields added by the datasets work
        old["data"].pop(k, None)
    assert ckpt.describe_diff(old, now, defaults=dflt) == []
    assert ckpt.describe_diff(old, now) != []  # without defaults: a difference, as before
    now["data"]["streaming"] = False
    assert ckpt.describe_diff(old, now, defaults=dflt) == ["data.streaming: '<absent>' -> False"]
    # a key present in the checkpoint and absent now stays a difference
    assert ckpt.describe_diff({"a": 1, "b": 2}, {"a": 1}, defaults={"b": 2}) == [
        "b: 2 -> '<absent>'"
    ]


# issue 10, item 11: decoder_lr_scale and init_scale changed the behaviour when they were added
ITEM11_TRAIN, ITEM11_SAE = ["decoder_lr_scale"], ["init_scale"]


def test_old_checkpoint_resumes_to_the_bit_under_its_values(tmp_path: Path) -> None:
    """A checkpoint without the fields meant decoder_lr_scale 1 and init_scale 1: it resumes,
    one Adam group regrouped, equal to the bit to an uninterrupted run under those values."""
    old = dict(decoder_lr_scale=1.0)
    cfg = SAEConfig(d_sae=32, k=3, init_scale=1.0)
    src = lambda: MemorySource({"a": data()}, seed=5)  # noqa: E731
    ref = train(cfg, tcfg(tmp_path / "ref", **old), src())
    train(cfg, tcfg(tmp_path / "old", stop_after_steps=5, **old), src())
    drop_config_keys(tmp_path / "old" / "checkpoint", ITEM11_TRAIN, ITEM11_SAE, one_adam_group=True)
    res = train(cfg, tcfg(tmp_path / "old", **old), src())
    assert res.completed
    for k, v in ref.sae.state_dict().items():
        assert torch.equal(v, res.sae.state_dict()[k]), k


def test_old_checkpoint_under_new_values_names_the_fields(tmp_path: Path) -> None:
    cfg = SAEConfig(d_sae=32, k=3, init_scale=1.0)
    train(cfg, tcfg(tmp_path, stop_after_steps=5, decoder_lr_scale=1.0),
          MemorySource({"a": data()}))  # fmt: skip
    drop_config_keys(tmp_path / "checkpoint", ITEM11_TRAIN, ITEM11_SAE, one_adam_group=True)
    with pytest.raises(ckpt.CheckpointError, match=r"decoder_lr_scale: '<absent>' -> 10"):
        train(cfg, tcfg(tmp_path, decoder_lr_scale=10.0), MemorySource({"a": data()}))
