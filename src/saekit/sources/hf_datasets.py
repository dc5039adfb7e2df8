"""Text from Hugging Face ``datasets``: hub ids, local builders, saved datasets.

``dataset`` (``DataConfig.dataset``) may be

- a builder name with files: ``json`` / ``parquet`` / ``text`` / ``csv`` / ``arrow`` and
  ``data_files`` (paths or globs; ``--data-files``), e.g.
  ``--dataset parquet --data-files data/*.parquet``;
- a local ``.parquet`` / ``.csv`` / ``.json`` / ``.arrow`` file (its builder is implied);
- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
  ``datasets.load_from_disk``; a DatasetDict is indexed by ``split``);
- any other directory or a hub dataset id (``datasets.load_dataset``, from the cache when
  ``HF_DATASETS_OFFLINE=1``).

``streaming`` (default true) reads rows lazily (``load_dataset(..., streaming=True)``;
``to_iterable_dataset()`` for saved datasets); false prepares the split first. Rows come in
the dataset's order. The ``text`` builder yields one row per line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from saekit.errors import DataError, EnvironmentProblem, MissingFileError

BUILDERS = ("json", "parquet", "text", "csv", "arrow")
#: local file suffixes read through a datasets builder
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".arrow": "arrow"}


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise EnvironmentProblem(
            "this dataset needs the `datasets` package: pip install 'saekit[datasets]'"
            " (local .txt / .jsonl files and the built-in corpus need nothing)"
        ) from e
    return datasets


def is_saved_dataset(path: Path) -> bool:
    """True for a ``save_to_disk`` directory (a Dataset or a DatasetDict)."""
    return (
        (path / "dataset_info.json").is_file()
        and (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    )


def _expand(data_files: Sequence[str]) -> list[str]:
    out: list[str] = []
    for pattern in data_files:
        p = Path(pattern).expanduser()
        matches = sorted(p.parent.glob(p.name)) if any(c in p.name for c in "*?[") else [p]
        found = [str(m) for m in matches if m.exists()]
        if not found:
            raise MissingFileError(f"--data-files {pattern!r}: no such file")
        out += found
    return out


def load(dataset: str, split: str, data_files: Sequence[str] = (), streaming: bool = True) -> Any:
    """The ``datasets`` object to iterate for ``dataset`` (see the module doc)."""
    ds = _datasets()
    path = Path(dataset).expanduser()
    if path.is_file() and path.suffix in FILE_BUILDERS:
        dataset, data_files = FILE_BUILDERS[path.suffix], [str(path)]
    if path.is_dir() and is_saved_dataset(path):
        obj = ds.load_from_disk(str(path))
        if isinstance(obj, ds.DatasetDict):
            if split not in obj:
                raise DataError(
                    f"{path}: no split {split!r} in the saved DatasetDict (has {', '.join(obj)})"
                )
            obj = obj[split]
        return obj.to_iterable_dataset() if streaming else obj
    files = _expand(data_files) if data_files else None
    if dataset in BUILDERS and not files:
        raise DataError(f"the {dataset!r} builder needs files: pass --data-files PATH [PATH ...]")
    try:
        return ds.load_dataset(dataset, data_files=files, split=split, streaming=streaming)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        raise DataError(f"cannot load HF dataset {dataset!r} (split {split!r}): {e}") from e


def iter_dataset_texts(
    dataset: str,
    split: str,
    text_field: str,
    data_files: Sequence[str] = (),
    streaming: bool = True,
) -> Iterator[str]:
    """The ``text_field`` of each row of the dataset."""
    for row in load(dataset, split, data_files, streaming):
        if text_field not in row:
            raise DataError(
                f"dataset {dataset!r} rows have no field {text_field!r} "
                f"(fields: {', '.join(sorted(row))}); set --text-field"
            )
        text = row[text_field]
        if not isinstance(text, str):
            raise DataError(f"dataset {dataset!r}: field {text_field!r} is not text: {text!r:.60}")
        yield text


__all__ = ["BUILDERS", "FILE_BUILDERS", "is_saved_dataset", "iter_dataset_texts", "load"]
