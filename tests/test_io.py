"""Run-directory format: bit-exact round trips, SAELens / Qwen-Scope import, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saekit import SAE, SAEConfig
from saekit.io import atomic, load_density, load_sae, save_sae
from saekit.rules import rule_names


def trained_sae(rule: str, normalize_input: bool = False, d: int = 8, F: int = 24) -> SAE:
    """An SAE whose parameters and buffers all differ from a fresh one."""
    sae = SAE(SAEConfig(d_in=d, d_sae=F, rule=rule, k=3, normalize_input=normalize_input))
    sae.train()
    x = torch.randn(64, d) * 3 + 1
    g = torch.randn(64, d)  # dLoss/dx, for rules that use it (gtopk)
    sae.init_from_data(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(3):
        loss, _, out = sae.loss(x, inputs={"grad": g}, step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.observe(out.codes, x.shape[0])
    return sae


def assert_same_state(a: SAE, b: SAE) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.filterwarnings("ignore:rule .* has signed codes")
@pytest.mark.parametrize("normalize_input", [False, True])
@pytest.mark.parametrize("rule", rule_names())
def test_round_trip_to_the_bit(tmp_path: Path, rule: str, normalize_input: bool) -> None:
    sae = trained_sae(rule, normalize_input)
    save_sae(sae, tmp_path, {"site": "layers.2.resid_post", "data": {"model": "m"}})
    loaded = load_sae(tmp_path)
    assert loaded.cfg == sae.cfg
    assert not loaded.training
    assert_same_state(sae, loaded)
    sae.eval()
    x = torch.randn(16, 8)
    assert torch.equal(sae(x).x_hat, loaded(x).x_hat)


def _saelens_forward(w: dict[str, torch.Tensor], cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens inference from the exported files alone."""
    x_in = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = x_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        top = pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    elif cfg["architecture"] == "jumprelu":
        acts = torch.relu(pre) * (pre > w["threshold"])
    else:
        acts = torch.relu(pre)
    return acts @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("rule", ["topk", "batchtopk", "jumprelu", "relu"])
def test_saelens_files_reproduce_forward(tmp_path: Path, rule: str) -> None:
    sae = trained_sae(rule, normalize_input=True).eval()
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if rule in ("jumprelu", "batchtopk"):
        expected.add("threshold")
        assert cfg["architecture"] == "jumprelu"
    assert set(w) == expected
    assert w["W_enc"].shape == (8, 24) and w["W_dec"].shape == (24, 8)
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["sae_lens_version"].startswith("6")
    x = torch.randn(32, 8) * 3
    torch.testing.assert_close(_saelens_forward(w, cfg, x), sae(x).x_hat, rtol=1e-4, atol=1e-4)
    dens = load_density(tmp_path)
    torch.testing.assert_close(dens, sae.fire_freq, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["topk", "jumprelu", "relu"])
def test_plain_saelens_dir_loads(tmp_path: Path, rule: str) -> None:
    sae = trained_sae(rule).eval()
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["saekit"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "saekit_state.safetensors").unlink()
    loaded = load_sae(tmp_path)
    assert loaded.cfg.rule == rule
    x = torch.randn(32, 8)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat, rtol=1e-5, atol=1e-5)
    if rule == "topk":
        assert loaded.cfg.k == 3


