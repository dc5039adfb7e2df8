"""Steering and ablation on a tiny GPT-2 built from a config."""

from __future__ import annotations

import pytest
import torch

from saekit import SAE, SAEConfig
from saekit.apply.ablate import ablate, ablation_effects, ablation_fn
from saekit.apply.steer import (
    FeatureEdit,
    generate,
    parse_feature_spec,
    steer,
    steer_compare,
    top_features,
)
from saekit.apply.toy import tiny_gpt2, word_tokenizer

TEXTS = [
    "the cat sat on the mat and the dog sat on the log",
    "a function returns a value when the loop ends",
    "for x in range ten print x and return the list",
]
SITE = "layers.1.resid_post"


@pytest.fixture(scope="module")
def lm():
    tok = word_tokenizer(TEXTS, vocab_size=64)
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=0)
    return model, tok


def make_sae(d: int = 32, rule: str = "topk", k: int = 4) -> SAE:
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=d, d_sae=64, rule=rule, k=k))
    return sae.eval()


def logits(model, tok, text: str) -> torch.Tensor:
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_alpha_zero_is_identity(lm):
    model, tok = lm
    sae = make_sae()
    clean = logits(model, tok, TEXTS[0])
    with steer(model, sae, SITE, {3: 0.0, 9: 0.0}, mode="add"):
        steered = logits(model, tok, TEXTS[0])
    assert torch.equal(clean, steered)


def test_steering_moves_logits_along_direct_effect(lm):
    model, tok = lm
    sae = make_sae()
    f = 5
    clean = logits(model, tok, TEXTS[1])
    with steer(model, sae, SITE, {f: 0.05}):
        up = logits(model, tok, TEXTS[1])
    with steer(model, sae, SITE, {f: -0.05}):
        down = logits(model, tok, TEXTS[1])
    d = sae.W_dec[f].detach()
    gamma = model.transformer.ln_f.weight.detach()
    W_U = model.get_output_embeddings().weight.detach()
    expected = W_U @ (gamma * (d - d.mean()))  # d_i through the final LayerNorm's Jacobian
    for pos in range(clean.shape[0]):
        cos_up = torch.cosine_similarity(up[pos] - clean[pos], expected, dim=0)
        cos_down = torch.cosine_similarity(down[pos] - clean[pos], expected, dim=0)
        assert cos_up > 0.9, float(cos_up)
        assert cos_down < -0.9, float(cos_down)  # signed steering: -alpha goes the other way
    # a random direction does not line up with it
    other = W_U @ (gamma * (sae.W_dec[f + 1].detach() - sae.W_dec[f + 1].detach().mean()))
    assert abs(float(torch.cosine_similarity(up[0] - clean[0], other, dim=0))) < 0.9


def test_several_features_add_linearly():
    sae = make_sae()
    from saekit.apply.steer import steering_fn

    base = torch.randn(3, 5, 32)
    fn = steering_fn(sae, [FeatureEdit(2, 1.5), FeatureEdit(7, -2.0)])
    want = base + 1.5 * sae.W_dec[2].detach() - 2.0 * sae.W_dec[7].detach()
    assert torch.allclose(fn(base), want, atol=1e-6)


def test_clamp_to_current_value_is_identity_and_clamp_sets_value(lm):
    model, tok = lm
    sae = make_sae(rule="relu")
    from saekit.apply.steer import steering_fn

    h = torch.randn(6, 32)
    with torch.no_grad():
        codes = sae.encode(h).to_dense()
    f = int(codes.sum(0).argmax())
    out = steering_fn(sae, {f: 3.0}, mode="clamp")(h)
    # the change is exactly (3 - f(h)) d_f
    want = h + (3.0 - codes[:, f])[:, None] * sae.W_dec[f].detach()[None]
    assert torch.allclose(out, want, atol=1e-5)
    # ablate mode equals the ablation transform with the error kept
    abl = steering_fn(sae, {f: 123.0}, mode="ablate")(h)
    assert torch.allclose(abl, ablation_fn(sae, [f])(h), atol=1e-5)


