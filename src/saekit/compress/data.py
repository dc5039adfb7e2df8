"""Calibration / evaluation text and token batches for compression.

Text comes from :func:`saekit.sources.text.iter_texts`, so compression uses saekit's one
train/held-out split (``dataset=""`` = the built-in pydoc corpus; for it and for local
files every 10th document is held out): ``split="train"`` for calibration, ``"test"`` for
perplexity. :func:`read_text_file` reads a whole local file for perplexity at full context.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from saekit.errors import ConfigError, DataError, MissingFileError
from saekit.sources.text import iter_texts


def builtin_texts(split: str = "train") -> list[str]:
    """Built-in corpus documents, ``split`` in ``{"train", "test", "all"}`` (test = held out)."""
    if split not in ("train", "test", "all"):
        raise ConfigError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return load_texts("", split)


def load_texts(dataset: str = "", split: str = "train", text_field: str = "text") -> list[str]:
    """Texts for calibration (``split="train"``) or perplexity (``"test"``) via ``iter_texts``
    (a local .txt/.jsonl file, a dataset directory, or ``""`` for the built-in corpus)."""
    part = "all" if split == "all" else None
    return list(iter_texts(dataset, split=split, text_field=text_field, part=part))


def read_text_file(path: str | Path) -> str:
    """The whole UTF-8 text of a local file (for perplexity over a held-out document)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"--eval-file {str(p)!r} is not a file")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"--eval-file {p} is empty")
    return text


def token_stream(tokenizer: object, texts: list[str]) -> Tensor:
    """All texts tokenised (no special tokens) and concatenated, separated by EOS if any."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


def text_tokens(tokenizer: object, text: str, piece_chars: int = 1 << 16) -> Tensor:
    """One text tokenised as a whole (no special tokens), in pieces cut at line breaks so
    that no single tokenizer call sees more than about ``piece_chars`` characters."""
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = (
            len(text)
            if len(text) - start <= piece_chars
            else text.rfind("\n", start, start + piece_chars) + 1
        )
        if end <= start:
            end = start + piece_chars
        ids += tokenizer(text[start:end], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        start = end
    return torch.tensor(ids, dtype=torch.long)


def chunk_batches(ids: Tensor, seq_len: int, batch_size: int, max_seqs: int = 0) -> list[Tensor]:
    """Cut a 1-D token stream into non-overlapping ``[batch, seq_len]`` batches (no padding;
    a trailing partial sequence is dropped). ``max_seqs > 0`` keeps only the first ones."""
    return batches_of(windows(ids, seq_len, max_seqs), batch_size)


def windows(ids: Tensor, seq_len: int, max_seqs: int = 0, seed: int | None = None) -> Tensor:
    """Non-overlapping ``[n, seq_len]`` windows of a token stream; ``seed`` draws ``max_seqs``
    of them at random (without replacement, kept in stream order), else the first ones."""
    if seq_len < 2:
        raise ConfigError(f"need seq_len >= 2, got {seq_len}")
    n = ids.numel() // seq_len
    if n == 0:
        raise DataError(f"only {ids.numel()} tokens: not one sequence of length {seq_len}")
    seqs = ids[: n * seq_len].view(n, seq_len)
    if max_seqs <= 0 or max_seqs >= n:
        return seqs
    if seed is None:
        return seqs[:max_seqs]
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_seqs]
    return seqs[pick.sort().values]


def batches_of(seqs: Tensor, batch_size: int) -> list[Tensor]:
    if batch_size < 1:
        raise ConfigError(f"need batch_size >= 1, got {batch_size}")
    return list(seqs.split(batch_size))


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 1024) -> object:
    """A small byte-level BPE tokenizer trained on ``texts`` (a ``PreTrainedTokenizerFast``
    with ``<eos>`` as EOS/pad), for tiny demo LMs; deterministic for the same input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