def test_qwenscope_pt(tmp_path: Path) -> None:
    d, F, k = 6, 20, 4
    w = {
        "W_enc": torch.randn(F, d),
        "b_enc": torch.randn(F) * 0.1,
        "W_dec": torch.randn(d, F),
        "b_dec": torch.randn(d),
    }
    path = tmp_path / "SAE-Res-Tiny-W20-L0_4" / "layer3.sae.pt"
    path.parent.mkdir()
    torch.save(w, path)
    sae = load_sae(path)
    assert (sae.d_in, sae.d_sae, sae.cfg.k, sae.cfg.apply_b_dec_to_input) == (d, F, k, False)
    x = torch.randn(10, d)
    pre = x @ w["W_enc"].t() + w["b_enc"]
    top = pre.topk(k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    torch.testing.assert_close(sae(x).x_hat, acts @ w["W_dec"].t() + w["b_dec"])
    other = tmp_path / "layer3.sae.pt"
    torch.save(w, other)
    with pytest.raises(ValueError, match="pass k"):
        load_sae(other)
    assert load_sae(other, k=2).cfg.k == 2


class _Evil:
    pass


def test_pickles_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "layer0.sae.pt"
    torch.save({"W_enc": torch.zeros(2, 2), "obj": _Evil()}, bad)
    with pytest.raises(ValueError, match="refusing to load"):
        load_sae(bad, k=1)
    run = tmp_path / "run"
    save_sae(trained_sae("topk"), run)
    (run / "sae_weights.safetensors").rename(run / "sae_weights.pt")
    with pytest.raises(FileNotFoundError, match="unpickling"):
        load_sae(run)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_sae(tmp_path / "nowhere")
    save_sae(trained_sae("topk"), tmp_path)
    (tmp_path / "saekit_state.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="saekit_state.safetensors"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)


def _edit_cfg(run: Path, fn) -> None:
    """Edit cfg.json and re-seal it (as a consistent but wrong file would be)."""
    from saekit.io.integrity import seal
    from saekit.io.native import CFG_SEAL

    cfg = json.loads((run / "cfg.json").read_text())
    fn(cfg)
    if "saekit" in cfg:
        cfg = seal(cfg, CFG_SEAL)
    (run / "cfg.json").write_text(json.dumps(cfg))


def test_wrong_d_in_and_unknown_rule(tmp_path: Path) -> None:
    save_sae(trained_sae("topk"), tmp_path)
    _edit_cfg(tmp_path, lambda c: c["saekit"]["sae"].update(d_in=9))
    with pytest.raises(ValueError, match=r"W_enc has shape \(8, 24\).*d_in=9"):
        load_sae(tmp_path)
    _edit_cfg(tmp_path, lambda c: c["saekit"]["sae"].update(d_in=8, rule="nosuchrule"))
    with pytest.raises(ValueError, match="cfg.json: unknown rule 'nosuchrule'.*--plugin"):
        load_sae(tmp_path)
    _edit_cfg(tmp_path, lambda c: (c.pop("saekit"), c.update(architecture="temporal")))
    with pytest.raises(ValueError, match="unsupported SAELens architecture 'temporal'"):
        load_sae(tmp_path)


def test_corrupt_weights_named(tmp_path: Path) -> None:
    save_sae(trained_sae("topk"), tmp_path)
    f = tmp_path / "sae_weights.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ValueError, match="sae_weights.safetensors"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json is not valid JSON"):
        load_sae(tmp_path)


def test_atomic_write_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "w.safetensors"
    atomic.save_tensors(target, {"a": torch.ones(3)})
    before = target.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(atomic, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        atomic.save_tensors(target, {"a": torch.zeros(3)})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    with pytest.raises(OSError, match="disk full"):
        atomic.save_tensors(tmp_path / "new.safetensors", {"a": torch.zeros(3)})
    assert not (tmp_path / "new.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    save_file({"a": torch.ones(1)}, str(tmp_path / "x.safetensors"))  # sanity: real writer ok


def test_signed_rule_export_warns(tmp_path: Path) -> None:
    """A signed rule exported to an architecture that applies a ReLU warns; AbsTopK exports
    as SAELens's own abstopk (signed, exact) and does not."""
    import warnings

    sae = SAE(SAEConfig(d_in=8, d_sae=24, rule="vtopk", k=3, rule_options={"sample": True}))
    with pytest.warns(UserWarning, match="signed codes"):
        save_sae(sae, tmp_path / "v")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_sae(trained_sae("abstopk"), tmp_path / "a")
    assert json.loads((tmp_path / "a" / "cfg.json").read_text())["architecture"] == "abstopk"
