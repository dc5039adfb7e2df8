"""Feature classifiers over SAE codes: a transparent OR-of-thresholds rule and a sparse probe.

Texts are pooled into one vector per text (``max``: the largest activation over tokens,
``|f|`` for signed rules; ``mean``: the mean activation). Features are ranked by how much
more they fire on the positive class: ``rate`` = difference of the fraction of texts on which
the feature fires at all, ``mean`` = difference of pooled means over the pooled standard
deviation. Both classifiers are fitted on a stratified train split and scored on the held-out
split.

- Rule (Qwen-Scope's toxicity recipe): each candidate feature gets the threshold that
  maximises its own train F1; features are then added greedily to an OR (``any f_i > t_i``)
  while train F1 improves, up to ``rule_max_features``.
- Probe: ``probe="topk"`` keeps the ``probe_k`` best-ranked features (by ``|score|``) and fits
  an L2 logistic regression on them; ``probe="l1"`` fits an L1 logistic regression
  (``liblinear``, ``C=probe_c``) on all features. Inputs are standardised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from saekit.apply.common import dense_codes, site_activations
from saekit.errors import ConfigError, DataError
from saekit.options import Options, option
from saekit.sae import SAE


@torch.no_grad()
def pooled_codes(
    sae: SAE,
    model: nn.Module,
    tok: Any,
    site: str,
    texts: list[str],
    pool: str = "max",
    max_len: int = 128,
    batch_size: int = 8,
) -> np.ndarray:
    """One pooled code vector per text, ``[n_texts, d_sae]`` (special tokens skipped)."""
    if pool not in ("max", "mean"):
        raise ConfigError(f"unknown pooling {pool!r}; use max or mean")
    recs = site_activations(model, tok, site, texts, max_len=max_len, batch_size=batch_size)
    out = np.zeros((len(recs), sae.d_sae), dtype=np.float32)
    for i, r in enumerate(recs):
        acts = r.acts[r.keep] if bool(r.keep.any()) else r.acts
        c = dense_codes(sae, acts)
        if pool == "max":
            out[i] = (c.abs() if sae.rule.signed else c).max(0).values.numpy()
        else:
            out[i] = c.mean(0).numpy()
    return out


def rank_features(X: np.ndarray, y: np.ndarray, by: str = "rate") -> np.ndarray:
    """Per-feature score, higher = more active on the positive class (``y == 1``)."""
    if by not in ("rate", "mean"):
        raise ConfigError(f"unknown ranking {by!r}; use rate or mean")
    pos, neg = X[y == 1], X[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise DataError("both classes are needed to rank features")
    if by == "rate":
        return (pos != 0).mean(0) - (neg != 0).mean(0)
    return (pos.mean(0) - neg.mean(0)) / (X.std(0) + 1e-8)


def _f1(pred: np.ndarray, y: np.ndarray) -> float:
    tp = float((pred & (y == 1)).sum())
    fp = float((pred & (y == 0)).sum())
    fn = float((~pred & (y == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of boolean predictions against ``y`` in {0, 1}."""
    pred = pred.astype(bool)
    tp = float((pred & (y == 1)).sum())
    fp = float((pred & (y == 0)).sum())
    fn = float((~pred & (y == 1)).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "accuracy": float((pred == y).mean())}


