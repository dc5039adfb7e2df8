"""saekit bench: helpers, a miniature end-to-end run, and every rule through the CLI."""

import json

import pytest
import torch

import saekit.bench as bench
from saekit import SAE, SAEConfig
from saekit.cli import main
from saekit.rules import rule_names
from saekit.sources.synthetic import SyntheticConfig, SyntheticSource

MINI = bench.BenchSize(32, 16, 4096, 256, 1024, 2048, block_size=1024)
SYN = {"n_features": 32, "d": 16, "n_roots": 1, "depth": 2, "ortho_steps": 10, "seed": 7}


@pytest.fixture
def mini(monkeypatch):
    monkeypatch.setitem(bench.SIZES, "tiny", MINI)
    monkeypatch.setattr(bench, "GRIDS", {"relu": ("l1_coeff", [0.3, 30.0], {})})


def test_downstream_grad_is_the_loss_gradient() -> None:
    syn = SyntheticSource(SyntheticConfig(**SYN))
    w = torch.rand(32) + 0.1
    src = bench.DownstreamGradSource(syn, w)
    b = src.next_batch(8)
    x = b.acts["synthetic"].clone().requires_grad_(True)
    G = syn.dictionary
    loss = 0.5 * (w * ((x - syn.bias) @ G.T).pow(2)).sum()
    loss.backward()
    assert torch.allclose(b.inputs["grad"]["synthetic"], x.grad, atol=1e-5)
    assert src.state_dict()["pos"] == 8


def test_evaluate_sae_perfect_dictionary() -> None:
    syn = SyntheticSource(SyntheticConfig(**SYN))
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=4, rule="topk", init_b_dec="zeros"))
    with torch.no_grad():
        sae.W_dec.copy_(syn.dictionary)
    data = bench.eval_batches(syn, 600)
    assert sum(x.shape[0] for x, _ in data) == 600
    r = bench.evaluate_sae(sae, data, syn.dictionary)
    assert r["mcc"] == pytest.approx(1.0) and r["mmcs"] == pytest.approx(1.0)
    assert r["recovery"] == 1.0
    assert r["l0"] == pytest.approx(4.0)
    # held-out blocks differ from the training stream's first block
    assert not torch.equal(data[0][0][:8], syn.next_batch(8).acts["synthetic"])


def test_pick_matched_closest_log_l0() -> None:
    res = {
        "topk": {"rule": "topk", "l0": 4.0},
        "relu[l1_coeff=1]": {"rule": "relu", "l0": 40.0},
        "relu[l1_coeff=3]": {"rule": "relu", "l0": 6.0},
        "relu[l1_coeff=10]": {"rule": "relu", "l0": 2.0},  # |log 0.5| > |log 1.5|
        "_meta": {},
    }
    table, sweeps = bench.pick_matched(res, 4.0)
    assert list(table) == ["topk", "relu[l1_coeff=3]"]
    assert len(sweeps["relu"]) == 3


def test_variants_cover_rules_and_grids() -> None:
    base = bench.base_sae_config(MINI, 3, 1000)
    v = bench.variants(["topk", "relu", "feature_choice"], base)
    assert "topk+aux_zipf" in v and v["topk+aux_zipf"].aux == "zipf"
    assert sum(bench.rule_of(n) == "relu" for n in v) == len(bench.GRIDS["relu"][1])
    assert all(c.d_sae == 32 and c.k == 3 for c in v.values())


def test_bench_end_to_end(mini, tmp_path) -> None:
    out = tmp_path / "b"
    cfg = bench.BenchConfig(size="tiny", out=str(out), rules=["topk", "abstopk", "relu"])
    report = bench.run_bench(cfg)
    data = json.loads((out / "bench.json").read_text())
    assert set(data["table"]) == {"topk", "abstopk", "topk+aux_zipf"} | {
        n for n in data["table"] if n.startswith("relu[")
    }
    assert sum(n.startswith("relu[") for n in data["table"]) == 1
    assert len(data["all_variants"]) == 5
    k = data["k"]
    assert data["table"]["topk"]["l0"] == pytest.approx(k)
    for r in data["table"].values():
        assert 0 <= r["mcc"] <= 1 and 0 <= r["f1"] <= 1 and 0 <= r["dead_frac"] <= 1
        assert r["fve"] <= 1 and "fvu_down" in r
    assert set(data["signed"]) == {"topk", "abstopk", "_meta"}
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "runs" / "topk" / "cfg.json").is_file()
    # a bench run carries its data config: `saekit eval` rebuilds the ground truth
    from saekit.evaluate import EvalConfig, evaluate_run

    ev = evaluate_run(out / "runs" / "topk", cfg=EvalConfig(tokens=2048))
    assert ev["sae"]["ground_truth"]["mcc"] == pytest.approx(data["table"]["topk"]["mcc"], abs=0.02)
    text = bench.report_text(report)
    assert "abstopk" in text and "bidirectional" in text


def test_bench_cli(mini, tmp_path, capsys) -> None:
    out = tmp_path / "c"
    args = ["bench", "--size", "tiny", "--rules", "topk", "--signed", "false", "--out", str(out)]
    assert main([*args, "--keep-runs", "false"]) == 0
    assert "topk" in capsys.readouterr().out
    assert (out / "bench.json").is_file() and not (out / "runs").exists()
    assert main(["bench", "--size", "tiny", "--rules", "nope", "--out", str(out)]) == 1
    assert "unknown rule" in capsys.readouterr().err


@pytest.mark.parametrize("rule", rule_names())
def test_every_rule_trains_saves_loads_evaluates_via_cli(rule: str, tmp_path) -> None:
    run = tmp_path / rule
    syn = json.dumps(SYN)
    argv = ["train", "--source", "synthetic", "--synthetic", syn, "--rule", rule, "--d-sae", "32"]
    argv += ["--k", "3", "--total-tokens", "1024", "--batch-size", "256", "--out-dir", str(run)]
    argv += ["--progress", "false", "--dead-tokens", "512", "--aux-k", "8"]
    assert main(argv) == 0
    from saekit.io import load_sae

    sae = load_sae(run)
    assert sae.cfg.rule == rule
    assert (
        main(["eval", str(run), "--tokens", "1024", "--baselines", "false", "--plots", "false"])
        == 0
    )
    res = json.loads((run / "eval.json").read_text())
    flat = json.dumps(res)
    assert "mcc" in flat and "fve" in flat
