"""saekit bench: helpers, a miniature multi-seed run, the CLI, and every rule through
train + eval (with checked eval figures)."""

import json
import statistics

import pytest
import torch

import saekit.bench as bench
from saekit import SAE, DataConfig, SAEConfig
from saekit.cli import main
from saekit.config import to_dict
from saekit.io import save_sae
from saekit.rules import rule_names
from saekit.sources.synthetic import SITE, SyntheticConfig, SyntheticSource

MINI = bench.BenchSize(32, 16, 4096, 256, 1024, 2048, block_size=1024)
SYN = {"n_features": 32, "d": 16, "n_roots": 1, "depth": 2, "ortho_steps": 10, "seed": 7}


@pytest.fixture
def mini(monkeypatch):
    monkeypatch.setitem(bench.SIZES, "tiny", MINI)


def test_synthetic_downstream_grad_is_the_loss_gradient() -> None:
    syn = SyntheticSource(SyntheticConfig(**SYN))
    assert syn.request_inputs({"grad", "other"}) == {"grad"}
    b = syn.next_batch(8)
    x = b.acts[SITE].clone().requires_grad_(True)
    G, w = syn.dictionary, syn.downstream_weights
    loss = 0.5 * (w * ((x - syn.bias) @ G.T).pow(2)).sum()
    loss.backward()
    assert torch.allclose(b.inputs["grad"][SITE], x.grad, atol=1e-5)
    assert "grad" not in SyntheticSource(SyntheticConfig(**SYN)).next_batch(8).inputs


def test_eval_row_perfect_dictionary(tmp_path) -> None:
    """The bench's metrics are saekit eval's: a decoder equal to the true dictionary."""
    cfg = SyntheticConfig(**SYN)
    syn = SyntheticSource(cfg)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=4, rule="topk", init_b_dec="zeros"))
    with torch.no_grad():
        sae.W_dec.copy_(syn.dictionary)
        sae.W_enc.copy_(syn.dictionary.T)
        sae.b_dec.copy_(syn.bias)
    data = DataConfig(source="synthetic", sites=[SITE], synthetic=to_dict(cfg))
    save_sae(sae, tmp_path / "r", {"site": SITE, "data": to_dict(data)})
    r = bench.eval_row(tmp_path / "r", MINI)
    assert r["mcc"] == pytest.approx(1.0) and r["mmcs"] == pytest.approx(1.0)
    assert r["recovery"] == 1.0 and 0 < r["l0"] <= 4  # TopK then ReLU: at most k
    assert 0 <= r["fvu_down"] < 1 and 0 < r["fve"] <= 1


def test_pick_matched_closest_log_l0() -> None:
    res = {
        "topk": {"rule": "topk", "l0": 4.0},
        "relu[l1_coeff=1]": {"rule": "relu", "l0": 40.0},
        "relu[l1_coeff=3]": {"rule": "relu", "l0": 6.0},
        "relu[l1_coeff=10]": {"rule": "relu", "l0": 2.0},  # |log 0.5| > |log 1.5|
    }
    table, sweeps = bench.pick_matched(res, 4.0)
    assert list(table) == ["topk", "relu[l1_coeff=3]"]
    assert len(sweeps["relu"]) == 3


def test_variants_come_from_the_rules_sparsity_knobs() -> None:
    from saekit.rules import get_rule_class

    base = bench.base_sae_config(MINI, 3)
    v = bench.variants(["topk", "relu", "topafa", "feature_choice"], base, ["topk+zipf"])
    assert v["topk+aux_zipf"].aux == "zipf" and v["topk+aux_zipf"].rule == "topk"
    knob = get_rule_class("relu").sparsity
    grid = [n for n in v if bench.rule_of(n) == "relu"]
    assert grid == [f"relu[{knob.option}={g:g}]" for g in knob.grid]
    assert {v[n].rule_options[knob.option] for n in grid} == set(knob.grid)
    assert all(c.d_sae == 32 and c.k == 3 for c in v.values())
    assert "topafa" in v and v["topafa"].rule_options == {}  # a free L0: one variant
    assert bench.variants(["relu"], base, grids={"relu": [7]}).keys() == {"relu[l1_coeff=7]"}
    assert "topk+aux_zipf" not in bench.variants(["relu"], base, ["topk+zipf"])


