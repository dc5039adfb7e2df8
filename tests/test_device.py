"""Devices and precision: one clear line for an unusable device, the autocast default, and
the trainer's step / resume on every available device (CUDA skipped with the reason)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saekit import SAEConfig
from saekit.config import TrainConfig
from saekit.device import autocast_dtype, resolve_device
from saekit.errors import ConfigError, EnvironmentProblem
from saekit.sources.base import MemorySource
from saekit.train import Trainer, train


def test_cuda_on_a_cpu_only_torch_is_one_line(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(EnvironmentProblem, match=r"--device cuda: this torch .* CPU-only build"):
        resolve_device("cuda")
    with pytest.raises(EnvironmentProblem, match="--model-device"):
        resolve_device("cuda:0", "--model-device")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu0")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="needs a CPU-only torch build")
def test_cli_device_cuda_on_cpu_torch(tmp_path: Path) -> None:
    syn = '{"n_features": 48, "d": 12, "n_roots": 2, "depth": 2, "branching": 2}'
    cmd = [sys.executable, "-m", "saekit.cli", "train", "--source", "synthetic",
           "--synthetic", syn, "--device", "cuda", "--out-dir", str(tmp_path / "r"),
           "--total-tokens", "256", "--batch-size", "64", "--progress", "false"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "CPU-only build" in lines[0] and "--device cpu" in lines[0]


def test_autocast_default_bf16_on_cuda_only() -> None:
    assert TrainConfig().autocast == "auto"
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("none", torch.device("cuda")) is None
    assert autocast_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ConfigError, match="autocast"):
        autocast_dtype("fp8", torch.device("cpu"))


def _data(n: int = 256, d: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)


def _cfg(out: Path, device: torch.device, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), total_tokens=32 * 8, batch_size=32, lr=3e-3,
                checkpoint_every=3, log_every=2, progress=False, device=str(device))  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_trainer_step_on_device(device: torch.device, tmp_path: Path) -> None:
    """The default precision on each device: fp32 master weights, bf16 forward on CUDA."""
    t = Trainer(SAEConfig(d_sae=48, k=5), _cfg(tmp_path, device), MemorySource(_data()))
    assert t.autocast_dtype == (torch.bfloat16 if device.type == "cuda" else None)
    for _ in range(3):
        outs = t.train_step(t.source.next_batch(32))
    sae = t.slots[0].sae
    assert sae.W_enc.device.type == device.type and sae.W_enc.dtype == torch.float32
    assert outs["x"].pre.dtype == (torch.bfloat16 if device.type == "cuda" else torch.float32)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in sae.parameters())
    assert torch.isfinite(outs["x"].extras["loss"])


@pytest.mark.parametrize("rule", ["topk", "batchtopk"])
def test_resume_is_exact_on_device(device: torch.device, rule: str, tmp_path: Path) -> None:
    cfg = SAEConfig(d_sae=48, k=4, rule=rule)
    full = train(cfg, _cfg(tmp_path / "full", device), MemorySource(_data()))
    part = _cfg(tmp_path / "part", device, stop_after_steps=4)
    assert not train(cfg, part, MemorySource(_data())).completed
    torch.manual_seed(999)  # resume must restore the RNG itself
    res = train(cfg, _cfg(tmp_path / "part", device), MemorySource(_data()))
    assert res.completed and res.steps == full.steps
    for name, v in full.sae.state_dict().items():
        assert torch.equal(res.sae.state_dict()[name], v), name


def _rule_names() -> list[str]:
    from saekit.rules import rule_names

    return rule_names()


@pytest.mark.parametrize("rule", _rule_names())
def test_every_rule_trains_on_device(device: torch.device, rule: str) -> None:
    """Loss, codes and gradients of each rule on ``device`` equal the CPU ones (fp32)."""
    from saekit import SAE

    x = _data(64)
    torch.manual_seed(0)
    ref = SAE(SAEConfig(d_in=12, d_sae=48, k=4, rule=rule)).train()
    ref.init_from_data(x)
    sae = SAE(ref.cfg).train()
    sae.load_state_dict(ref.state_dict())
    sae = sae.to(device)
    g = torch.randn_like(x)  # gradient-aware rules read it; others ignore it
    res = []
    for model, xx in ((ref, x), (sae, x.to(device))):
        loss, _, out = model.loss(xx, inputs={"grad": g.to(xx.device)})
        loss.backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
        res.append((loss.detach().cpu(), out.codes.to_dense().detach().cpu(), grads))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res[1][1], res[0][1], rtol=1e-4, atol=1e-4)
    assert res[1][2].keys() == res[0][2].keys()
    for n, gr in res[0][2].items():
        torch.testing.assert_close(res[1][2][n], gr, rtol=1e-3, atol=1e-5, msg=n)
