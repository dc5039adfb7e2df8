"""Downstream (spliced) metrics for decoder LMs: CE loss and KL with the SAE in the loop.

For each batch of token sequences we run the model four times at the SAE's hook site:

* clean (nothing replaced),
* ``sae``: the activation replaced by the SAE reconstruction x̂,
* ``zero``: the activation replaced by zeros (SAEBench's zero ablation),
* ``sae_err``: x̂ + (x − x̂) (error term kept: numerically the clean run; a sanity check).

Special tokens (BOS, EOS, ... : the tokenizer's ``all_special_ids``), which training drops
(``DataConfig.exclude_special``), keep their clean activation in the ``sae``, ``sae_err``
and baseline runs and leave every average, as SAEBench's
``exclude_special_tokens_from_reconstruction`` does (an SAE never trained on BOS would
otherwise be charged for it); ``include_special=True`` replaces them too and counts them.
The zero ablation zeroes every position.

A transcoder (:mod:`saekit.arch.transcoder`) is spliced in place of its target: the runs
replace ``layers.i.mlp_out`` by the transcoder's prediction from the live
``layers.i.mlp_in`` (``reads``), so ``ce_recovered`` is the CE recovered with the MLP
replaced; the zero run zeroes the MLP's output.

CE is the next-token cross-entropy averaged over positions t whose token and next token are
both real (attention mask 1) and whose token is not an excluded special one: ``n_tokens_ce``
of them. KL(p_clean ‖ p_patched) = Σ_v p_clean(log p_clean − log p_patched) is averaged
over every such position (``n_tokens_kl``). Padded positions are masked out of all metrics
and, with the attention mask, never reach real ones. Then

* ``ce_recovered`` = (CE_zero − CE_sae) / (CE_zero − CE_clean),
* ``kl_score`` = (KL_zero − KL_sae) / KL_zero,
* ``delta_ce`` = CE_sae − CE_clean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from saekit.errors import ConfigError
from saekit.sources.sites import resolve_site


def _logits(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    out = model(input_ids=ids, attention_mask=mask)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ConfigError(
            f"{type(model).__name__} returns no logits: spliced CE/KL needs a causal LM"
        )
    return logits.float()


class SpliceAccumulator:
    """Sums of CE (per run) and KL (per patched run) over real tokens.

    Runs are named ``clean``, ``sae``, ``zero``, ``sae_err`` and, for baselines,
    ``base:<name>``.
    """

    def __init__(self) -> None:
        self.ce: dict[str, float] = {}
        self.kl: dict[str, float] = {}
        self.n_ce = 0
        self.n_kl = 0

    def update(
        self, logits: dict[str, Tensor], ids: Tensor, mask: Tensor, keep: Tensor | None = None
    ) -> None:
        """Add one batch: ``logits[run] [B, T, V]``, ``ids``/``mask [B, T]``; ``keep [B, T]``
        (default: every real position) says which positions the averages count."""
        real = mask.bool()
        mask = real if keep is None else real & keep.bool()
        ce_mask = mask[:, :-1] & real[:, 1:]
        target = ids[:, 1:]
        logp_clean = torch.log_softmax(logits["clean"].float(), -1)
        p_clean = logp_clean.exp()
        for m, lg in logits.items():
            logp = logp_clean if m == "clean" else torch.log_softmax(lg.float(), -1)
            nll = -logp[:, :-1].gather(-1, target.unsqueeze(-1)).squeeze(-1)
            self.ce[m] = self.ce.get(m, 0.0) + float(nll[ce_mask].double().sum())
            if m != "clean":
                kl = (p_clean * (logp_clean - logp)).sum(-1)
                self.kl[m] = self.kl.get(m, 0.0) + float(kl[mask].double().sum())
        self.n_ce += int(ce_mask.sum())
        self.n_kl += int(mask.sum())

    def result(self) -> dict[str, Any]:
        nan = float("nan")
        ce = {m: v / self.n_ce if self.n_ce else nan for m, v in self.ce.items()}
        kl = {m: v / self.n_kl if self.n_kl else nan for m, v in self.kl.items()}
        if "clean" not in ce:
            return {"n_tokens": 0, "n_tokens_ce": 0, "n_tokens_kl": 0}
        den = ce["zero"] - ce["clean"]

        def rec(run: str) -> float:
            return (ce["zero"] - ce[run]) / den if den != 0 else nan

        def kls(run: str) -> float:
            return (kl["zero"] - kl[run]) / kl["zero"] if kl["zero"] else nan

        out: dict[str, Any] = {
            "n_tokens_ce": self.n_ce,
            "n_tokens_kl": self.n_kl,
            "n_tokens": self.n_ce,
            "ce_clean": ce["clean"],
            "ce_zero": ce["zero"],
            "kl_zero": kl["zero"],
        }
        if "sae" in ce:
            out.update(
                ce_sae=ce["sae"],
                delta_ce=ce["sae"] - ce["clean"],
                ce_recovered=rec("sae"),
                kl_sae=kl["sae"],
                kl_score=kls("sae"),
            )
        if "sae_err" in ce:
            out.update(
                ce_sae_err=ce["sae_err"], ce_recovered_err=rec("sae_err"), kl_sae_err=kl["sae_err"]
            )
        base = {}
        for run in ce:
            if run.startswith("base:"):
                base[run[5:]] = {
                    "n_tokens": self.n_ce,
                    "ce_sae": ce[run],
                    "delta_ce": ce[run] - ce["clean"],
                    "ce_recovered": rec(run),
                    "kl_sae": kl[run],
                    "kl_score": kls(run),
                }
        if base:
            out["baselines"] = base
        return out


@torch.no_grad()
def splice_batch(
    model: nn.Module,
    sae: Any,
    site_name: str,
    ids: Tensor,
    mask: Tensor,
    baselines: dict[str, Any] | None = None,
    replace_at: Tensor | None = None,
    reads: dict[str, str] | None = None,
) -> dict[str, Tensor]:
    """Logits of the runs ``clean``, ``sae``, ``zero``, ``sae_err`` (and ``base:<name>``).

    ``replace_at [B, T]`` (bool; default every position): where the autoencoders' output
    replaces the activation; elsewhere it stays clean. The zero run zeroes every position.
    ``reads``: run name -> the site whose live activation that run's autoencoder reads, when
    not ``site_name`` (a transcoder reads ``layers.i.mlp_in`` and replaces ``mlp_out``: the
    MLP's output is replaced by the transcoder's prediction from the MLP's input).
    """
    from saekit.sources.sites import hook_site

    site = resolve_site(model, site_name)
    reads = reads or {}
    logits: dict[str, Tensor] = {"clean": _logits(model, ids, mask)}
    live: dict[str, Tensor] = {}

    def replace(ae: Any, mode: str):
        def fn(h: Tensor) -> Tensor:
            if mode == "zero":
                return torch.zeros_like(h)
            x = live.pop("x", h)
            x_hat = ae(x.reshape(-1, x.shape[-1])).x_hat.reshape(h.shape).to(h.dtype)
            if mode == "sae_err":
                x_hat = x_hat + (h - x_hat)
            if replace_at is not None:
                x_hat = torch.where(replace_at.to(h.device)[..., None], x_hat, h)
            return x_hat

        return fn

    runs = [("sae", sae, "sae"), ("zero", None, "zero"), ("sae_err", sae, "sae_err")]
    runs += [(f"base:{n}", b, "sae") for n, b in (baselines or {}).items()]
    for name, ae, mode in runs:
        with contextlib.ExitStack() as stack:
            read = reads.get(name, site_name)
            if read != site_name and mode != "zero":
                stack.enter_context(hook_site(resolve_site(model, read), _capture(live)))
            stack.enter_context(hook_site(site, replace(ae, mode)))
            logits[name] = _logits(model, ids, mask)
    return logits


def _capture(live: dict[str, Tensor]):
    def fn(h: Tensor) -> None:
        live["x"] = h

    return fn


@torch.no_grad()
def splice_metrics(
    model: nn.Module,
    sae: Any,
    site_name: str,
    batches: Iterable[tuple[Tensor, Tensor]],
    baselines: dict[str, Any] | None = None,
    special_ids: Iterable[int] = (),
    include_special: bool = False,
    reads: dict[str, str] | None = None,
) -> dict[str, Any]:
    """CE / KL metrics over ``batches`` of ``(input_ids, attention_mask)``; ``reads``: see
    :func:`splice_batch` (run names ``sae``, ``sae_err``, ``base:<name>``).

    ``baselines``: other autoencoders (anything whose call returns ``.x_hat``) spliced the
    same way; their CE recovered / KL score are under ``result["baselines"]``.
    ``special_ids`` (e.g. ``tokenizer.all_special_ids``): kept clean and out of the averages
    unless ``include_special`` (see the module docstring).
    """
    was = sae.training
    sae.train(False)
    acc = SpliceAccumulator()
    dev = next(model.parameters()).device
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long, device=dev)
    n_special = 0
    try:
        for ids, mask in batches:
            ids, mask = ids.to(dev), mask.to(dev)
            keep = None
            if special.numel() and not include_special:
                keep = ~torch.isin(ids, special)
                n_special += int((mask.bool() & ~keep).sum())
            logits = splice_batch(
                model, sae, site_name, ids, mask, baselines, replace_at=keep, reads=reads
            )
            acc.update(logits, ids, mask, keep)
    finally:
        sae.train(was)
    out = acc.result()
    out["special_tokens"] = "included" if include_special else "excluded"
    out["n_special_excluded"] = n_special
    return out


def _windows(tokenizer: Any, text: str, context_len: int) -> list[tuple[list[int], list[int]]]:
    """``(ids, mask)`` windows of ``context_len`` tokens covering ``text`` (each window with
    the tokenizer's special tokens; fast tokenizers only, else the first window)."""
    kw: dict[str, Any] = {"truncation": True, "max_length": context_len}
    if getattr(tokenizer, "is_fast", False):
        kw["return_overflowing_tokens"] = True
    enc = tokenizer(text, **kw)
    ids = enc["input_ids"]
    rows = ids if ids and isinstance(ids[0], list) else [ids]
    return [(r, [1] * len(r)) for r in rows if len(r) > 1]


def token_batches(
    tokenizer: Any,
    texts: Iterable[str],
    context_len: int,
    batch_size: int,
    max_tokens: int,
    special_ids: Iterable[int] = (),
) -> Iterable[tuple[Tensor, Tensor]]:
    """Cut texts into windows of ``context_len`` tokens and yield right-padded batches of
    ``batch_size`` windows until at least ``max_tokens`` real tokens have been yielded
    (tokens in ``special_ids`` not counted)."""
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    queue: list[tuple[list[int], list[int]]] = []
    seen = 0

    def emit(rows: list[tuple[list[int], list[int]]]) -> tuple[Tensor, Tensor]:
        T = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for j, (r, m) in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(m)] = torch.tensor(m)
        return ids, mask

    for t in texts:
        if not t.strip():
            continue
        queue.extend(_windows(tokenizer, t, context_len))
        while len(queue) >= batch_size:
            rows, queue = queue[:batch_size], queue[batch_size:]
            ids, mask = emit(rows)
            yield ids, mask
            counted = mask.bool() & ~torch.isin(ids, special) if special.numel() else mask
            seen += int(counted.sum())
            if seen >= max_tokens:
                return
    if queue:
        yield emit(queue)