def best_threshold(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The threshold t maximising the F1 of ``x > t``; returns ``(t, f1)``."""
    vals = np.unique(x)
    cands = np.concatenate([[vals[0] - 1.0], (vals[:-1] + vals[1:]) / 2]) if len(vals) > 1 else vals
    best = (float(cands[0]), -1.0)
    for t in cands:
        f = _f1(x > t, y)
        if f > best[1]:
            best = (float(t), f)
    return best


@dataclass
class RuleClassifier:
    """``positive iff any(x[f] > t for f, t in zip(features, thresholds))``."""

    features: list[int] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)

    def predict(self, X: np.ndarray) -> np.ndarray:
        out = np.zeros(X.shape[0], dtype=bool)
        for f, t in zip(self.features, self.thresholds):
            out |= X[:, f] > t
        return out

    def describe(self) -> str:
        return " OR ".join(f"f{f} > {t:.4g}" for f, t in zip(self.features, self.thresholds))


def fit_rule(
    X: np.ndarray, y: np.ndarray, scores: np.ndarray, candidates: int = 20, max_features: int = 3
) -> RuleClassifier:
    """Greedy OR of per-feature thresholds (see the module doc)."""
    order = [int(i) for i in np.argsort(-scores)[:candidates] if scores[i] > 0]
    if not order:  # nothing favours the positive class: fall back to the best-scored ones
        order = [int(i) for i in np.argsort(-scores)[:candidates]]
    th = {f: best_threshold(X[:, f], y)[0] for f in order}
    rule = RuleClassifier()
    cur = np.zeros(len(y), dtype=bool)
    best_f1 = -1.0
    while len(rule.features) < max_features:
        gains = [(_f1(cur | (X[:, f] > th[f]), y), f) for f in order if f not in rule.features]
        if not gains:
            break
        f1, f = max(gains)
        if f1 <= best_f1:
            break
        rule.features.append(f)
        rule.thresholds.append(th[f])
        cur |= X[:, f] > th[f]
        best_f1 = f1
    return rule


def _l1_kwargs() -> dict[str, Any]:
    from saekit.extras import require

    sklearn = require("sklearn", "saekit classify")

    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


@dataclass
class ClassifyResult:
    """Both classifiers and their held-out metrics."""

    positive: str
    n_train: int
    n_test: int
    pool: str
    rank_by: str
    top_features: list[dict[str, float]]
    rule: dict[str, Any]
    probe: dict[str, Any]
    chance: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_classifiers(
    X: np.ndarray,
    y: np.ndarray,
    test_size: float = 0.3,
    seed: int = 0,
    rank_by: str = "rate",
    rule_candidates: int = 20,
    rule_max_features: int = 3,
    probe: str = "topk",
    probe_k: int = 16,
    probe_c: float = 1.0,
    positive: str = "1",
    pool: str = "max",
) -> ClassifyResult:
    """Split, rank features on the train part, fit the rule and the probe, score held-out."""
    from saekit.extras import require

    require("sklearn", "saekit classify")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y).astype(int)
    if set(np.unique(y)) != {0, 1}:
        raise DataError("labels must contain both classes (positive and negative)")
    if not 0 < test_size < 1:
        raise ConfigError(f"test_size must be in (0, 1), got {test_size}")
    if probe not in ("topk", "l1"):
        raise ConfigError(f"unknown probe {probe!r}; use topk or l1")
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=y)
    Xtr, Xte, ytr, yte = X[tr], X[te], y[tr], y[te]
    scores = rank_features(Xtr, ytr, rank_by)
    top = np.argsort(-scores)[:10]
    rule = fit_rule(Xtr, ytr, scores, rule_candidates, rule_max_features)

    if probe == "topk":
        feats = [int(i) for i in np.argsort(-np.abs(scores))[:probe_k]]
        clf = LogisticRegression(C=probe_c, max_iter=1000)
    else:
        feats = list(range(X.shape[1]))
        clf = LogisticRegression(C=probe_c, solver="liblinear", max_iter=1000, **_l1_kwargs())
    scaler = StandardScaler().fit(Xtr[:, feats])
    clf.fit(scaler.transform(Xtr[:, feats]), ytr)
    pred = clf.predict(scaler.transform(Xte[:, feats])).astype(bool)
    coef = clf.coef_[0]
    used = [(f, float(c)) for f, c in zip(feats, coef) if c != 0]
    used.sort(key=lambda t: -abs(t[1]))

    p = float(yte.mean())
    return ClassifyResult(
        positive=positive,
        n_train=len(tr),
        n_test=len(te),
        pool=pool,
        rank_by=rank_by,
        top_features=[{"feature": int(i), "score": float(scores[i])} for i in top],
        rule={
            "rule": rule.describe(),
            "features": rule.features,
            "thresholds": rule.thresholds,
            "test": metrics(rule.predict(Xte), yte),
            "train": metrics(rule.predict(Xtr), ytr),
        },
        probe={
            "kind": probe,
            "n_features": len(used),
            "weights": [{"feature": f, "coef": c} for f, c in used[:20]],
            "test": metrics(pred, yte),
        },
        chance={"majority_accuracy": max(p, 1 - p), "all_positive_f1": 2 * p / (1 + p)},
    )


def binarize(labels: list[str], positive: str | None = None) -> tuple[np.ndarray, str]:
    """``(y, positive)``: 1 for the positive label. With two labels it defaults to the larger
    label in sort order ("1" over "0", "pos" over "neg"); with more, ``positive`` is required
    (one-vs-rest)."""
    names = sorted(set(labels))
    if len(names) < 2:
        raise DataError(f"need at least two labels, found {names}")
    if positive is None:
        if len(names) > 2:
            raise ConfigError(f"{len(names)} labels {names}: say which is positive (--positive)")
        positive = names[-1]
    if positive not in names:
        raise ConfigError(f"positive label {positive!r} not among the labels {names}")
    return np.array([lab == positive for lab in labels], dtype=int), positive


@dataclass
class ClassifyConfig(Options):
    """How :func:`classify_texts` pools, splits, ranks and fits (its keyword options)."""

    positive: str | None = option(None, "positive label (default: the larger)")
    pool: str = option("max", "pool codes over a text's tokens", choices=("max", "mean"))
    test_size: float = option(0.3, "held-out fraction", gt=0, lt=1)
    seed: int = option(0, "split seed", ge=0)
    rank_by: str = option(
        "rate", "rank features by firing-rate or mean-activation gap", choices=("rate", "mean")
    )
    rule_max_features: int = option(3, "at most this many features in the rule", ge=1)
    probe: str = option("topk", "sparse probe: top-k features or L1", choices=("topk", "l1"))
    probe_k: int = option(16, "features of the top-k probe", ge=1)
    probe_c: float = option(1.0, "inverse regularisation of the probe", gt=0)


def classify_texts(
    sae: SAE,
    model: nn.Module,
    tok: Any,
    site: str,
    texts: list[str],
    labels: list[str],
    positive: str | None = None,
    pool: str = "max",
    max_len: int = 128,
    **kw: Any,
) -> ClassifyResult:
    """Pool codes of ``texts`` at ``site`` and run :func:`fit_classifiers`."""
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels")
    y, pos = binarize(labels, positive)
    X = pooled_codes(sae, model, tok, site, texts, pool=pool, max_len=max_len)
    return fit_classifiers(X, y, positive=pos, pool=pool, **kw)
