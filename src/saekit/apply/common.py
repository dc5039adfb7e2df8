"""Shared plumbing for the applications: runs, texts, models, site activations and codes.

Every application works on *records*: one :class:`TextActs` per text, holding its token ids,
token strings and the activations at one hook site. Codes are computed from those with the
SAE's own ``encode`` (so the selection rule, ``normalize_input`` and signed codes are all
respected). Special tokens are kept in the records but flagged in ``keep`` so that
statistics can skip them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from saekit.errors import ConfigError, DataError
from saekit.io.native import RunInfo, read_run_info
from saekit.sae import SAE
from saekit.sources import text as text_source
from saekit.sources.sites import StopForward, hook_site, resolve_site

if TYPE_CHECKING:
    from saekit.apply.options import RunOptions


def load_run(run_dir: str | Path) -> tuple[SAE, RunInfo]:
    """The SAE of a run (via :func:`saekit.io.native.open_sae`) and its :class:`RunInfo`.

    ``run_dir`` may also be any SAE ``load_sae`` reads (a peer format, ``hf://``,
    ``saelens:``); then the model and site come from the SAE's metadata."""
    from saekit.io.native import info_from_meta, open_sae

    sae, meta = open_sae(run_dir)
    sae.eval()
    if meta.get("format") in ("saekit", "saelens"):
        info = read_run_info(meta["path"])
        info.run_dir = str(run_dir)
        return sae, info
    return sae, info_from_meta(run_dir, meta)


@dataclass
class AppRun:
    """Everything an application needs from a run: its SAE, the model, site and text length."""

    sae: SAE
    info: RunInfo
    model: nn.Module
    tokenizer: Any
    site: str
    max_len: int
    model_name: str


def open_run(opts: RunOptions, causal: bool | None = None) -> AppRun:
    """Load the run of ``opts`` with its model (``opts.model`` / ``site`` / ``max_len``
    override what the run records). ``causal=True`` requires an LM with its head."""
    sae, info = load_run(opts.run_dir)
    sae = sae.to(opts.device)
    model_name = info.model if opts.model is None else opts.model
    site = opts.site or info.site
    if not site:
        raise ConfigError(f"{opts.run_dir} does not record a single hook site: pass --site")
    from saekit.sources.hf import load_model

    model, tok = load_model(model_name, device=opts.device, dtype=opts.dtype, causal=causal)
    return AppRun(sae, info, model, tok, site, opts.max_len or info.context_len, model_name)


def read_texts(
    dataset: str = "", text_field: str = "text", limit: int = 0, part: str = "all"
) -> list[str]:
    """Documents of ``dataset`` via :func:`saekit.sources.text.iter_texts` (at most ``limit``).

    ``""`` is the built-in pydoc corpus; ``.txt`` files hold documents separated by blank
    lines; ``.jsonl`` files one object per line with the text in ``text_field``.
    """
    from saekit.sources.text import iter_texts

    out: list[str] = []
    for t in iter_texts(dataset, text_field=text_field, part=part):
        out.append(t)
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"no texts found in {dataset or 'the built-in corpus'!r}")
    return out


