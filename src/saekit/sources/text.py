"""Text corpora for activation sources.

:func:`iter_texts` yields documents from

- ``""``: the built-in corpus, Python's ``pydoc_data.topics.topics`` (about 465k characters).
  Topics are read in sorted-key order, cut into paragraphs at blank lines, and consecutive
  paragraphs are merged into documents of at most ``max_chars`` characters (a longer
  paragraph stays one document); repeated documents are dropped. No download is needed.
- a local ``.txt`` file (documents separated by blank lines) or ``.jsonl`` file (one JSON
  object per line, the text in ``text_field``);
- through the ``datasets`` package (``pip install 'saekit[datasets]'``): a builder with
  ``data_files`` (``json``, ``parquet``, ``text``, ``csv``, ``arrow``), a local
  ``.parquet`` / ``.csv`` / ``.json`` / ``.arrow`` file, a ``save_to_disk`` directory or a hub
  dataset id, streamed by default (:mod:`saekit.sources.hf_datasets`).

Held-out text: documents are assigned to a *part* deterministically by their index, every
``eval_every``-th document (index % eval_every == eval_every - 1) goes to ``"eval"``, the
rest to ``"train"``; ``"all"`` keeps everything. For the built-in corpus and local files the
part defaults from ``split`` (``train`` -> train part, ``eval``/``validation``/``test`` ->
eval part, ``all`` -> all), so training and evaluation never share a document. For HF
datasets ``split`` is the dataset's own split and the part defaults to ``"all"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from saekit.errors import ConfigError, DataError, FormatError, MissingFileError

PARTS = ("train", "eval", "all")
_EVAL_SPLITS = ("eval", "validation", "valid", "test")


def builtin_documents(max_chars: int = 2000) -> list[str]:
    """The built-in pydoc corpus as a deterministic list of distinct documents."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for key in sorted(topics):
        cur = ""
        for para in _paragraphs(topics[key]):
            if cur and len(cur) + 2 + len(para) > max_chars:
                docs.append(cur)
                cur = para
            else:
                cur = f"{cur}\n\n{para}" if cur else para
        if cur:
            docs.append(cur)
    seen: set[str] = set()
    unique = [d for d in docs if not (d in seen or seen.add(d))]  # some topics repeat text
    return unique


def _paragraphs(text: str) -> Iterator[str]:
    para: list[str] = []
    for line in text.splitlines():
        if line.strip():
            para.append(line.rstrip())
        elif para:
            yield "\n".join(para).strip()
            para = []
    if para:
        yield "\n".join(para).strip()


def _part_from_split(split: str) -> str:
    s = split.lower()
    if s == "train":
        return "train"
    if s == "all":
        return "all"
    if s in _EVAL_SPLITS:
        return "eval"
    raise ConfigError(
        f"unknown split {split!r} for a local/built-in corpus: use train, all or one of "
        f"{', '.join(_EVAL_SPLITS)} (held-out part)"
    )


def _keep(index: int, part: str, eval_every: int) -> bool:
    if part == "all":
        return True
    is_eval = index % eval_every == eval_every - 1
    return is_eval if part == "eval" else not is_eval


def _looks_like_path(dataset: str) -> bool:
    return (
        dataset.endswith((".txt", ".jsonl", ".json", ".parquet", ".csv", ".arrow"))
        or dataset.startswith((".", "/", "~"))
        or "\\" in dataset
    )


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text file; bytes that are not UTF-8 are a FormatError
    naming the file, line and column."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FormatError(
                    f"{path}:{lineno}: byte 0x{raw[e.start]:02x} at column {e.start + 1} is not"
                    " UTF-8; re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from e


def _iter_txt(path: Path) -> Iterator[str]:
    para: list[str] = []
    for _, line in utf8_lines(path):
        if line.strip():
            para.append(line.rstrip("\r\n"))
        elif para:
            yield "\n".join(para)
            para = []
    if para:
        yield "\n".join(para)


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped), each a dict with the ``required`` fields.

    A missing file, a line that is not JSON or a row without a required field is a clear
    error naming the file and line.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"JSONL file not found: {p}")
    for lineno, line in utf8_lines(p):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(f"{p}:{lineno} is not valid JSON: {e}") from e
        missing = [f for f in required if not isinstance(row, dict) or f not in row]
        if missing:
            raise FormatError(f"{p}:{lineno} has no field(s) {', '.join(map(repr, missing))}")
        yield row


