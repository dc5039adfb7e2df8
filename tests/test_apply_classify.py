"""Feature classifiers: a planted feature that carries the label is found and beats chance."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from saekit import SAE, SAEConfig
from saekit.apply.classify import (
    best_threshold,
    binarize,
    classify_texts,
    fit_classifiers,
    metrics,
)
from saekit.apply.toy import tiny_gpt2, word_tokenizer

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "mat",
    "log",
    "sat",
    "ran",
    "on",
    "in",
    "and",
    "of",
    "to",
    "it",
    "is",
    "was",
    "big",
    "small",
    "red",
    "blue",
]
MARKER = "zebra"
SITE = "layers.0.resid_pre"
PLANTED = 11


def make_data(n: int = 80, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 12))]
        lab = "toxic" if i % 2 else "clean"
        if lab == "toxic":
            words.insert(rng.randrange(len(words)), MARKER)
        texts.append(" ".join(words))
        labels.append(lab)
    return texts, labels


@pytest.fixture(scope="module")
def planted():
    tok = word_tokenizer([" ".join(WORDS + [MARKER])], vocab_size=64)
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=0)
    m = tok.convert_tokens_to_ids(MARKER)
    torch.manual_seed(3)
    sae = SAE(SAEConfig(d_in=32, d_sae=48, rule="relu", apply_b_dec_to_input=False)).eval()
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte[m] *= 8.0  # the marker token stands out along its own embedding
        u = wte[m] / wte[m].norm()
        sae.W_enc -= u[:, None] * (u @ sae.W_enc)[None]  # other features ignore the marker
        sae.W_enc[:, PLANTED] = u
        sae.b_enc.fill_(-0.02)  # other (random) features fire only sometimes
        sae.b_enc[PLANTED] = -0.5 * float(wte[m].norm())
    return model, tok, sae


def test_planted_feature_carries_the_label(planted):
    model, tok, sae = planted
    texts, labels = make_data()
    res = classify_texts(sae, model, tok, SITE, texts, labels, test_size=0.3, seed=0)
    assert res.positive == "toxic"
    assert res.rule["features"][0] == PLANTED
    assert res.rule["test"]["f1"] > 0.9
    assert res.probe["test"]["f1"] > 0.9
    # chance: predicting everything positive
    assert res.rule["test"]["f1"] > res.chance["all_positive_f1"] + 0.2
    assert res.top_features[0]["feature"] == PLANTED


def test_without_the_signal_the_rule_is_near_chance(planted):
    model, tok, sae = planted
    texts, _ = make_data()
    rng = random.Random(1)
    labels = [rng.choice(["a", "b"]) for _ in texts]  # labels unrelated to the text
    res = classify_texts(sae, model, tok, SITE, texts, labels, seed=0)
    assert res.rule["test"]["accuracy"] < 0.8


def test_fit_on_matrix_and_helpers():
    rng = np.random.default_rng(0)
    X = rng.exponential(size=(200, 30)) * (rng.random((200, 30)) < 0.3)
    y = (rng.random(200) < 0.4).astype(int)
    X[y == 1, 4] += 2.0
    res = fit_classifiers(X, y, probe="l1", probe_c=0.5)
    assert 4 in res.rule["features"]
    assert res.probe["weights"][0]["feature"] == 4
    t, f1 = best_threshold(np.array([0.0, 0.1, 2.0, 3.0]), np.array([0, 0, 1, 1]))
    assert 0.1 < t < 2.0 and f1 == 1.0
    m = metrics(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
    assert m == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "accuracy": 0.5}


def test_bad_labels():
    with pytest.raises(ValueError, match="two labels"):
        binarize(["a", "a"])
    with pytest.raises(ValueError, match="positive"):
        binarize(["a", "b", "c"])
    y, pos = binarize(["a", "b", "c"], positive="c")
    assert pos == "c" and y.tolist() == [0, 0, 1]
