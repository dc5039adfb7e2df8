"""k-sparse probing (SAEBench ``sparse_probing``) on locally labelled text.

Input: a JSONL file with ``text`` and ``label`` fields (and an optional ``split`` field,
"train" / "test"; without it a seeded stratified split with ``test_frac`` = 0.2). Each text
is run through the model, activations at the SAE's site are mean-pooled over real tokens
(attention mask; special tokens excluded when the tokenizer marks them), and so are the
SAE codes (mean of the per-token codes). For each class c (one-vs-rest; a binary task has
one class) the train and the test split are each **balanced** as SAEBench's
``prepare_probe_data`` does: the examples of c and as many others, drawn evenly from the
other classes (:func:`balanced_one_vs_rest`; without it, "always no" scores 0.8 on five
classes). On the balanced train set we pick the top-k latents (or raw dimensions) by
|mean_pos − mean_neg|, fit sklearn ``LogisticRegression(C=1, max_iter=1000)`` on those k
columns, and report accuracy on the balanced test set (chance: 0.5); accuracies are
averaged over classes. k ∈ {1, 2, 5} by default. Selection uses the raw pooled values (as
SAEBench); the k chosen columns are then standardised with the train mean / std before
fitting (our choice: LR with C=1 is scale-sensitive, and code and activation scales differ
widely).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from saekit.errors import DataError
from saekit.sources.text import read_labelled

DEFAULT_KS = (1, 2, 5)


def read_labelled_jsonl(
    path: str | Path, text_field: str = "text", label_field: str = "label"
) -> tuple[list[str], list[str], list[str] | None]:
    """(texts, labels as strings, splits or None) from a JSONL file."""
    texts, labels, splits = read_labelled(path, text_field, label_field)
    if len(set(labels)) < 2:
        raise DataError(f"{path}: probing needs at least two distinct labels")
    use_split = all(s in ("train", "test") for s in splits)
    return texts, labels, (splits if use_split else None)


def train_test_split(
    labels: Sequence[str], test_frac: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: (train indices, test indices)."""
    rng = np.random.default_rng(seed)
    lab = np.asarray(labels)
    tr, te = [], []
    for c in sorted(set(labels)):
        idx = np.nonzero(lab == c)[0]
        rng.shuffle(idx)
        n_te = max(1, int(round(test_frac * len(idx)))) if len(idx) > 1 else 0
        te.extend(idx[:n_te].tolist())
        tr.extend(idx[n_te:].tolist())
    return np.sort(np.array(tr, dtype=int)), np.sort(np.array(te, dtype=int))


