"""Re-running a finished run, ``--resume false``, and errors that name the file (items 8, 9, 11).

Each test failed on 9e49562: a re-run recomputed (the HF shuffle buffer refilled through the
model), rewrote cfg.json with empty final metrics and returned no metrics; ``--resume
false`` appended to the old metrics log; ``saekit cache --source synthetic`` named the
wrong site; ``saekit eval`` on a Qwen-Scope ``.pt`` failed with a FileExistsError; and
bad bytes or corrupt files gave bare errors that named no file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fault_helpers import SYN, syn_flags, tiny_cache, tiny_train
from saekit.cli import main
from saekit.errors import FormatError
from saekit.io import checkpoint as ckpt
from saekit.io import load_sae
from saekit.sources.cache import CacheSource
from saekit.sources.synthetic import SyntheticConfig, SyntheticSource


class Counting(SyntheticSource):
    calls = 0

    def next_batch(self, batch_size: int):
        Counting.calls += 1
        return super().next_batch(batch_size)

    def load_state_dict(self, state: dict) -> None:
        raise AssertionError("a finished run must not restore (replay) its source")


# ------------------------------------------------------------------ item 11
def test_rerun_of_finished_run_does_nothing(tmp_path: Path) -> None:
    first = tiny_train(tmp_path)
    assert (
        first.completed and first.metrics["synthetic"]["fve"] == first.metrics["synthetic"]["fve"]
    )
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
    Counting.calls = 0
    again = tiny_train(tmp_path, source=Counting(SyntheticConfig(**SYN)))
    assert Counting.calls == 0
    assert again.already_finished and again.completed and again.steps == first.steps
    assert again.metrics == json.loads(json.dumps(first.metrics))
    for k, v in first.sae.state_dict().items():
        assert torch.equal(again.sae.state_dict()[k], v), k
    now = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
    assert now == files  # nothing rewritten
    saved = json.loads((tmp_path / "cfg.json").read_text())["saekit"]["final_metrics"]
    assert saved and saved["fve"] == again.metrics["synthetic"]["fve"]


def test_cli_rerun_prints_saved_metrics(tmp_path: Path, capsys) -> None:
    flags = syn_flags(tmp_path / "run")
    assert main(["train", *flags]) == 0
    first = capsys.readouterr().out
    assert main(["train", *flags]) == 0
    out = capsys.readouterr().out
    assert out.startswith("already finished: 8 steps") and "nothing recomputed" in out
    fve_line = [ln for ln in first.splitlines() if "FVE" in ln]
    assert fve_line and fve_line[0] in out


def test_cli_rerun_builds_no_source(tmp_path: Path, monkeypatch, capsys) -> None:
    """The finished run is recognised before any model or source is built."""
    import saekit.sources

    flags = syn_flags(tmp_path / "run")
    assert main(["train", *flags]) == 0

    def refuse(*a, **k):
        raise AssertionError("a finished run must not build its source")

    monkeypatch.setattr(saekit.sources, "build_source", refuse)
    assert main(["train", *flags]) == 0
    assert "already finished" in capsys.readouterr().out


def test_killed_after_last_checkpoint_keeps_final_metrics(tmp_path: Path) -> None:
    """Final files lost after the last checkpoint: the re-run writes them with the metrics
    the checkpoint recorded (9e49562 wrote empty final metrics)."""
    tiny_train(tmp_path)
    (tmp_path / "cfg.json").unlink()
    res = tiny_train(tmp_path)
    saved = json.loads((tmp_path / "cfg.json").read_text())["saekit"]["final_metrics"]
    assert saved and res.metrics["synthetic"] and not res.already_finished


# ------------------------------------------------------------------ item 9
def test_resume_false_keeps_the_old_log_aside(tmp_path: Path) -> None:
    tiny_train(tmp_path, stop_after_steps=4)
    old = (tmp_path / "metrics.jsonl").read_text()
    tiny_train(tmp_path, resume=False)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert (tmp_path / "metrics.old-1.jsonl").read_text() == old


def test_cache_command_names_the_synthetic_site(tmp_path: Path, capsys) -> None:
    out = tmp_path / "c"
    args = ["cache", "--out", str(out), "--tokens", "64", "--source", "synthetic"]
    assert main([*args, "--synthetic", json.dumps(SYN)]) == 0
    printed = capsys.readouterr().out
    assert "64 tokens of synthetic)" in printed and "layers.3" not in printed


def test_eval_on_a_qwen_scope_file(tmp_path: Path, capsys) -> None:
    F, d = 96, 384  # the built-in MiniLM's width
    g = torch.Generator().manual_seed(0)
    W = torch.randn(F, d, generator=g) / d**0.5
    f = tmp_path / "L0_8" / "layer3.sae.pt"
    f.parent.mkdir()
    sd = {"W_enc": W, "b_enc": torch.zeros(F), "W_dec": W.t().contiguous(), "b_dec": torch.zeros(d)}
    torch.save(sd, f)
    opts = ["--tokens", "256", "--batch-size", "128", "--pca-fit-tokens", "128"]
    opts += ["--baselines", "false", "--plots", "false", "--splice-tokens", "0"]
    assert main(["eval", str(f), "--model", "", "--site", "layers.3.resid_post", *opts]) == 0
    res = json.loads((tmp_path / "L0_8" / "layer3.sae.pt.eval" / "eval.json").read_text())
    assert res["sae_info"]["k"] == 8 and res["sae"]["core"]["l0"] == pytest.approx(8.0)
    assert main(["eval", str(f), *opts]) == 1  # without --model: one clear line
    assert "pass the model and hook site" in capsys.readouterr().err


# ------------------------------------------------------------------ item 8
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_text_names_file_and_line(tmp_path: Path, suffix: str) -> None:
    from saekit.sources.text import iter_texts

    f = tmp_path / f"corpus{suffix}"
    good = b'{"text": "fine"}\n' if suffix == ".jsonl" else b"fine\n"
    f.write_bytes(good + b'{"text": "caf\xe9"}\n')
    with pytest.raises(FormatError, match=rf"corpus\{suffix}:2: byte 0xe9 at column"):
        list(iter_texts(str(f)))


def test_bad_byte_in_metrics_does_not_block_resume(tmp_path: Path) -> None:
    ref = tiny_train(tmp_path / "ref")
    run = tmp_path / "run"
    tiny_train(run, stop_after_steps=4)
    m = run / "metrics.jsonl"
    raw = bytearray(m.read_bytes())
    raw[10] = 0xFF
    m.write_bytes(bytes(raw))
    res = tiny_train(run)
    for k, v in ref.sae.state_dict().items():
        assert torch.equal(res.sae.state_dict()[k], v), k
    steps = [json.loads(x)["step"] for x in m.read_text().splitlines()]
    assert steps == list(range(2, 9))  # the damaged first line is dropped, the rest kept


def test_non_utf8_manifest_names_it(tmp_path: Path) -> None:
    c = tiny_cache(tmp_path / "c")
    man = c / "manifest.json"
    man.write_bytes(man.read_bytes().replace(b'"format"', b'"f\xffrmat"'))
    with pytest.raises(FormatError, match="manifest.json"):
        CacheSource(c)


def test_manifest_with_float64_names_the_dtype(tmp_path: Path) -> None:
    c = tiny_cache(tmp_path / "c")
    man = json.loads((c / "manifest.json").read_text())
    man["dtype"] = "float64"
    (c / "manifest.json").write_text(json.dumps(reseal(man)))
    with pytest.raises(FormatError, match=r"manifest.json: dtype 'float64' is not one of"):
        CacheSource(c)  # 9e49562: KeyError 'float64' ("error: 'float64'")


def reseal(man: dict) -> dict:
    """``man`` sealed again after an edit (a manifest as a buggy writer might have written it;
    9e49562 wrote no seal, so this test runs there unchanged)."""
    try:
        from saekit.io.integrity import seal
        from saekit.sources.cache import SEAL
    except ImportError:
        return man
    return seal({k: v for k, v in man.items() if k != SEAL[0]}, SEAL)


def test_checkpoint_without_misc_names_state_json(tmp_path: Path) -> None:
    tiny_train(tmp_path, stop_after_steps=4)
    meta, files = ckpt.read_checkpoint(tmp_path / "checkpoint")
    files.pop("misc")
    ckpt.write_checkpoint(
        tmp_path / "checkpoint", files, {k: v for k, v in meta.items() if k != "files"}
    )
    with pytest.raises(ckpt.CheckpointError, match=r"state.json lacks 'misc'"):
        tiny_train(tmp_path)  # 9e49562: KeyError 'misc' ("error: 'misc'")


def test_negative_k_is_named(tmp_path: Path) -> None:
    tiny_train(tmp_path)
    with pytest.raises(ValueError, match=r"k must be a positive integer.*-3"):
        load_sae(tmp_path, k=-3)  # 9e49562: "selected index k out of range" at encode
    bad = syn_flags(tmp_path / "neg", k=-3)
    assert main(["train", *bad]) == 1


def test_corrupt_compression_json_names_it(tmp_path: Path) -> None:
    from saekit.compress.io import read_meta

    (tmp_path / "compression.json").write_text('{"format": ')
    with pytest.raises(FormatError, match="compression.json"):
        read_meta(tmp_path)
    (tmp_path / "compression.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(FormatError, match="compression.json"):
        read_meta(tmp_path)
