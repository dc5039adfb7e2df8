"""Seam 1: a rule written in a user's own module (tests/plugin_rules.py) trains, saves,
loads, exports and is listed, through --plugin, SAEKIT_PLUGINS or an entry point, with no
change to saekit; rule modules inside saekit are discovered, not listed by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from saekit import SAE, SAEConfig
from saekit.cli import main
from saekit.errors import FormatError
from saekit.io import load_sae, save_sae
from saekit.io.saelens import sae_from_saelens, saelens_export

TESTS = Path(__file__).resolve().parent
SYN = {"n_features": 32, "d": 16, "n_roots": 1, "depth": 2, "ortho_steps": 10, "seed": 7}
PEERS = TESTS.parent / "benchmarks" / ".peers" / "bin" / "python"


def _train_argv(rule: str, run: Path) -> list[str]:
    argv = ["train", "--source", "synthetic", "--synthetic", json.dumps(SYN), "--rule", rule]
    argv += ["--d-sae", "32", "--k", "3", "--total-tokens", "1024", "--batch-size", "256"]
    return argv + ["--out-dir", str(run), "--progress", "false"]


def test_builtin_rule_modules_are_discovered() -> None:
    import pkgutil

    import saekit.rules as rules

    files = {m.name for m in pkgutil.iter_modules(rules.__path__)} - {"base"}
    assert set(rules.RULE_MODULES) == files
    modules = {rules.get_rule_class(n).__module__.rsplit(".", 1)[1] for n in rules.rule_names()}
    assert modules == files  # every file registers a rule, every rule comes from a file


def test_plugin_rule_lists_trains_saves_loads_evaluates(plugin, tmp_path, capsys) -> None:
    assert main(["--plugin", plugin, "rules"]) == 0
    out = capsys.readouterr().out
    assert "plugin_floor" in out and "rule_options.decay" in out and "plugin_every" in out
    run = tmp_path / "run"
    assert main(["--plugin", plugin, *_train_argv("plugin_floor", run)]) == 0
    sae = load_sae(run)
    assert type(sae.rule).__module__ == "plugin_rules" and float(sae.rule.floor) > 0
    x = torch.randn(64, 16)
    with torch.no_grad():
        codes = sae.encode(x).to_dense()
    pre = sae.encode_pre(x).detach()
    assert torch.equal(codes != 0, pre > sae.rule.floor)
    ev = ["eval", str(run), "--tokens", "512", "--baselines", "false", "--plots", "false"]
    assert main(["--plugin", plugin, *ev]) == 0
    assert json.loads((run / "eval.json").read_text())["sae"]["core"]["l0"] > 0
    # the export hook wrote the SAELens fields and tensors
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["saekit"]["rule_module"] == "plugin_rules"
    from safetensors.torch import load_file

    th = load_file(str(run / "sae_weights.safetensors"))["threshold"]
    assert torch.equal(th, sae.rule.floor.expand(32))


def test_plugin_import_hook_and_refused_export(plugin, tmp_path) -> None:
    from saekit.plugins import load_plugins

    load_plugins([plugin])
    # import hook: a plain SAELens cfg of the architecture the plugin claims
    sae = SAE(SAEConfig(d_in=8, d_sae=16, rule="plugin_floor", k=2))
    w = {n: p.detach().clone() for n, p in sae.named_parameters()}
    w["floor"] = torch.tensor([0.25])
    cfg = {"architecture": "plugin_floor_arch", "d_in": 8, "d_sae": 16, "k": 4, "decay": 0.9}
    back = sae_from_saelens(cfg, w)
    assert back.cfg.rule == "plugin_floor" and back.cfg.k == 4 and back.rule.opts.decay == 0.9
    assert float(back.rule.floor) == 0.25
    # a rule may refuse the export: a clear error, and save_sae still writes a saekit dir
    ne = SAE(SAEConfig(d_in=8, d_sae=16, rule="plugin_noexport", k=2))
    with pytest.raises(FormatError, match="SAELens has no equivalent"):
        saelens_export(ne)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_sae(ne, tmp_path / "ne")
    assert any("not loadable by SAELens" in str(c.message) for c in caught)
    cfg = json.loads((tmp_path / "ne" / "cfg.json").read_text())
    assert cfg["architecture"] == "saekit.plugin_noexport"
    assert cfg["saekit"]["saelens_export"].startswith("refused: plugin_noexport")
    x = torch.randn(10, 8)
    ne.eval()
    assert torch.equal(load_sae(tmp_path / "ne").encode(x).to_dense(), ne.encode(x).to_dense())


def _saekit(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from saekit.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        cwd=cwd,
        timeout=300,
    )


def test_a_fresh_process_loads_the_run_with_the_env_plugin_and_says_what_is_missing(
    plugin, tmp_path
) -> None:
    run = tmp_path / "run"
    assert main(["--plugin", plugin, *_train_argv("plugin_floor", run)]) == 0
    path = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    ev = ["eval", str(run), "--tokens", "256", "--baselines", "false", "--plots", "false"]
    r = _saekit(ev, {**path, "SAEKIT_PLUGINS": plugin}, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    # without the plugin: a clear one-line error naming the rule and how to import it
    r = _saekit(ev, path, tmp_path)
    assert r.returncode == 1
    assert "unknown rule 'plugin_floor'" in r.stderr and "--plugin" in r.stderr
    assert "plugin_rules" in r.stderr and "Traceback" not in r.stderr


def test_entry_point_plugin(plugin, tmp_path, monkeypatch) -> None:
    from saekit import plugins
    from saekit.rules import rule_names

    assert "plugin_floor" not in rule_names()
    site = tmp_path / "site"
    dist = site / "fakeplug-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[saekit.plugins]\nfloor = {plugin}\n")
    monkeypatch.syspath_prepend(str(site))
    plugins._auto_done = False  # as in a fresh process
    assert "plugin_floor" in rule_names()


def test_env_var_plugin(plugin, monkeypatch) -> None:
    from saekit import plugins
    from saekit.rules import get_rule_class

    monkeypatch.setenv("SAEKIT_PLUGINS", f" {plugin} ,")
    plugins._auto_done = False
    assert get_rule_class("plugin_noexport").__module__ == plugin  # loaded on a miss


def test_plugin_as_a_file_and_a_missing_one(plugin, capsys) -> None:
    assert main(["--plugin", str(TESTS / "plugin_rules.py"), "rules"]) == 0
    assert "plugin_noexport" in capsys.readouterr().out
    assert main(["--plugin", "no_such_module_xyz", "rules"]) == 1
    err = capsys.readouterr().err
    assert "no_such_module_xyz" in err and "PYTHONPATH" in err


@pytest.mark.skipif(not PEERS.exists(), reason="benchmarks/.peers venv not set up")
def test_sae_lens_loads_a_plugin_rule(plugin, tmp_path) -> None:
    from saekit.plugins import load_plugins

    load_plugins([plugin])
    sae = SAE(SAEConfig(d_in=8, d_sae=16, rule="plugin_floor", k=3))
    sae.train()
    x = torch.randn(64, 8)
    sae.init_from_data(x)
    sae(x)
    sae.eval()
    save_sae(sae, tmp_path / "p")
    from safetensors.torch import save_file

    with torch.no_grad():
        save_file({"x": x, "x_hat": sae(x).x_hat.contiguous()}, str(tmp_path / "ref.st"))
    code = (
        "import sys, torch, warnings; warnings.filterwarnings('ignore');"
        "from safetensors.torch import load_file; from sae_lens import SAE;"
        "s = SAE.load_from_disk(sys.argv[1]); r = load_file(sys.argv[2]);"
        "print(float((s(r['x']) - r['x_hat']).abs().max()))"
    )
    out = subprocess.run(
        [str(PEERS), "-c", code, str(tmp_path / "p"), str(tmp_path / "ref.st")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip()) < 1e-5
