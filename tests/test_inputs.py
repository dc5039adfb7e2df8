"""Seam 2: extra rule inputs are generic. A rule names what it needs (``requires``), batches
carry it by name, the trainer asks the source for it and the SAE converts it to its units."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from saekit import SAEConfig, TrainConfig
from saekit.errors import ConfigError
from saekit.sources import MemorySource
from saekit.train import Trainer


def test_trainer_requests_and_passes_named_inputs_in_sae_units(plugin, tmp_path) -> None:
    from saekit.plugins import load_plugins

    load_plugins([plugin])
    import plugin_rules

    x = torch.randn(256, 8) * 3
    g, s = torch.randn(256, 8), torch.rand(256, 8) + 0.5
    src = MemorySource({"a": x}, shuffle=False, inputs={"grad": {"a": g}, "plugin_scale": {"a": s}})
    cfg = SAEConfig(rule="plugin_echo", d_sae=16, k=2, normalize_input=True)
    tc = TrainConfig(out_dir=str(tmp_path), total_tokens=256, batch_size=64, progress=False)
    tr = Trainer(cfg, tc, src)
    assert tr.inputs == {"grad", "plugin_scale"}
    plugin_rules.InputEcho.seen.clear()
    tr.run()
    seen = [d for d in plugin_rules.InputEcho.seen if set(d) == {"grad", "plugin_scale"}]
    assert len(seen) >= 4
    scale = tr.slots[0].sae.input_scale
    assert float(scale) != 1.0
    # the last training step saw rows 192..255: grad scales as 1/s, an "act" input as s
    torch.testing.assert_close(seen[-1]["grad"], g[192:] / scale)
    torch.testing.assert_close(seen[-1]["plugin_scale"], s[192:] * scale)


def _gtopk_run(tmp_path: Path, inputs: dict | None) -> list[str]:
    x = torch.randn(256, 8)
    src = MemorySource({"a": x}, inputs=inputs)
    cfg = SAEConfig(rule="gtopk", d_sae=16, k=2)
    tc = TrainConfig(out_dir=str(tmp_path), total_tokens=256, batch_size=64, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(cfg, tc, src).run()
    return [str(c.message) for c in caught if "gtopk" in str(c.message)]


def test_gtopk_gets_grad_from_any_source_that_has_it(tmp_path) -> None:
    g = {"grad": {"a": torch.randn(256, 8)}}
    assert _gtopk_run(tmp_path / "with", g) == []
    assert any("plain TopK" in m for m in _gtopk_run(tmp_path / "without", None))


def test_unknown_input_name_is_a_config_error() -> None:
    from saekit.rules import Rule, Selection
    from saekit.rules.base import _REGISTRY, register

    @register
    class NeedsMystery(Rule):
        name = "test_needs_mystery"
        requires = ("mystery",)

        def select(self, pre, ctx):  # pragma: no cover - never reached
            return Selection(indices=pre.topk(1).indices)

    try:
        from saekit import SAE

        with pytest.raises(ConfigError, match="unknown named input 'mystery'"):
            SAE(SAEConfig(d_in=4, d_sae=8, k=2, rule="test_needs_mystery"))
    finally:
        _REGISTRY.pop("test_needs_mystery")


def test_cache_round_trips_named_inputs_and_reads_old_grad_caches(plugin, tmp_path) -> None:
    import json

    from saekit.plugins import load_plugins
    from saekit.sources.cache import CacheSource, write_cache

    load_plugins([plugin])
    acts = {"a": torch.randn(100, 8)}
    ins = {"grad": {"a": torch.randn(100, 8)}, "plugin_scale": {"a": torch.rand(100, 8)}}
    write_cache(MemorySource(acts, shuffle=False, inputs=ins), tmp_path / "c", 100)
    src = CacheSource(tmp_path / "c", shuffle=False)
    assert src.request_inputs(["grad", "plugin_scale", "other"]) == {"grad", "plugin_scale"}
    b = src.next_batch(100)
    for n in ins:
        torch.testing.assert_close(b.inputs[n]["a"], ins[n]["a"])
    # a cache written before named inputs: "has_grads" and grads_*.npy
    man_path = tmp_path / "c" / "manifest.json"
    man = json.loads(man_path.read_text())
    del man["inputs"]
    man["has_grads"] = True
    man_path.write_text(json.dumps(man))  # edited: its seal no longer matches
    old = CacheSource(tmp_path / "c", shuffle=False, verify=False)
    assert set(old.next_batch(10).inputs) == {"grad"}
