"""Downstream (spliced) metrics for decoder LMs: CE loss and KL with the SAE in the loop.

For each batch of token sequences we run the model four times at the SAE's hook site:

* clean (nothing replaced),
* ``sae``: the activation replaced by the SAE reconstruction x̂,
* ``zero``: the activation replaced by zeros (SAEBench's zero ablation),
* ``sae_err``: x̂ + (x − x̂) (error term kept: numerically the clean run; a sanity check).

CE is the next-token cross-entropy averaged over positions t whose token and next token are
both real (attention mask 1): ``n_tokens_ce`` of them. KL(p_clean ‖ p_patched) =
Σ_v p_clean(log p_clean − log p_patched) is averaged over every real position
(``n_tokens_kl``). Replacement happens at every position (padding included; padded
positions are masked out of all metrics and, with the attention mask, never reach real
ones). Then

* ``ce_recovered`` = (CE_zero − CE_sae) / (CE_zero − CE_clean),
* ``kl_score`` = (KL_zero − KL_sae) / KL_zero,
* ``delta_ce`` = CE_sae − CE_clean.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from saekit.sources.sites import resolve_site

MODES = ("clean", "sae", "zero", "sae_err")


def _logits(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    out = model(input_ids=ids, attention_mask=mask)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError(
            f"{type(model).__name__} returns no logits: spliced CE/KL needs a causal LM"
        )
    return logits.float()


class SpliceAccumulator:
    """Sums of CE (per mode) and KL (per patched mode) over real tokens."""

    def __init__(self) -> None:
        self.ce = {m: 0.0 for m in MODES}
        self.kl = {m: 0.0 for m in MODES if m != "clean"}
        self.n_ce = 0
        self.n_kl = 0

    def update(self, logits: dict[str, Tensor], ids: Tensor, mask: Tensor) -> None:
        """Add one batch: ``logits[mode] [B, T, V]``, ``ids``/``mask [B, T]``."""
        mask = mask.bool()
        ce_mask = mask[:, :-1] & mask[:, 1:]
        target = ids[:, 1:]
        logp_clean = torch.log_softmax(logits["clean"].double(), -1)
        p_clean = logp_clean.exp()
        for m, lg in logits.items():
            logp = torch.log_softmax(lg.double(), -1)
            nll = -logp[:, :-1].gather(-1, target.unsqueeze(-1)).squeeze(-1)
            self.ce[m] += float(nll[ce_mask].sum())
            if m != "clean":
                kl = (p_clean * (logp_clean - logp)).sum(-1)
                self.kl[m] += float(kl[mask].sum())
        self.n_ce += int(ce_mask.sum())
        self.n_kl += int(mask.sum())

    def result(self) -> dict[str, Any]:
        nan = float("nan")
        ce = {m: v / self.n_ce if self.n_ce else nan for m, v in self.ce.items()}
        kl = {m: v / self.n_kl if self.n_kl else nan for m, v in self.kl.items()}
        den = ce["zero"] - ce["clean"]
        out: dict[str, Any] = {
            "n_tokens_ce": self.n_ce,
            "n_tokens_kl": self.n_kl,
            "n_tokens": self.n_ce,
            "ce_clean": ce["clean"],
            "ce_sae": ce["sae"],
            "ce_zero": ce["zero"],
            "ce_sae_err": ce["sae_err"],
            "delta_ce": ce["sae"] - ce["clean"],
            "ce_recovered": (ce["zero"] - ce["sae"]) / den if den != 0 else nan,
            "ce_recovered_err": (ce["zero"] - ce["sae_err"]) / den if den != 0 else nan,
            "ce_recovered_zero": 0.0 if den != 0 else nan,
            "kl_sae": kl["sae"],
            "kl_zero": kl["zero"],
            "kl_sae_err": kl["sae_err"],
            "kl_score": (kl["zero"] - kl["sae"]) / kl["zero"] if kl["zero"] else nan,
        }
        return out


@torch.no_grad()
def splice_batch(
    model: nn.Module, sae: Any, site_name: str, ids: Tensor, mask: Tensor
) -> dict[str, Tensor]:
    """Logits of the four runs (``MODES``) on one batch."""
    from saekit.sources.sites import hook_site

    site = resolve_site(model, site_name)
    logits: dict[str, Tensor] = {"clean": _logits(model, ids, mask)}

    def replace(mode: str):
        def fn(h: Tensor) -> Tensor:
            if mode == "zero":
                return torch.zeros_like(h)
            x_hat = sae(h.reshape(-1, h.shape[-1])).x_hat.reshape(h.shape).to(h.dtype)
            if mode == "sae_err":
                return x_hat + (h - x_hat)
            return x_hat

        return fn

    for mode in MODES[1:]:
        with hook_site(site, replace(mode)):
            logits[mode] = _logits(model, ids, mask)
    return logits


@torch.no_grad()
def splice_metrics(
    model: nn.Module,
    sae: Any,
    site_name: str,
    batches: Iterable[tuple[Tensor, Tensor]],
) -> dict[str, Any]:
    """CE / KL metrics over ``batches`` of ``(input_ids, attention_mask)``."""
    was = sae.training
    sae.train(False)
    acc = SpliceAccumulator()
    dev = next(model.parameters()).device
    try:
        for ids, mask in batches:
            ids, mask = ids.to(dev), mask.to(dev)
            acc.update(splice_batch(model, sae, site_name, ids, mask), ids, mask)
    finally:
        sae.train(was)
    return acc.result()


def token_batches(
    tokenizer: Any, texts: Iterable[str], context_len: int, batch_size: int, max_tokens: int
) -> Iterable[tuple[Tensor, Tensor]]:
    """Tokenise texts (truncated to ``context_len``, padded) into batches until at least
    ``max_tokens`` real tokens have been yielded."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    buf: list[str] = []
    seen = 0
    for t in texts:
        if not t.strip():
            continue
        buf.append(t)
        if len(buf) == batch_size:
            enc = tokenizer(
                buf, truncation=True, max_length=context_len, padding=True, return_tensors="pt"
            )
            yield enc["input_ids"], enc["attention_mask"]
            seen += int(enc["attention_mask"].sum())
            buf = []
            if seen >= max_tokens:
                return
    if buf:
        enc = tokenizer(
            buf, truncation=True, max_length=context_len, padding=True, return_tensors="pt"
        )
        yield enc["input_ids"], enc["attention_mask"]