def top_k_by_mean_diff(X: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Columns with the largest |mean over y=1 − mean over y=0|."""
    diff = np.abs(X[y == 1].mean(0) - X[y == 0].mean(0))
    k = min(k, X.shape[1])
    return np.argsort(-diff, kind="stable")[:k]


def balanced_one_vs_rest(y: np.ndarray, c: str, rng: np.random.Generator) -> np.ndarray:
    """Indices of a balanced "c vs rest" set: ``n`` examples of ``c`` and ``n`` others.

    The others are drawn evenly from every other class (``ceil(n / n_other_classes)`` each,
    fewer where a class has fewer; the shortfall from the remaining ones), as SAEBench's
    ``prepare_probe_data``; ``n`` is the number of examples of ``c``, or of the others when
    they are fewer (then ``c`` is subsampled). Shuffled.
    """
    pos = np.nonzero(y == c)[0]
    others = [np.nonzero(y == o)[0] for o in sorted(set(y.tolist()) - {c})]
    n = min(len(pos), sum(len(o) for o in others))
    if n == 0:
        return np.zeros(0, dtype=int)
    per = -(-n // max(len(others), 1))
    drawn = [rng.permutation(o) for o in others]
    neg = np.concatenate([d[:per] for d in drawn])
    if len(neg) < n:  # some classes were short: top up from what is left
        rest = rng.permutation(np.concatenate([d[per:] for d in drawn]))
        neg = np.concatenate([neg, rest[: n - len(neg)]])
    neg = rng.permutation(neg)[:n]
    pos = rng.permutation(pos)[:n]
    return rng.permutation(np.concatenate([pos, neg]))


def sparse_probe_accuracy(
    X_train: np.ndarray,
    y_train: Sequence[str],
    X_test: np.ndarray,
    y_test: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
) -> dict[str, Any]:
    """Balanced test accuracy of top-k probes per k (one-vs-rest, averaged over classes;
    train and test balanced per class by :func:`balanced_one_vs_rest`, seeded)."""
    from saekit.extras import require

    LogisticRegression = require("sklearn.linear_model", "sparse probing").LogisticRegression

    ytr, yte = np.asarray(y_train), np.asarray(y_test)
    classes = sorted(set(ytr.tolist()))
    if len(classes) < 2:
        raise DataError("the train split needs at least two classes")
    targets = classes[1:] if len(classes) == 2 else classes
    mu, sd = X_train.mean(0), X_train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    Xtr, Xte = (X_train - mu) / sd, (X_test - mu) / sd
    out: dict[str, Any] = {"classes": classes, "n_train": len(ytr), "n_test": len(yte)}
    rng = np.random.default_rng(seed)
    sets = {
        c: (balanced_one_vs_rest(ytr, c, rng), balanced_one_vs_rest(yte, c, rng)) for c in targets
    }
    out["balanced_sizes"] = {c: [len(a), len(b)] for c, (a, b) in sets.items()}
    for k in ks:
        accs = []
        for c in targets:
            i_tr, i_te = sets[c]
            if len(i_te) == 0 or len(set(ytr[i_tr] == c)) < 2:
                continue
            b_tr, b_te = (ytr[i_tr] == c).astype(int), (yte[i_te] == c).astype(int)
            cols = top_k_by_mean_diff(X_train[i_tr], b_tr, k)  # selection on raw values
            clf = LogisticRegression(C=1.0, max_iter=1000)
            clf.fit(Xtr[i_tr][:, cols], b_tr)
            accs.append(float((clf.predict(Xte[i_te][:, cols]) == b_te).mean()))
        out[f"top_{k}_test_accuracy"] = float(np.mean(accs)) if accs else float("nan")
    return out


@torch.no_grad()
def pooled_features(
    model: nn.Module,
    tokenizer: Any,
    sae: Any,
    site_name: str,
    texts: Sequence[str],
    context_len: int = 128,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean-pooled raw activations ``[n, d]`` and SAE codes ``[n, d_sae]``, and tokens used."""
    from saekit.sources.sites import StopForward, hook_site, resolve_site

    site = resolve_site(model, site_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])))
    dev = next(model.parameters()).device
    raw, codes = [], []
    n_tok = 0
    was = sae.training
    sae.train(False)
    try:
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[s : s + batch_size]),
                truncation=True,
                max_length=context_len,
                padding=True,
                return_tensors="pt",
            )
            ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
            keep = mask.bool()
            if special.numel():
                nonspecial = ~torch.isin(ids, special.to(dev))
                # keep special tokens only for a text that has nothing else
                keep = torch.where(
                    (keep & nonspecial).any(1, keepdim=True), keep & nonspecial, keep
                )
            got: dict[str, Tensor] = {}

            def grab(h: Tensor, got: dict[str, Tensor] = got) -> None:
                got["h"] = h.detach()
                raise StopForward

            with hook_site(site, grab), contextlib.suppress(StopForward):
                model(input_ids=ids, attention_mask=mask)
            h = got["h"].float()  # [B, T, d]
            B, T, d = h.shape
            a = sae.encode(h.reshape(-1, d)).to_dense().reshape(B, T, -1).float()
            w = keep.float().unsqueeze(-1)
            cnt = w.sum(1).clamp_min(1)
            raw.append(((h * w).sum(1) / cnt).cpu())
            codes.append(((a * w).sum(1) / cnt).cpu())
            n_tok += int(keep.sum())
    finally:
        sae.train(was)
    return torch.cat(raw).double().numpy(), torch.cat(codes).double().numpy(), n_tok


def probe_run(
    model: nn.Module,
    tokenizer: Any,
    sae: Any,
    site_name: str,
    data_path: str | Path,
    ks: Sequence[int] = DEFAULT_KS,
    context_len: int = 128,
    test_frac: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Sparse probing of SAE codes vs raw activations on a labelled JSONL file."""
    texts, labels, splits = read_labelled_jsonl(data_path)
    if splits is None:
        tr, te = train_test_split(labels, test_frac, seed)
    else:
        tr = np.array([i for i, s in enumerate(splits) if s == "train"], dtype=int)
        te = np.array([i for i, s in enumerate(splits) if s == "test"], dtype=int)
    raw, codes, n_tok = pooled_features(model, tokenizer, sae, site_name, texts, context_len)
    y = np.asarray(labels)
    sae_res = sparse_probe_accuracy(codes[tr], y[tr], codes[te], y[te], ks, seed)
    llm_res = sparse_probe_accuracy(raw[tr], y[tr], raw[te], y[te], ks, seed)
    out: dict[str, Any] = {
        "n_tokens": n_tok,
        "n_texts": len(texts),
        "n_train": int(len(tr)),
        "n_test": int(len(te)),
        "classes": sae_res["classes"],
    }
    for k in ks:
        out[f"sae_top_{k}_test_accuracy"] = sae_res[f"top_{k}_test_accuracy"]
        out[f"llm_top_{k}_test_accuracy"] = llm_res[f"top_{k}_test_accuracy"]
    return out
