"""``saekit compress`` end to end on a tiny GPT-2 with a small BPE tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saekit.cli import main
from saekit.compress import LowRankLinear, load_compressed
from saekit.compress.data import builtin_texts, chunk_batches, token_stream, train_bpe_tokenizer


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


def test_builtin_split_is_saekits_one_split():
    """Calibration / held-out text is saekit's split (every 10th document held out), with no
    second split of its own (the old fallback held out every 8th)."""
    from saekit.sources.text import iter_texts

    train, test = builtin_texts("train"), builtin_texts("test")
    assert len(train) + len(test) == len(builtin_texts("all"))
    assert not set(train) & set(test) and len(test) >= 5
    assert test == list(iter_texts("", split="test")) and train == list(iter_texts(""))
    with pytest.raises(ValueError, match="split"):
        builtin_texts("dev")
    with pytest.raises(ValueError, match="tokens"):
        chunk_batches(torch.arange(5), 16, 2)
    import saekit.compress.data as data

    assert not hasattr(data, "HELDOUT_EVERY") and not hasattr(data, "_fallback_builtin")


def test_cli_compress_reports_and_saves(tiny_lm, tmp_path, capsys):
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
            "--ratio-attn",
            "0.2",
            "--out",
            str(out),
            *SMALL,
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "held-out ppl" in text and "tokens/s" in text and "MB" in text
    rep = json.loads((out / "report.json").read_text())
    b, a = rep["before"], rep["after"]
    assert a["params"] < b["params"] and a["weights_bytes"] < b["weights_bytes"]
    assert a["weights_bytes"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert b["ppl"] > 0 and a["ppl"] > 0 and b["throughput"]["tokens_per_s"] > 0
    assert rep["eval"]["seq_len"] == 32  # the model's full context (n_positions)
    assert rep["config"]["ratio_attn"] == 0.2 and rep["run"]["calib_seqs"] == 4
    assert len(rep["layers"]) == 8 and len(rep["blocks"]) == 2
    model = load_compressed(out)
    assert isinstance(model.get_submodule("transformer.h.1.mlp.c_fc"), LowRankLinear)
    ids = chunk_batches(token_stream(tok, builtin_texts("test")), 16, 2, 2)[0]
    assert torch.isfinite(model(ids).logits).all()


def test_cli_eval_file_at_full_context(tiny_lm, tmp_path, capsys):
    d, _ = tiny_lm
    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(builtin_texts("test")[:3]))
    out = tmp_path / "e"
    rc = main(
        [
            "compress",
            "--model",
            str(d),
            "--method",
            "svd",
            "--out",
            str(out),
            "--eval-file",
            str(text),
            "--throughput",
            "false",
            *SMALL[:6],
        ]
    )
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["eval"]["source"] == str(text) and rep["eval"]["seq_len"] == 32
    assert rep["eval"]["windows"] >= 2 and "throughput" not in rep["before"]


def test_cli_keeps_a_bf16_checkpoint_in_bf16(tiny_lm, tmp_path):
    """Issue 16 item 4: the command no longer forces fp32 (the old one called ``.float()``).
    ``--dtype bfloat16`` compresses and saves a bf16 checkpoint in bf16; ``auto`` keeps the
    checkpoint's dtype on CUDA and gives float32 on CPU (CPU bf16 matmuls are slow)."""
    from transformers import AutoModelForCausalLM

    d, tok = tiny_lm
    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(d).to(torch.bfloat16).save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "c"
    argv = ["compress", "--model", str(src), "--method", "saes", "--dtype", "bfloat16"]
    rc = main([*argv, "--out", str(out), "--throughput", "false", "--grid", "0", *SMALL])
    assert rc == 0
    model = load_compressed(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert json.loads((out / "compression.json").read_text())["dtype"] == "bfloat16"
    from saekit.compress.config import CompressRunConfig
    from saekit.compress.run import model_dtype

    assert model_dtype(CompressRunConfig(model=str(src), device="cuda:0"), src) == torch.bfloat16
    assert model_dtype(CompressRunConfig(model=str(src)), src) == torch.float32


def test_cli_table_with_seeds(tiny_lm, tmp_path, capsys):
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
            "--seeds",
            "0",
            "1",
            "--grid",
            "5",
            "--out",
            str(tmp_path),
            *SMALL,
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "| SVD |" in text and "| SAES-SVD (β ACES exact) |" in text and " ± " in text
    res = json.loads((tmp_path / "table.json").read_text())
    assert [(r["method"], r["seed"]) for r in res["rows"]] == [
        ("svd", 0),
        ("saes", 0),
        ("svd", 1),
        ("saes", 1),
    ]
    summ = {s["label"]: s for s in res["summary"]}
    assert summ["SVD"]["n"] == 2 and math.isfinite(summ["SVD"]["ppl_sd"])
    assert summ["SVD"]["ppl_sd"] == 0  # data-free: the calibration seed cannot matter
    assert all(r["params_after"] < res["params_original"] for r in res["rows"])
    md = (tmp_path / "table.md").read_text()  # the README's "markdown + table.json"
    assert "| SVD |" in md and md.strip() in text


def test_cli_bad_input(tmp_path, capsys):
    assert main(["compress", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert main(["compress", "--model", str(tmp_path)]) == 1
    assert "--out" in capsys.readouterr().err
