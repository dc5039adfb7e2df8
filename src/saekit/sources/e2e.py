"""End-to-end objectives of a Hugging Face causal LM: the loss of the frozen model's forward
with replacement functions spliced in at its sites (Braun et al. 2024; sparsify's
``--loss_fn kl|ce``). It knows nothing of SAEs: a replacement is any function of the
activations it reads.

:meth:`saekit.sources.hf.HFSource.objective` switches the source to *sequence batches*
(no shuffle buffer: a downstream loss needs whole sequences) and returns a
:class:`SplicedLM`. Each batch is ``max(1, round(batch_size / context_len))`` sequences in
text order [our choice: about ``batch_size`` tokens a step]; its ``acts`` are the clean
activations of the kept tokens (padding, and special tokens with ``exclude_special``,
dropped), as for token batches, and its ``meta`` holds ``input_ids``, ``attention_mask`` and
``keep [S, T]``.

``SplicedLM(batch, reads, writes, fn)`` runs the model on the batch's sequences with
gradients; at the first of the ``writes`` sites it calls ``fn`` on the live activations of
the ``reads`` at the kept positions (concatenated, ``[N, Σ d]``, rows in the order of
``batch.acts``) and puts its output (split over the ``writes``) in their place at those
positions; elsewhere the activations stay clean. The loss:

* ``kl``: ``KL(p_clean ‖ p_spliced) = Σ_v p_clean (log p_clean − log p_spliced)``, averaged
  over the kept positions (the clean forward is run once per batch, without gradients);
* ``ce``: the next-token cross-entropy of the spliced model, averaged over positions whose
  token is kept and whose next token is real.

These are :mod:`saekit.evaluate.splice`'s ``kl_sae`` and ``ce_sae`` on the same tokens.
Resume: the state is the number of sequences handed out; a resumed stream re-tokenises (no
model forward) up to there, so it continues with the same sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from saekit.errors import ConfigError
from saekit.sources.base import Batch
from saekit.sources.sites import hook_site

if TYPE_CHECKING:
    from saekit.sources.hf import HFSource

KINDS = ("kl", "ce")


class SplicedLM:
    """The downstream loss of ``source``'s model with functions spliced in (module doc)."""

    def __init__(self, source: HFSource, kind: str) -> None:
        if kind not in KINDS:
            raise ConfigError(f"unknown end-to-end objective {kind!r}; use one of {KINDS}")
        if not source.causal:
            raise ConfigError(
                f"objective {kind!r} needs a decoder LM with its LM head (AutoModelForCausalLM);"
                f" the model {source.cfg.model or 'MiniLM'!r} has none"
            )
        self.source, self.name = source, kind
        self.sequences = 0  # sequences handed out (the resume state)

    # ---------------------------------------------------------------- batches
    def next_batch(self, batch_size: int) -> Batch:
        src = self.source
        n = max(1, round(batch_size / src.cfg.context_len))
        ids, mask = src.next_sequences(n)
        self.sequences += n
        keep = src._keep(ids, mask)
        acts, grads = src._forward(ids, mask, with_grad=src.with_grad)
        return Batch(
            acts={s: a[keep] for s, a in acts.items()},
            inputs={"grad": {s: g[keep] for s, g in grads.items()}} if grads else {},
            meta={"input_ids": ids, "attention_mask": mask, "keep": keep, "token_ids": ids[keep]},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"sequences": self.sequences}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["sequences"])
        if n:
            self.source.next_sequences(n)  # tokenisation only
        self.sequences = n

    # ---------------------------------------------------------------- the loss
    def __call__(
        self, batch: Batch, reads: list[str], writes: list[str], fn: Callable[[Tensor], Tensor]
    ) -> Tensor:
        src = self.source
        dev = src.device
        ids = batch.meta["input_ids"].to(dev)
        mask = batch.meta["attention_mask"].to(dev)
        keep = batch.meta["keep"].to(dev)
        unknown = [s for s in (*reads, *writes) if s not in src.sites]
        if unknown:
            raise ConfigError(f"sites {unknown} are not among the source's {src.sites}")
        live: dict[str, Tensor] = {}
        new: dict[str, Tensor] = {}

        def splice(name: str) -> Callable[[Tensor], Tensor | None]:
            def hook(h: Tensor) -> Tensor | None:
                if name in reads:
                    live[name] = h
                if name not in writes:
                    return None
                if not new:
                    missing = [r for r in reads if r not in live]
                    if missing:
                        raise ConfigError(
                            f"cannot splice: {name!r} is written before {missing} are read in"
                            " the forward (an acausal replacement cannot be trained end to end)"
                        )
                    y = fn(torch.cat([live[r][keep] for r in reads], dim=-1))
                    for w, part in zip(writes, y.split([src.d_in(w) for w in writes], -1)):
                        new[w] = part
                out = h.clone()
                out[keep] = new[name].to(h.dtype)
                return out

            return hook

        with ExitStack() as stack:
            for s in dict.fromkeys((*reads, *writes)):
                stack.enter_context(hook_site(src._site_objs[s], splice(s)))
            logits = src.model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        if self.name == "ce":
            ce_mask = keep[:, :-1] & mask[:, 1:].bool()
            nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            return nll[ce_mask].mean()
        clean = batch.meta.get("clean_logp")
        if clean is None:  # once per batch, shared by every SAE trained on it
            with torch.no_grad():
                clean = src.model(input_ids=ids, attention_mask=mask).logits.float()
                clean = batch.meta["clean_logp"] = torch.log_softmax(clean, dim=-1)
        kl = (clean.exp() * (clean - logp)).sum(-1)
        return kl[keep].mean()