def read_labelled(
    path: str, text_field: str = "text", label_field: str = "label"
) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` from a JSONL file; labels are returned as strings."""
    texts, labels, _ = text_source.read_labelled(path, text_field, label_field)
    return texts, labels


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def encode_texts(tok: Any, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of each text (with the tokenizer's special tokens), truncated to ``max_len``."""
    if max_len <= 0:
        raise ConfigError(f"max_len must be positive, got {max_len}")
    out = []
    for t in texts:
        ids = tok(t, truncation=True, max_length=max_len)["input_ids"]
        if len(ids) == 0:
            ids = [_fallback_id(tok)]
        out.append(list(ids))
    return out


def _fallback_id(tok: Any) -> int:
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        v = getattr(tok, name, None)
        if v is not None:
            return int(v)
    return 0


def pad_batch(ids: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded ``input_ids`` (pad id 0) and ``attention_mask``."""
    n = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), n, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids.to(device), mask.to(device)


def token_strings(tok: Any, ids: list[int]) -> list[str]:
    """The text each token contributes, spaces included (from incremental decoding).

    Token i's string is ``decode(ids[:i+1])`` minus ``decode(ids[:i])`` when that is a
    prefix (true for BPE / WordPiece / word-level tokenizers); otherwise (e.g. a partial
    UTF-8 byte sequence) the token decoded on its own.
    """
    out: list[str] = []
    prev = ""
    for i in range(len(ids)):
        cur = tok.decode(ids[: i + 1])
        if cur.startswith(prev) and len(cur) > len(prev):
            out.append(cur[len(prev) :])
        else:
            out.append(tok.decode([ids[i]]))
        prev = cur
    return out


@dataclass
class TextActs:
    """One text's token ids, token strings, ``keep`` mask and site activations ``[T, d]``."""

    ids: list[int]
    tokens: list[str]
    keep: Tensor
    acts: Tensor


@torch.no_grad()
def site_activations(
    model: nn.Module,
    tok: Any,
    site: str,
    texts: list[str],
    max_len: int = 128,
    batch_size: int = 8,
    exclude_special: bool = True,
) -> list[TextActs]:
    """Run ``model`` over ``texts`` and return each text's activations at ``site``.

    The forward stops at the site (``StopForward``), so later layers are not computed.
    """
    if not texts:
        raise DataError("no texts given")
    s = resolve_site(model, site)
    dev = model_device(model)
    special = set(getattr(tok, "all_special_ids", []) or [])
    all_ids = encode_texts(tok, texts, max_len)
    out: list[TextActs] = []
    captured: list[Tensor] = []

    def grab(h: Tensor) -> None:
        captured.append(h.detach())
        raise StopForward

    model.eval()
    for b in range(0, len(all_ids), batch_size):
        chunk = all_ids[b : b + batch_size]
        input_ids, mask = pad_batch(chunk, dev)
        captured.clear()
        with hook_site(s, grab), suppress(StopForward):
            model(input_ids=input_ids, attention_mask=mask)
        if not captured:
            raise RuntimeError(f"site {site!r} did not run during the forward")
        h = captured[0].float().cpu()
        for i, ids in enumerate(chunk):
            keep = torch.tensor(
                [not (exclude_special and t in special) for t in ids], dtype=torch.bool
            )
            out.append(TextActs(ids, token_strings(tok, ids), keep, h[i, : len(ids)].clone()))
    return out


@torch.no_grad()
def dense_codes(sae: SAE, acts: Tensor, chunk: int = 4096) -> Tensor:
    """Dense codes ``[N, d_sae]`` of ``acts [N, d_in]`` (signed for signed rules)."""
    was = sae.training
    sae.eval()
    p = next(sae.parameters())
    parts = [
        sae.encode(acts[i : i + chunk].to(p.device, p.dtype)).to_dense().float().cpu()
        for i in range(0, acts.shape[0], chunk)
    ]
    sae.train(was)
    if not parts:
        return torch.zeros(0, sae.d_sae)
    return torch.cat(parts)


def decoder_directions(sae: SAE, features: Iterable[int] | None = None) -> Tensor:
    """Decoder rows in raw units of what the SAE reconstructs (``normalize_input`` folded
    in: the target's scale for a transcoder), ``[n, d_out]``."""
    W = sae.W_dec.detach()
    if sae.cfg.normalize_input:
        W = W / sae.output_scale
    if features is None:
        return W
    idx = check_features(sae, features)
    return W[idx]


def check_features(sae: SAE, features: Iterable[int]) -> list[int]:
    """Validate feature indices against ``sae.d_sae``."""
    idx = [int(f) for f in features]
    bad = [f for f in idx if not 0 <= f < sae.d_sae]
    if bad:
        raise ConfigError(f"feature index out of range 0..{sae.d_sae - 1}: {bad}")
    return idx


def unembedding(model: nn.Module) -> Tensor | None:
    """The LM head weight ``[vocab, d]`` when the model has one, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    w = getattr(head, "weight", None)
    return w.detach() if isinstance(w, Tensor) else None


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter of ``module``."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def next_token_loss(model: nn.Module, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence mean next-token cross-entropy over non-padding positions, ``[B]``."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1)
    tgt = input_ids[:, 1:]
    nll = -lp.gather(-1, tgt[..., None])[..., 0]
    m = (mask[:, 1:] * mask[:, :-1]).float()
    return (nll * m).sum(1) / m.sum(1).clamp_min(1)