def read_labelled(
    path: str | Path, text_field: str = "text", label_field: str = "label"
) -> tuple[list[str], list[str], list[Any]]:
    """``(texts, labels as strings, each row's "split" field or None)`` from a JSONL file."""
    texts, labels, splits = [], [], []
    for row in read_jsonl(path, (text_field, label_field)):
        texts.append(str(row[text_field]))
        labels.append(str(row[label_field]))
        splits.append(row.get("split"))
    if not texts:
        raise DataError(f"{path}: no labelled rows")
    return texts, labels, splits


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for row in read_jsonl(path, (text_field,)):
        text = row[text_field]
        if not isinstance(text, str):
            raise FormatError(f"{path}: field {text_field!r} is not a string: {text!r:.60}")
        yield text


def _iter_hf(
    dataset: str, split: str, text_field: str, data_files: tuple[str, ...], streaming: bool
) -> Iterator[str]:
    from saekit.sources.hf_datasets import iter_dataset_texts

    return iter_dataset_texts(dataset, split, text_field, data_files, streaming)


def check_dataset(dataset: str) -> None:
    """Raise FileNotFoundError now for a ``dataset`` that names a missing local file."""
    if dataset and not Path(dataset).expanduser().exists() and _looks_like_path(dataset):
        raise MissingFileError(f"text file not found: {Path(dataset).expanduser()}")


def config_texts(cfg: Any, split: str | None = None, part: str | None = None) -> Iterator[str]:
    """:func:`iter_texts` of what a :class:`~saekit.config.DataConfig` names (its dataset,
    split, text field, data files and streaming), with ``split`` / ``part`` overrides."""
    return iter_texts(
        cfg.dataset,
        cfg.dataset_split if split is None else split,
        cfg.text_field,
        part=part,
        data_files=tuple(cfg.data_files),
        streaming=cfg.streaming,
    )


def iter_texts(
    dataset: str = "",
    split: str = "train",
    text_field: str = "text",
    part: str | None = None,
    eval_every: int = 10,
    max_chars: int = 2000,
    data_files: tuple[str, ...] | list[str] = (),
    streaming: bool = True,
) -> Iterator[str]:
    """Documents of ``dataset`` (see the module doc); empty documents are skipped.

    ``data_files`` / ``streaming``: for HF datasets (:mod:`saekit.sources.hf_datasets`).

    ``part`` is ``"train"``, ``"eval"`` or ``"all"`` (None: from ``split`` for local and
    built-in corpora, ``"all"`` for HF datasets). Raises FileNotFoundError for a missing
    local file and ValueError for a bad split/part.
    """
    if part is not None and part not in PARTS:
        raise ConfigError(f"unknown part {part!r}: choose from {', '.join(PARTS)}")
    if eval_every < 2:
        raise ConfigError(f"eval_every must be >= 2, got {eval_every}")
    files = tuple(data_files)
    path = Path(dataset).expanduser()
    if dataset == "":
        docs: Iterator[str] = iter(builtin_documents(max_chars))
        part = part or _part_from_split(split)
    elif files or (path.is_file() and path.suffix in (".parquet", ".csv", ".json", ".arrow")):
        docs = _iter_hf(dataset, split, text_field, files, streaming)
        part = part or "all"
    else:
        if path.is_file():
            part = part or _part_from_split(split)
            if path.suffix == ".jsonl":
                docs = _iter_jsonl(path, text_field)
            elif path.suffix == ".txt":
                docs = _iter_txt(path)
            else:
                raise FormatError(
                    f"unsupported text file {path}: expected .txt, .jsonl, or (through the"
                    " datasets package) .parquet, .csv, .json, .arrow"
                )
        elif path.is_dir():
            docs = _iter_hf(str(path), split, text_field, files, streaming)
            part = part or "all"
        elif _looks_like_path(dataset):
            raise MissingFileError(f"text file not found: {path}")
        else:
            docs = _iter_hf(dataset, split, text_field, files, streaming)
            part = part or "all"
    index = 0
    for doc in docs:
        if not doc or not doc.strip():
            continue
        if _keep(index, part, eval_every):
            yield doc
        index += 1