def test_ablation_of_nothing_equals_clean_model(lm):
    model, tok = lm
    sae = make_sae()
    clean = logits(model, tok, TEXTS[2])
    with ablate(model, sae, SITE, [], keep_error=True):
        same = logits(model, tok, TEXTS[2])
    assert torch.allclose(clean, same, atol=1e-5)
    # ablating fired features does change the logits
    feats = [r["feature"] for r in top_features(sae, model, tok, SITE, TEXTS[2], n=3)]
    assert feats
    with ablate(model, sae, SITE, feats):
        changed = logits(model, tok, TEXTS[2])
    assert not torch.allclose(clean, changed, atol=1e-4)


def test_ablation_effects_report(lm):
    model, tok = lm
    sae = make_sae()
    rep = ablation_effects(model, tok, sae, SITE, TEXTS, top_n=3)
    assert len(rep["per_feature"]) == 3
    deltas = [r["delta"] for r in rep["per_feature"]]
    assert deltas == sorted(deltas, reverse=True)
    assert any(abs(d) > 0 for d in deltas)
    rep2 = ablation_effects(model, tok, sae, SITE, TEXTS, features=[1, 2])
    assert {r["feature"] for r in rep2["per_feature"]} == {1, 2}
    with pytest.raises(ValueError, match="out of range"):
        ablation_effects(model, tok, sae, SITE, TEXTS, features=[999])


def test_generation_is_deterministic_and_steering_changes_it(lm):
    model, tok = lm
    sae = make_sae()
    a = generate(model, tok, "the cat", 8)
    b = generate(model, tok, "the cat", 8)
    assert a == b
    res = steer_compare(model, tok, sae, SITE, "the cat", {4: 40.0}, max_new_tokens=8)
    assert res["unsteered"] == a
    assert res["steered"] != a


def test_top_features_ranked_and_signed():
    tok = word_tokenizer(TEXTS, vocab_size=64)
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=32, seed=0)
    sae = make_sae()
    top = top_features(sae, model, tok, SITE, TEXTS[0], n=5)
    maxes = [abs(r["max"]) for r in top]
    assert maxes == sorted(maxes, reverse=True) and len(top) == 5
    assert all(r["fired_tokens"] > 0 for r in top)


def test_bad_specs():
    assert parse_feature_spec("12:4.0") == FeatureEdit(12, 4.0)
    assert parse_feature_spec("7:-2") == FeatureEdit(7, -2.0)
    with pytest.raises(ValueError, match="INDEX:VALUE"):
        parse_feature_spec("a:b")
    sae = make_sae()
    from saekit.apply.steer import steering_fn

    with pytest.raises(ValueError, match="mode"):
        steering_fn(sae, {1: 1.0}, mode="multiply")
    with pytest.raises(ValueError, match="out of range"):
        steering_fn(sae, {64: 1.0})


def test_signed_abstopk_features(lm):
    model, tok = lm
    torch.manual_seed(2)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, rule="abstopk", k=6)).eval()
    top = top_features(sae, model, tok, SITE, TEXTS[1], n=20)
    assert any(r["max"] < 0 for r in top)  # negative codes are ranked by |value|
    from saekit.apply.steer import steering_fn

    h = torch.randn(5, 32)
    with torch.no_grad():
        codes = sae.encode(h).to_dense()
    f = int(codes.abs().sum(0).argmax())
    out = steering_fn(sae, {f: -3.0}, mode="clamp")(h)
    want = h + (-3.0 - codes[:, f])[:, None] * sae.W_dec[f].detach()[None]
    assert torch.allclose(out, want, atol=1e-5)
    with torch.no_grad():
        after = sae.encode(out).to_dense()[:, f]
    assert (after < 0).float().mean() >= 0.6  # clamped negative: the feature now reads negative
