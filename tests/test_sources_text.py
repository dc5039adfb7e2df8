"""Text corpora: built-in pydoc corpus, local files, held-out split, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saekit.sources.text import builtin_documents, iter_texts


def test_builtin_corpus_is_deterministic_and_sized() -> None:
    docs = builtin_documents()
    assert docs == builtin_documents()
    assert len(docs) > 200
    assert max(len(d) for d in docs) < 40_000
    assert all(d.strip() for d in docs)
    assert list(iter_texts("", split="all")) == docs


def test_train_and_eval_parts_are_disjoint_and_cover_everything() -> None:
    train = list(iter_texts(""))  # split="train" -> train part
    ev = list(iter_texts("", split="test"))
    assert len(ev) == len(builtin_documents()) // 10
    assert set(train).isdisjoint(ev)
    assert sorted(train + ev) == sorted(builtin_documents())
    assert list(iter_texts("", part="eval")) == ev


def test_txt_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n\nthird\n")
    assert list(iter_texts(str(txt), part="all")) == ["first doc\nline two", "second doc", "third"]
    js = tmp_path / "b.jsonl"
    js.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(12)) + "\n")
    got = list(iter_texts(str(js), text_field="body"))
    assert got == [f"doc {i}" for i in range(12) if i != 9]
    assert list(iter_texts(str(js), split="validation", text_field="body")) == ["doc 9"]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        list(iter_texts(str(tmp_path / "nope.txt")))
    js = tmp_path / "b.jsonl"
    js.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl:1 has no field\(s\) 'body'"):
        list(iter_texts(str(js), text_field="body"))
    with pytest.raises(ValueError, match="unknown split"):
        list(iter_texts("", split="dev2"))
    with pytest.raises(ValueError, match="unknown part"):
        list(iter_texts("", part="middle"))


def test_hf_id_without_datasets_is_a_clear_error(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    from saekit.errors import EnvironmentProblem

    with pytest.raises(EnvironmentProblem, match=r"pip install 'saekit\[datasets\]'"):
        list(iter_texts("someone/some-corpus"))
