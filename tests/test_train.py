"""Trainer: exact resume, NaN handling, checkpoint integrity, schedule, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saekit import SAEConfig, TrainConfig
from saekit.evaluate.core import fve
from saekit.io import checkpoint as ckpt
from saekit.io import load_sae
from saekit.sources.base import ActivationSource, Batch, MemorySource
from saekit.train import TrainingError, default_lr, lr_factor, train

D = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def data(n: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g)
    return z @ torch.randn(4, D, generator=g) + 0.1 * torch.randn(n, D, generator=g)


class RandnSource(ActivationSource):
    """Draws from the *global* torch RNG: exact resume needs the saved RNG state."""

    sites = ["a"]

    def __init__(self) -> None:
        self.mix = torch.randn(D, D, generator=torch.Generator().manual_seed(1))

    def d_in(self, site: str) -> int:
        return D

    def next_batch(self, batch_size: int) -> Batch:
        return Batch({"a": torch.randn(batch_size, D) @ self.mix})


class NaNAt(MemorySource):
    """A MemorySource whose batch number ``at`` (0-based) holds one NaN."""

    def __init__(self, acts: torch.Tensor, at: int, value: float = float("nan")) -> None:
        super().__init__({"a": acts}, seed=3)
        self.at, self.value, self.calls = at, value, 0

    def next_batch(self, batch_size: int) -> Batch:
        b = super().next_batch(batch_size)
        if self.pos // batch_size - 1 == self.at:
            b.acts["a"][0, 0] = self.value
        return b


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
    base.update(kw)
    return TrainConfig(**base)


def sweep() -> dict[str, tuple[str, SAEConfig]]:
    """Several SAEs fed by one batch: a k sweep and two other rules."""
    return {
        "topk_k2": ("a", SAEConfig(d_sae=32, rule="topk", k=2, aux_k=8, dead_tokens=64)),
        "topk_k4": ("a", SAEConfig(d_sae=32, rule="topk", k=4, aux_k=8, dead_tokens=64)),
        "batchtopk": ("a", SAEConfig(d_sae=32, rule="batchtopk", k=3)),
        "jumprelu": ("a", SAEConfig(d_sae=32, rule="jumprelu", normalize_input=True)),
    }


def states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("make_source", [lambda: MemorySource({"a": data()}, seed=5), RandnSource])
def test_resume_equals_uninterrupted(tmp_path: Path, make_source) -> None:
    ref = train(sweep(), tcfg(tmp_path / "ref"), make_source())
    assert ref.completed and ref.steps == 12
    part = train(sweep(), tcfg(tmp_path / "run", stop_after_steps=7), make_source())
    assert not part.completed and part.steps == 7
    assert not (tmp_path / "run" / "topk_k2" / "cfg.json").exists()  # killed: no final save
    torch.manual_seed(12345)  # a new process: resume must restore the RNG itself
    res = train(sweep(), tcfg(tmp_path / "run"), make_source())  # fresh objects, as after a kill
    assert res.completed and res.steps == 12 and res.tokens == 12 * 32
    for name in ref.saes:
        states_equal(ref.saes[name].state_dict(), res.saes[name].state_dict())
        saved = load_sae(tmp_path / "run" / name)
        states_equal(ref.saes[name].state_dict(), saved.state_dict())
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines]
    assert steps == sorted(steps) and len(steps) == 6 * 4  # no duplicated lines after resume


def test_nan_stops_with_error_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    cfg = {"a": SAEConfig(d_sae=32, k=3)}
    with pytest.raises(TrainingError, match=r"step 7: non-finite activations at site 'a' \(1 NaN"):
        train(cfg, tcfg(tmp_path / "nan", checkpoint_every=3), NaNAt(data(), at=7))
    meta, files = ckpt.read_checkpoint(tmp_path / "nan" / "checkpoint")
    assert meta["step"] == 6
    ref = train(cfg, tcfg(tmp_path / "ref", stop_after_steps=6), NaNAt(data(), at=99))
    states_equal(files["sae-0"], ref.sae.state_dict())
    with pytest.raises(TrainingError, match="Inf"):
        train(cfg, tcfg(tmp_path / "inf", resume=False), NaNAt(data(), at=1, value=float("inf")))


def test_nonfinite_loss_is_an_error(tmp_path: Path) -> None:
    from saekit import SAE

    sae = SAE(SAEConfig(d_in=D, d_sae=16, k=2, init_b_dec="zeros"))
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="non-finite"):
        src = MemorySource({"a": data()})
        train({"a": SAEConfig(d_sae=16, k=2)}, tcfg(tmp_path), src, saes={"a": sae})


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    cfg = SAEConfig(d_sae=32, k=3)
    train(cfg, tcfg(tmp_path, stop_after_steps=4), MemorySource({"a": data()}))
    with pytest.raises(ckpt.CheckpointError, match=r"other configs.*k: 3 \(checkpoint\) -> 5"):
        train(SAEConfig(d_sae=32, k=5), tcfg(tmp_path), MemorySource({"a": data()}))
    with pytest.raises(ckpt.CheckpointError, match="lr"):
        train(cfg, tcfg(tmp_path, lr=1e-3), MemorySource({"a": data()}))
    f = tmp_path / "checkpoint" / "sae-0.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="sae-0.safetensors does not match"):
        train(cfg, tcfg(tmp_path), MemorySource({"a": data()}))
    (tmp_path / "checkpoint" / "state.json").unlink()
    with pytest.raises(FileNotFoundError, match="state.json"):
        train(cfg, tcfg(tmp_path), MemorySource({"a": data()}))
    # resume=False ignores it and starts over
    assert train(cfg, tcfg(tmp_path, resume=False), MemorySource({"a": data()})).completed


def test_interrupted_checkpoint_write_keeps_previous(tmp_path: Path, monkeypatch) -> None:
    cfg = SAEConfig(d_sae=32, k=3)
    train(cfg, tcfg(tmp_path, stop_after_steps=5), MemorySource({"a": data()}))
    calls = {"n": 0}
    real = ckpt.save_tensors

    def flaky(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "save_tensors", flaky)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, tcfg(tmp_path, stop_after_steps=10), MemorySource({"a": data()}))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    meta, _ = ckpt.read_checkpoint(tmp_path / "checkpoint")
    assert meta["step"] == 5


def test_schedule_and_default_lr() -> None:
    assert default_lr(16384) == pytest.approx(2e-4)
    assert default_lr(4 * 16384) == pytest.approx(1e-4)
    f = [lr_factor(s, 100, 0.1, 0.8) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0 and f[80] == 1.0
    assert f[99] == pytest.approx(1 / 20) and all(a >= b for a, b in zip(f[80:], f[81:]))
    assert lr_factor(5, 10, 0.0, 1.0) == 1.0
    x = torch.randn(50, 4)
    assert fve(x, x) == 1.0 and fve(x, x.mean(0, keepdim=True).expand_as(x)) == pytest.approx(0)


def test_outputs_metrics_and_learning(tmp_path: Path) -> None:
    cfg = SAEConfig(d_sae=32, k=3)
    res = train(cfg, tcfg(tmp_path, total_tokens=32 * 60, log_every=10), MemorySource(data()))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().split("\n") if x]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    for key in ("tokens", "lr", "loss", "recon", "aux", "l0", "fve", "dead_frac", "tokens_per_s"):
        assert key in rows[0], key
    assert rows[-1]["l0"] == 3.0 and rows[-1]["fve"] > rows[0]["fve"] and rows[-1]["fve"] > 0.5
    assert rows[-1]["lr"] < rows[2]["lr"]  # decayed
    names = {p.name for p in tmp_path.iterdir()}
    assert {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "checkpoint"} <= names
    loaded = load_sae(tmp_path)
    states_equal(loaded.state_dict(), res.sae.state_dict())
    info = json.loads((tmp_path / "cfg.json").read_text())["saekit"]
    assert info["site"] == "x" and info["steps"] == 60 and info["train"]["batch_size"] == 32
    norms = res.sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_one_config_many_sites(tmp_path: Path) -> None:
    src = MemorySource({"l1": data(seed=1), "l2": data(seed=2)[:, :6]})
    res = train(SAEConfig(expansion=2, k=2), tcfg(tmp_path, total_tokens=64), src)
    assert set(res.saes) == {"l1", "l2"}
    assert res.saes["l1"].d_sae == 16 and res.saes["l2"].d_in == 6
    assert load_sae(tmp_path / "l2").d_sae == 12


def test_bad_inputs(tmp_path: Path) -> None:
    src = MemorySource({"a": data()})
    with pytest.raises(ValueError, match="site 'b' is not produced"):
        train({"x": ("b", SAEConfig())}, tcfg(tmp_path), src)
    with pytest.raises(ValueError, match="d_in = 9 does not match the data's width 8"):
        train(SAEConfig(d_in=9), tcfg(tmp_path), src)
    with pytest.raises(ValueError, match="SAEConfig.rule = 'nope'"):
        train(SAEConfig(rule="nope"), tcfg(tmp_path), src)
    with pytest.raises(ValueError, match="batch_size"):
        train(SAEConfig(), tcfg(tmp_path, total_tokens=8), src)
    with pytest.raises(ValueError, match="autocast"):
        train(SAEConfig(), tcfg(tmp_path, autocast="fp8"), src)


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path: Path) -> None:
    """The forward runs in bf16 (main at 9e49562 asserted only what fp32 also satisfies)."""
    from saekit.train import Trainer

    runs = {}
    for mode in ("bfloat16", "none"):
        cfg = tcfg(tmp_path / mode, autocast=mode, total_tokens=32 * 6)
        tr = Trainer(SAEConfig(d_sae=32, k=3), cfg, MemorySource(data()))
        outs = tr.train_step(tr.source.next_batch(cfg.batch_size))
        runs[mode] = (tr, outs["x"])
    tr, out = runs["bfloat16"]
    assert out.pre.dtype == torch.bfloat16  # the encoder matmul ran under autocast
    assert runs["none"][1].pre.dtype == torch.float32
    assert tr.slots[0].sae.W_enc.dtype == torch.float32  # fp32 master weights
    w_bf16, w_fp32 = (r[0].slots[0].sae.W_enc for r in runs.values())
    assert not torch.equal(w_bf16, w_fp32)  # bf16 rounding changed the update
    assert torch.allclose(w_bf16, w_fp32, atol=1e-2)
    res = tr.run()
    assert torch.isfinite(res.sae.W_enc).all() and res.metrics["x"]["fve"] > 0


def test_dead_fraction_counts_silent_latents(tmp_path: Path) -> None:
    from saekit import SAE

    sae = SAE(SAEConfig(d_in=D, d_sae=32, k=3))
    with torch.no_grad():
        sae.b_enc[:8] = -1e6  # these 8 latents can never be selected
    cfg = {"a": SAEConfig(d_sae=32, k=3)}
    res = train(
        cfg, tcfg(tmp_path, total_tokens=32 * 4), MemorySource({"a": data()}), saes={"a": sae}
    )
    assert res.metrics["a"]["dead_frac"] >= 8 / 32
    assert (res.sae.tokens_since_fired[:8] == 32 * 4).all()