def test_aggregate_is_mean_and_sd_over_seeds() -> None:
    per_seed = [
        {
            "topk": {"rule": "topk", "mcc": 0.5, "l0": 3.0},
            "relu[a=1]": {"rule": "relu", "mcc": 0.2},
        },
        {
            "topk": {"rule": "topk", "mcc": 0.7, "l0": 3.0},
            "relu[a=2]": {"rule": "relu", "mcc": 0.4},
        },
    ]
    rows = bench.aggregate(per_seed)
    assert rows["topk"]["mcc"]["mean"] == pytest.approx(0.6)
    assert rows["topk"]["mcc"]["sd"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert rows["topk"]["l0"]["sd"] == 0.0
    assert rows["relu"]["label"] == "relu[a=1|2]" and rows["relu"]["variants"] == [
        "relu[a=1]",
        "relu[a=2]",
    ]
    assert "0.600±0.141" in bench.format_table(rows)


def test_bench_end_to_end_two_seeds(mini, tmp_path) -> None:
    out = tmp_path / "b"
    cfg = bench.BenchConfig(
        size="tiny",
        seeds=[0, 1],
        out=str(out),
        rules=["topk", "abstopk", "relu", "gtopk"],
        grids={"relu": [0.3, 30.0]},
    )
    lines: list[str] = []
    report = bench.run_bench(cfg, log=lines.append)
    data = json.loads((out / "bench.json").read_text())
    assert set(data["seeds"]) == {"0", "1"}
    assert set(data["table"]) == {"topk", "abstopk", "gtopk", "relu", "topk+aux_zipf"}
    for s in data["seeds"].values():
        assert len(s["all_variants"]) == 6
        assert s["table"]["topk"]["l0"] == pytest.approx(s["k"])
        for r in s["table"].values():
            assert 0 <= r["mcc"] <= 1 and 0 <= r["f1"] <= 1 and 0 <= r["dead_frac"] <= 1
            assert r["fve"] <= 1 and r["fvu_down"] >= 0
    # the table is the mean and sd of the seeds' rows
    vals = [data["seeds"][s]["table"]["topk"]["mcc"] for s in ("0", "1")]
    assert data["table"]["topk"]["mcc"]["mean"] == pytest.approx(statistics.fmean(vals))
    assert data["table"]["topk"]["mcc"]["sd"] == pytest.approx(statistics.stdev(vals))
    assert set(data["signed"]) == {"topk", "abstopk"}
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every run is a saekit run directory; saekit eval on it gives the bench's figures
    from saekit.evaluate import EvalConfig, evaluate_run

    run = out / "runs" / "seed1" / "gtopk"
    ev = evaluate_run(run, cfg=EvalConfig(tokens=MINI.eval_tokens, baselines=False, plots=False))
    row = data["seeds"]["1"]["table"]["gtopk"]
    assert ev["sae"]["ground_truth"]["mcc"] == row["mcc"]
    assert ev["sae"]["core"]["fve"] == row["fve"]
    assert ev["sae"]["downstream"]["fvu_down"] == row["fvu_down"]
    # progress: a line per seed and per variant, in order, before the end
    assert lines[0].startswith("seed 0 (1/2)") and any(
        ln.startswith("seed 1 (2/2)") for ln in lines
    )
    trained = next(i for i, ln in enumerate(lines) if "trained in" in ln)
    assert any("gtopk" in ln and "MCC" in ln for ln in lines[trained:])
    assert lines[-1].startswith("done in")
    text = bench.report_text(report)
    assert "abstopk" in text and "bidirectional" in text and "±" in text


def test_bench_cli(mini, tmp_path, capsys) -> None:
    out = tmp_path / "c"
    args = ["bench", "--size", "tiny", "--rules", "topk", "--signed", "false", "--out", str(out)]
    assert main([*args, "--keep-runs", "false", "--seeds", "3", "--tokens", "2048"]) == 0
    cap = capsys.readouterr()
    assert "seed 3 (1/1)" in cap.err and "trained in" in cap.err  # progress on stderr
    table = cap.out.splitlines()
    row = next(ln for ln in table if ln.startswith("topk "))
    data = json.loads((out / "bench.json").read_text())
    assert row.split()[1] == f"{data['seeds']['3']['k']:.2f}"  # L0 = k; one seed: no ±
    assert data["size"]["tokens"] == 2048 and data["config"]["seeds"] == [3]
    assert data["seeds"]["3"]["train"]["tokens"] == 2048
    assert (out / "bench.json").is_file() and not (out / "runs").exists()
    assert main(["bench", "--size", "tiny", "--rules", "nope", "--out", str(out)]) == 1
    assert "nope" in capsys.readouterr().err


def _fve_by_hand(run, tokens: int) -> float:
    """Pooled FVE of the saved SAE on the eval stream, computed here from scratch."""
    from saekit.evaluate import EvalConfig
    from saekit.evaluate.run import eval_source
    from saekit.io import load_sae, read_run_info

    sae = load_sae(run)
    info = read_run_info(run)
    src = eval_source(info.data_config(), EvalConfig(tokens=tokens)).source
    src.request_inputs(set(sae.rule.requires))
    b = src.next_batch(tokens)
    x = b.acts[SITE]
    ins = {n: b.inputs[n][SITE] for n in sae.rule.requires if n in b.inputs}
    with torch.no_grad():
        x_hat = sae(x, inputs=ins or None).x_hat.double()
    x = x.double()
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.mark.parametrize("rule", rule_names())
def test_every_rule_trains_saves_loads_evaluates_via_cli(rule: str, tmp_path) -> None:
    run = tmp_path / rule
    syn = json.dumps(SYN)
    argv = ["train", "--source", "synthetic", "--synthetic", syn, "--rule", rule, "--d-sae", "32"]
    argv += ["--k", "3", "--total-tokens", "1024", "--batch-size", "256", "--out-dir", str(run)]
    argv += ["--progress", "false", "--dead-tokens", "512", "--aux-k", "8"]
    assert main(argv) == 0
    from saekit.evaluate.ground_truth import dictionary_metrics
    from saekit.io import load_sae

    sae = load_sae(run)
    assert sae.cfg.rule == rule
    ev = ["eval", str(run), "--tokens", "1024", "--batch-size", "1024"]
    assert main([*ev, "--baselines", "false", "--plots", "false"]) == 0
    res = json.loads((run / "eval.json").read_text())["sae"]
    # the figures are the SAE's, recomputed here: MCC from its decoder and the true
    # dictionary, FVE from its reconstructions of the same held-out tokens
    G = SyntheticSource(SyntheticConfig(**SYN)).dictionary
    assert res["ground_truth"]["mcc"] == pytest.approx(dictionary_metrics(sae.W_dec, G)["mcc"])
    assert 0 < res["ground_truth"]["mcc"] <= 1
    assert res["core"]["fve"] == pytest.approx(_fve_by_hand(run, 1024), abs=1e-5)
    assert 0 < res["core"]["l0"] <= 32 and res["core"]["n_tokens"] == 1024
