"""The apply commands end to end on a saved run over a tiny GPT-2."""

from __future__ import annotations

import json
import random

import pytest
import torch

from saekit import SAE, SAEConfig
from saekit.apply.toy import save_lm, tiny_gpt2, word_tokenizer
from saekit.cli import main
from saekit.io import save_sae

SITE = "layers.1.resid_post"
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "mat",
    "sat",
    "ran",
    "on",
    "in",
    "big",
    "red",
    "def",
    "return",
    "for",
    "x",
    "print",
    "class",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(30)]
    (root / "a.txt").write_text("\n\n".join(texts[:15]))
    (root / "b.txt").write_text("\n\n".join(texts[15:]))
    rows = [{"text": t + (" zebra" if i % 2 else ""), "label": i % 2} for i, t in enumerate(texts)]
    (root / "lab.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tok = word_tokenizer(texts + ["zebra"], vocab_size=64)
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=0)
    lm = save_lm(model, tok, root / "lm")
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, k=4))
    data = {"model": lm, "sites": [SITE], "dataset": str(root / "a.txt"), "context_len": 32}
    save_sae(sae, root / "run", extra_cfg={"site": SITE, "data": data})
    return root


def test_steer_prints_both_continuations(run, capsys):
    rc = main(
        [
            "steer",
            str(run / "run"),
            "--prompt",
            "the cat",
            "--feature",
            "3:40",
            "--feature",
            "7:-20",
            "--max-new-tokens",
            "5",
            "--top",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "unsteered  :" in out and "steered    :" in out and "add 3:+40, 7:-20" in out
    assert out.count("  feature ") == 3
    rc = main(["steer", str(run / "run"), "--prompt", "the cat", "--feature", "3:40", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res[0]["steered"] != res[0]["unsteered"]


def test_ablate_and_classify(run, capsys):
    assert (
        main(
            [
                "ablate",
                str(run / "run"),
                "--data",
                str(run / "a.txt"),
                "--top-n",
                "3",
                "--limit",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "clean next-token loss" in out and out.count("\n") >= 5
    rc = main(
        ["ablate", str(run / "run"), "--text", "the cat sat", "--features", "1", "2", "--json"]
    )
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and {r["feature"] for r in rep["per_feature"]} == {1, 2}
    rc = main(
        [
            "classify",
            str(run / "run"),
            "--data",
            str(run / "lab.jsonl"),
            "--out",
            str(run / "cls.json"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "rule " in out and "probe" in out and "chance" in out
    assert json.loads((run / "cls.json").read_text())["positive"] == "1"


def test_footprint_and_dashboard(run, capsys):
    rc = main(
        [
            "footprint",
            str(run / "run"),
            "--data",
            f"A={run / 'a.txt'}",
            str(run / "b.txt"),
            "--out",
            str(run / "fp"),
            "--subsample",
            "5",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "redundancy" in out
    rep = json.loads((run / "fp" / "footprint.json").read_text())
    assert rep["names"] == ["A", "b"] and rep["redundancy"][0][0] == 1.0
    assert (run / "fp" / "redundancy.png").is_file()
    assert len(rep["subsample"]["A"]["indices"]) == 5
    rc = main(
        [
            "dashboard",
            str(run / "run"),
            "--out",
            str(run / "dash"),
            "--features",
            "4",
            "--tokens",
            "200",
        ]
    )
    assert rc == 0
    assert (run / "dash" / "index.html").is_file()
    assert len(list((run / "dash" / "features").glob("*.html"))) == 4


def test_clear_errors(run, capsys):
    assert main(["steer", str(run / "nope"), "--prompt", "x", "--feature", "1:1"]) == 1
    assert "SAE not found" in capsys.readouterr().err
    assert main(["steer", str(run / "run"), "--prompt", "x", "--feature", "1:x"]) == 1
    assert "INDEX:VALUE" in capsys.readouterr().err
    assert main(["steer", str(run / "run"), "--prompt", "x", "--feature", "99:1"]) == 1
    assert "out of range" in capsys.readouterr().err
    assert main(["classify", str(run / "run"), "--data", str(run / "missing.jsonl")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["dashboard", str(run / "run"), "--out", str(run / "d2"), "--site", "x.1"]) == 1
    assert "bad hook site" in capsys.readouterr().err


def test_flags_come_from_the_option_dataclasses(run, capsys):
    # DashboardConfig's fields are flags too (main at 9e49562 copied six of them by hand)
    args = ["dashboard", str(run / "run"), "--out", str(run / "dash3"), "--features", "2"]
    opts = ["--tokens", "200", "--n-quantiles", "2", "--per-quantile", "1", "--bins", "5"]
    assert main([*args, *opts]) == 0
    capsys.readouterr()
    # values are checked by the declarations, before any model is loaded
    bad = ["classify", str(run / "run"), "--data", str(run / "lab.jsonl"), "--test-size", "1.5"]
    assert main(bad) == 1
    assert "ClassifyConfig.test_size = 1.5 must be < 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["steer", str(run / "run"), "--prompt", "x", "--mode", "boost"])
    assert "invalid choice: 'boost'" in capsys.readouterr().err
