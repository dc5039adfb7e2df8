"""Calibration / evaluation text and token batches for compression.

Text comes from :func:`saekit.sources.text.iter_texts` (``dataset=""`` = the built-in pydoc
corpus cut into documents, every 10th held out: ``split="train"`` for calibration/training,
``"test"`` for perplexity), so compression shares saekit's train/held-out split. Fallback when
that module is unavailable: sorted pydoc topics, topic ``i`` held out when ``i % 8 == 7``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.errors import ConfigError, DataError

HELDOUT_EVERY = 8


def _fallback_builtin(split: str) -> list[str]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    out = []
    for i, k in enumerate(keys):
        held = i % HELDOUT_EVERY == HELDOUT_EVERY - 1
        if split == "all" or (split == "test") == held:
            out.append(topics[k])
    return out


def builtin_texts(split: str = "train") -> list[str]:
    """Built-in corpus documents, ``split`` in ``{"train", "test", "all"}`` (test = held out)."""
    if split not in ("train", "test", "all"):
        raise ConfigError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return load_texts("", split)


def load_texts(dataset: str = "", split: str = "train", text_field: str = "text") -> list[str]:
    """Texts for calibration (``split="train"``) or perplexity (``"test"``) via ``iter_texts``
    (a local .txt/.jsonl file, a dataset directory, or ``""`` for the built-in corpus)."""
    try:
        from saekit.sources.text import iter_texts
    except ImportError:  # pragma: no cover - only without saekit.sources.text
        if dataset:
            raise ConfigError(f"reading dataset {dataset!r} needs saekit.sources.text") from None
        return _fallback_builtin(split)
    return list(iter_texts(dataset, split=split, text_field=text_field))


def token_stream(tokenizer: object, texts: list[str]) -> Tensor:
    """All texts tokenised (no special tokens) and concatenated, separated by EOS if any."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


def chunk_batches(ids: Tensor, seq_len: int, batch_size: int, max_seqs: int = 0) -> list[Tensor]:
    """Cut a 1-D token stream into non-overlapping ``[batch, seq_len]`` batches (no padding;
    a trailing partial sequence is dropped). ``max_seqs > 0`` keeps only the first ones."""
    if seq_len < 2 or batch_size < 1:
        raise ConfigError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    n = ids.numel() // seq_len
    if max_seqs > 0:
        n = min(n, max_seqs)
    if n == 0:
        raise DataError(f"only {ids.numel()} tokens: not one sequence of length {seq_len}")
    seqs = ids[: n * seq_len].view(n, seq_len)
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
