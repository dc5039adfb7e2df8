"""Tiny offline causal LMs for examples, demos and tests (no downloads).

:func:`word_tokenizer` builds a word-level tokenizer from texts (``extra_tokens`` become
single atomic tokens, which tests use to inject hostile token strings); :func:`tiny_gpt2`
builds a GPT-2 from a config; :func:`train_tiny_lm` gives it a few steps of next-token
training so that generations are not pure noise.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saekit.apply.common import encode_texts, pad_batch
from saekit.errors import DataError

_WORD = re.compile(r"\w+|[^\w\s]+")


def word_tokenizer(
    texts: list[str], vocab_size: int = 512, extra_tokens: tuple[str, ...] = ()
) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over the most frequent words of ``texts``.

    Token 0 is ``<pad>``, 1 ``<unk>``, 2 ``<eos>`` (also BOS); words are split on
    ``\\w+|[^\\w\\s]+`` and joined back with spaces when decoding.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<eos>"]
    counts = Counter(w for t in texts for w in _WORD.findall(t))
    words = [w for w, _ in counts.most_common(max(vocab_size - len(special), 0))]
    vocab = {w: i for i, w in enumerate(special + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        bos_token="<eos>",
    )
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
    return tok


def tiny_gpt2(
    vocab_size: int,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    n_positions: int = 128,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` built from a config, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def train_tiny_lm(
    model: nn.Module,
    tok: Any,
    texts: list[str],
    steps: int = 100,
    lr: float = 3e-3,
    context_len: int = 64,
    batch_size: int = 16,
    seed: int = 0,
) -> list[float]:
    """A few Adam steps of next-token training on ``texts``; returns the loss per step."""
    ids = [x for x in encode_texts(tok, texts, 10**9) if len(x) > 1]
    flat = [t for x in ids for t in x + [tok.eos_token_id]]
    chunks = [flat[i : i + context_len] for i in range(0, len(flat) - context_len, context_len)]
    if not chunks:
        raise DataError("not enough text to train on")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(len(chunks), (batch_size,), generator=g).tolist()
        input_ids, mask = pad_batch([chunks[i] for i in pick], torch.device("cpu"))
        loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def save_lm(model: nn.Module, tok: Any, path: str | Path) -> str:
    """Save model and tokenizer so that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load them."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(p)  # type: ignore[operator]
    tok.save_pretrained(p)
    return str(p)


def make_demo_lm(
    path: str | Path, steps: int = 300, vocab_size: int = 8000, n_embd: int = 64, seed: int = 0
) -> str:
    """Build, briefly train on the built-in corpus, and save a word-level GPT-2 at ``path``.

    Offline stand-in for a causal LM in examples (steering, ablation, compression).
    """
    from saekit.sources.text import iter_texts

    texts = list(iter_texts("", split="train"))
    tok = word_tokenizer(texts, vocab_size=vocab_size)
    model = tiny_gpt2(len(tok), n_embd=n_embd, n_head=4, seed=seed)
    train_tiny_lm(model, tok, texts, steps=steps, seed=seed)
    return save_lm(model, tok, path)
