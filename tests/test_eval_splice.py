"""Spliced CE / KL metrics on tiny decoder LMs built from configs."""

from __future__ import annotations

import pytest
import torch

from saekit import SAE, SAEConfig
from saekit.evaluate import splice


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    return Qwen3ForCausalLM(cfg).eval()


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("make", [_gpt2, _qwen3])
def test_error_term_kept_recovers_all_and_zero_sae_recovers_nothing(make):
    model = make()
    ids, mask = _batch()
    sae = SAE(SAEConfig(d_in=32, d_sae=64, k=4, rule="topk"))
    r = splice.splice_metrics(model, sae, "layers.0.resid_post", [(ids, mask)])
    assert r["n_tokens_ce"] == 11 + 7 + 4
    assert r["n_tokens_kl"] == 12 + 8 + 5
    assert r["ce_recovered_err"] == pytest.approx(1.0, abs=1e-4)
    assert r["kl_sae_err"] == pytest.approx(0.0, abs=1e-6)
    assert r["ce_zero"] != pytest.approx(r["ce_clean"])
    assert r["kl_zero"] > 0
    # an SAE that outputs zeros is the zero ablation: CE recovered 0, KL score 0
    dead = SAE(SAEConfig(d_in=32, d_sae=64, k=4, rule="topk"))
    with torch.no_grad():
        dead.W_dec.zero_()
        dead.b_dec.zero_()
    r0 = splice.splice_metrics(model, dead, "layers.1.resid_post", [(ids, mask)])
    assert r0["ce_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert r0["kl_score"] == pytest.approx(0.0, abs=1e-6)


def test_clean_ce_equals_model_loss_and_pads_ignored():
    model = _gpt2()
    ids, _ = _batch()
    mask = torch.ones_like(ids)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, k=4, rule="topk"))
    r = splice.splice_metrics(model, sae, "layers.0.resid_pre", [(ids[:2], mask[:2])])
    with torch.no_grad():
        want = model(input_ids=ids[:2], labels=ids[:2]).loss
    assert r["ce_clean"] == pytest.approx(float(want), rel=1e-5)
    # padding tokens never count: changing a padded token id leaves every metric unchanged
    ids2, mask2 = _batch()
    a = splice.splice_metrics(model, sae, "layers.0.resid_post", [(ids2, mask2)])
    ids3 = ids2.clone()
    ids3[1, 9] = (ids3[1, 9] + 1) % 100
    b = splice.splice_metrics(model, sae, "layers.0.resid_post", [(ids3, mask2)])
    for k in ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"):
        assert a[k] == pytest.approx(b[k], rel=1e-6)


def test_accumulator_by_hand():
    # vocab 2, one sequence of 2 tokens: CE is -log p(target) at position 0
    ids = torch.tensor([[0, 1]])
    mask = torch.ones_like(ids)
    lg_clean = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])  # p = (.5, .5)
    lg_sae = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    lg_zero = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    acc = splice.SpliceAccumulator()
    acc.update({"clean": lg_clean, "sae": lg_sae, "zero": lg_zero, "sae_err": lg_clean}, ids, mask)
    r = acc.result()
    ln2 = torch.log(torch.tensor(2.0)).item()
    lse = torch.logsumexp(torch.tensor([0.0, 1.0]), 0).item()
    assert r["ce_clean"] == pytest.approx(ln2)
    assert r["ce_sae"] == pytest.approx(lse - 1.0)
    assert r["ce_zero"] == pytest.approx(lse)
    want = (lse - (lse - 1.0)) / (lse - ln2)
    assert r["ce_recovered"] == pytest.approx(want)
    # KL at position 0 (position 1 identical): sum .5 (log .5 - log q)
    q = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    kl0 = float((0.5 * (torch.log(torch.tensor(0.5)) - q.log())).sum())
    assert r["kl_sae"] == pytest.approx(kl0 / 2)  # averaged over 2 real positions
    assert r["kl_zero"] == pytest.approx(kl0 / 2)  # mirror image: same KL
    assert r["kl_score"] == pytest.approx(0.0)


def test_encoder_model_is_refused():
    from transformers import BertConfig, BertModel

    m = BertModel(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
        )
    ).eval()
    sae = SAE(SAEConfig(d_in=32, d_sae=64, k=4, rule="topk"))
    ids, mask = _batch()
    with pytest.raises(ValueError, match="causal LM"):
        splice.splice_metrics(m, sae, "layers.0.resid_post", [(ids, mask)])


def test_baselines_spliced_alongside():
    model = _gpt2()
    ids, mask = _batch()
    sae = SAE(SAEConfig(d_in=32, d_sae=64, k=4, rule="topk"))
    dead = SAE(SAEConfig(d_in=32, d_sae=64, k=4, rule="topk"))
    with torch.no_grad():
        dead.W_dec.zero_()
        dead.b_dec.zero_()
    r = splice.splice_metrics(
        model, sae, "layers.0.resid_post", [(ids, mask)], {"same": sae, "zero": dead}
    )
    assert r["baselines"]["same"]["ce_recovered"] == pytest.approx(r["ce_recovered"])
    assert r["baselines"]["same"]["kl_score"] == pytest.approx(r["kl_score"])
    assert r["baselines"]["zero"]["ce_recovered"] == pytest.approx(0.0, abs=1e-6)


def test_special_tokens_keep_their_activation_and_leave_the_averages():
    """Issue 10, fidelity 7: BOS (id 0 here) was replaced although training drops it."""
    model = _gpt2()
    ids, mask = _batch()
    ids = ids.clamp_min(1)
    ids[:, 0] = 0  # a BOS at the start of every row
    dead = SAE(SAEConfig(d_in=32, d_sae=64, k=4, rule="topk"))
    with torch.no_grad():
        dead.W_dec.zero_()
        dead.b_dec.zero_()
    site = "layers.0.resid_post"
    r = splice.splice_metrics(model, dead, site, [(ids, mask)], special_ids=[0])
    assert r["special_tokens"] == "excluded" and r["n_special_excluded"] == 3
    assert r["n_tokens_kl"] == 12 + 8 + 5 - 3 and r["n_tokens_ce"] == 11 + 7 + 4 - 3
    inc = splice.splice_metrics(
        model, dead, site, [(ids, mask)], special_ids=[0], include_special=True
    )
    assert inc["n_tokens_kl"] == 12 + 8 + 5 and inc["special_tokens"] == "included"
    plain = splice.splice_metrics(model, dead, site, [(ids, mask)])
    assert inc["kl_sae"] == pytest.approx(plain["kl_sae"])  # nothing special: as before
    # the BOS position kept its clean activation: its logits are the clean ones
    keep = ids != 0
    logits = splice.splice_batch(model, dead, site, ids, mask, replace_at=keep)
    torch.testing.assert_close(logits["sae"][:, 0], logits["clean"][:, 0])
    assert not torch.allclose(logits["sae"][:, 1], logits["clean"][:, 1])
    assert not torch.allclose(logits["zero"][:, 0], logits["clean"][:, 0])  # zero: everywhere
