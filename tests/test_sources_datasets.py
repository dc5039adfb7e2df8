"""The HF ``datasets`` path on local files: json / parquet / text / csv builders with
``data_files``, ``load_from_disk`` (Dataset and DatasetDict), streaming on and off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saekit.config import DataConfig
from saekit.errors import DataError
from saekit.sources.text import iter_texts

datasets = pytest.importorskip("datasets", reason="datasets is a dev/[datasets] extra")

DOCS = [f"document number {i} says {'word ' * (i % 5)}".strip() for i in range(30)]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    half = len(DOCS) // 2
    for i, part in enumerate((DOCS[:half], DOCS[half:])):
        (tmp_path / f"part{i}.jsonl").write_text(
            "".join(json.dumps({"body": d}) + "\n" for d in part)
        )
    ds = datasets.Dataset.from_dict({"body": DOCS})
    ds.to_parquet(str(tmp_path / "all.parquet"))
    ds.to_csv(str(tmp_path / "all.csv"), index=False)
    (tmp_path / "lines.txt").write_text("\n".join(DOCS) + "\n")
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    return {"dir": tmp_path}


@pytest.mark.parametrize("streaming", [True, False])
def test_builders_with_data_files(files, streaming: bool) -> None:
    d = files["dir"]
    got = list(iter_texts("json", text_field="body", data_files=[str(d / "part*.jsonl")],
                          streaming=streaming))  # fmt: skip
    assert got == DOCS  # both globbed files, in order
    assert list(iter_texts("parquet", text_field="body", data_files=[str(d / "all.parquet")],
                           streaming=streaming)) == DOCS  # fmt: skip
    assert list(iter_texts(str(d / "all.parquet"), text_field="body", streaming=streaming)) == DOCS
    assert list(iter_texts(str(d / "all.csv"), text_field="body", streaming=streaming)) == DOCS
    lines = list(iter_texts("text", data_files=[str(d / "lines.txt")], streaming=streaming))
    assert lines == DOCS  # the text builder: one row per line, field "text"


@pytest.mark.parametrize("streaming", [True, False])
def test_load_from_disk(files, streaming: bool) -> None:
    d = files["dir"]
    assert list(iter_texts(str(d / "saved"), text_field="body", streaming=streaming)) == DOCS
    test = list(iter_texts(str(d / "saved_dict"), split="test", text_field="body",
                           streaming=streaming))  # fmt: skip
    assert test == DOCS[:3]
    with pytest.raises(DataError, match="no split 'validation'"):
        list(iter_texts(str(d / "saved_dict"), split="validation", text_field="body"))


def test_clear_errors(files) -> None:
    d = files["dir"]
    with pytest.raises(DataError, match="no field 'text'.*fields: body"):
        list(iter_texts(str(d / "all.parquet")))
    with pytest.raises(DataError, match="needs files"):
        list(iter_texts("parquet"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(iter_texts("json", data_files=[str(d / "nope*.jsonl")]))


def test_hf_source_and_cli_train_on_parquet(files, tmp_path: Path) -> None:
    from saekit.cli import main
    from saekit.sources.hf import HFSource

    d = files["dir"]
    cfg = DataConfig(dataset="parquet", data_files=[str(d / "all.parquet")], text_field="body",
                     context_len=16, shuffle_buffer=0)  # fmt: skip
    src = HFSource(cfg)
    b = src.next_batch(64)
    assert b.acts["layers.3.resid_post"].shape == (64, 384)
    state = src.state_dict()
    again = HFSource(cfg)
    again.load_state_dict(state)  # exact resume re-reads the dataset
    assert again.next_batch(8).acts["layers.3.resid_post"].shape == (8, 384)
    rc = main(["train", "--dataset", "json", "--data-files", str(d / "part0.jsonl"),
               str(d / "part1.jsonl"), "--text-field", "body", "--total-tokens", "256",
               "--batch-size", "128", "--context-len", "16", "--shuffle-buffer", "0",
               "--out-dir", str(tmp_path / "run"), "--progress", "false"])  # fmt: skip
    assert rc == 0
    saved = json.loads((tmp_path / "run" / "cfg.json").read_text())["saekit"]["data"]
    assert saved["dataset"] == "json" and len(saved["data_files"]) == 2
