"""``saekit compress`` end to end on a tiny GPT-2 with a small BPE tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from saekit.cli import main
from saekit.compress import LowRankLinear, load_compressed
from saekit.compress.data import (
    builtin_texts,
    chunk_batches,
    token_stream,
    train_bpe_tokenizer,
)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("tiny_lm")
    tok = train_bpe_tokenizer(builtin_texts("train")[:6], 300)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=32)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d, tok


SMALL = ["--calib-seqs", "4", "--seq-len", "16", "--batch-size", "4", "--eval-seqs", "4"]


def test_builtin_split_is_disjoint_and_deterministic():
    train, test = builtin_texts("train"), builtin_texts("test")
    assert len(train) + len(test) == len(builtin_texts("all"))
    assert not set(train) & set(test) and len(test) >= 5
    assert builtin_texts("test") == test
    with pytest.raises(ValueError, match="split"):
        builtin_texts("dev")
    with pytest.raises(ValueError, match="tokens"):
        chunk_batches(torch.arange(5), 16, 2)


def test_cli_compress_saves_loadable_model(tiny_lm, tmp_path, capsys):
    d, tok = tiny_lm
    out = tmp_path / "c"
    rc = main(
        [
            "compress",
            "--model",
            str(d),
            "--method",
            "svdllm",
            "--ratio",
            "0.4",
            "--out",
            str(out),
            *SMALL,
        ]
    )
    assert rc == 0
    assert "held-out ppl" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert report["weights_bytes"] == (out / "model.safetensors").stat().st_size
    assert report["ppl_compressed"] > 0 and len(report["layer_out_err"]) == 8
    model = load_compressed(out)
    assert isinstance(model.get_submodule("transformer.h.1.mlp.c_fc"), LowRankLinear)
    ids = chunk_batches(token_stream(tok, builtin_texts("test")), 16, 2, 2)[0]
    assert torch.isfinite(model(ids).logits).all()


def test_cli_table(tiny_lm, tmp_path, capsys):
    d, _ = tiny_lm
    rc = main(
        [
            "compress",
            "--model",
            str(d),
            "--table",
            "--ratios",
            "0.5",
            "--methods",
            "svd",
            "saes",
            "--grid",
            "5",
            "--out",
            str(tmp_path),
            *SMALL,
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "| SVD |" in text and "| SAES-SVD |" in text
    res = json.loads((tmp_path / "table.json").read_text())
    assert [(r["method"], r["ratio"]) for r in res["rows"]] == [("svd", 0.5), ("saes", 0.5)]
    assert all(r["params_after"] < res["params_original"] for r in res["rows"])
    md = (tmp_path / "table.md").read_text()  # the README's "markdown + table.json"
    assert "| SVD |" in md and md.strip() in text


def test_cli_bad_input(tmp_path, capsys):
    assert main(["compress", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 1
    assert "not a directory" in capsys.readouterr().err
