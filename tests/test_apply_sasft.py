"""SASFT: the loss formula, gradients into the model only, the Trainer mixin and the example."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from saekit import SAE, SAEConfig
from saekit.apply.sasft import (
    SASFTRegularizer,
    SASFTTrainerMixin,
    monolinguality,
    sasft_loss,
    selected_pre_acts,
)
from saekit.apply.toy import tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]


def test_loss_formula():
    pre = torch.tensor([[[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]]])  # [B=1, T=2, F=3]
    ref = torch.tensor([0.0, 1.0])
    mask = torch.tensor([[True, False]])
    # J = [0, 1]; token 0 only: relu(1-0) + relu(-2-1) = 1; / (1 token * 2 features)
    got = sasft_loss(pre, [0, 1], ref, mask, lam=0.5)
    assert torch.isclose(got, torch.tensor(0.5 * 1.0 / 2))
    # all tokens: token 1 adds relu(0.5) + relu(4-1) = 3.5 -> (1 + 3.5) / (2 * 2)
    assert torch.isclose(sasft_loss(pre, [0, 1], ref, None, lam=1.0), torch.tensor(4.5 / 4))
    # preselected columns give the same
    assert torch.isclose(sasft_loss(pre[..., :2], None, ref, mask, 0.5), got)
    # no selected token: zero, and still differentiable
    p = pre.clone().requires_grad_(True)
    z = sasft_loss(p, [0], 0.0, torch.zeros(1, 2, dtype=torch.bool))
    z.backward()
    assert float(z.detach()) == 0.0 and p.grad is not None
    with pytest.raises(ValueError, match="token_mask"):
        sasft_loss(pre, [0], 0.0, torch.ones(2, 2))


@pytest.mark.parametrize("normalize", [False, True])
def test_selected_pre_acts_match_sae(normalize):
    sae = SAE(SAEConfig(d_in=8, d_sae=20, k=3, normalize_input=normalize))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.input_scale.fill_(2.5)
    h = torch.randn(4, 8)
    full = sae.encode_pre(h)
    got = selected_pre_acts(sae, h, [3, 7])
    assert torch.allclose(got, full[:, [3, 7]], atol=1e-5)


def test_regularizer_grads_into_model_not_sae():
    model = tiny_gpt2(30, n_layer=2, n_embd=16, seed=0)  # eval: no dropout, grads still flow
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=2))
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # the penalised features are well above the reference
    ids = torch.randint(3, 30, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    with SASFTRegularizer(model, sae, "layers.1.resid_post", [1, 5], ref=0.0, lam=1.0) as reg:
        reg.token_mask = mask
        out = model(input_ids=ids)
    assert reg.loss.requires_grad and float(reg.loss.detach()) > 0
    # the term equals the formula on the hidden state
    from saekit.sources.sites import get_hidden, hook_site, resolve_site

    seen = {}
    with hook_site(resolve_site(model, "layers.1.resid_post"), lambda t: seen.update(h=t)):
        model(input_ids=ids)
    h = get_hidden(seen["h"])
    want = sasft_loss(sae.encode_pre(h.reshape(-1, 16)).reshape(2, 7, -1), [1, 5], 0.0, mask, 1.0)
    assert torch.isclose(reg.loss, want, atol=1e-5)
    (out.logits.sum() * 0 + reg.loss).backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in sae.parameters())
    # detached: later forwards do not update the loss
    before = reg.loss
    model(input_ids=ids)
    assert reg.loss is before


def test_trainer_mixin_adds_the_term_and_masks_by_labels():
    model = tiny_gpt2(30, n_layer=2, n_embd=16, seed=0)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=2))
    with torch.no_grad():
        sae.b_enc.fill_(5.0)

    class FakeTrainer:  # stands in for transformers.Trainer (needs accelerate)
        def __init__(self, model):
            self.model = model

        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            out = model(**inputs)
            return (out.loss, out) if return_outputs else out.loss

    class T(SASFTTrainerMixin, FakeTrainer):
        pass

    reg = SASFTRegularizer(model, sae, "layers.0.resid_post", [2], lam=1.0)
    tr = T(model, sasft=reg)
    ids = torch.randint(3, 30, (2, 6))
    labels = ids.clone()
    labels[:, :3] = -100  # prompt tokens are not penalised
    loss = tr.compute_loss(model, {"input_ids": ids, "labels": labels})
    lm = model(input_ids=ids, labels=labels).loss
    assert torch.equal(reg.token_mask, labels != -100)
    assert torch.isclose(loss, lm + reg.loss)
    reg.detach()
    with pytest.raises(ValueError, match="sasft"):
        T(model)


def test_monolinguality():
    nu = monolinguality({"en": torch.tensor([1.0, 0.0]), "zh": torch.tensor([0.0, 2.0])})
    assert nu["zh"].tolist() == [-1.0, 2.0] and nu["en"].tolist() == [1.0, -2.0]


def test_example_sasft_drops_the_targeted_feature():
    spec = importlib.util.spec_from_file_location("sasft_ex", ROOT / "examples/sasft_finetune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = mod.main(["--steps", "15", "--pretrain-steps", "30", "--sae-steps", "120", "--quiet"])
    finally:
        torch.set_num_threads(n)
    assert res["monolinguality"] > 0
    assert res["after_sasft"] < res["before"] - 1.0
    assert res["after_sasft"] < res["after_sft"] - 1.0


def test_real_hf_trainer_with_the_mixin_lowers_the_feature(tmp_path):
    """transformers.Trainer + SASFTTrainerMixin: training lowers the penalised pre-activation."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from saekit.sources.sites import get_hidden, hook_site, resolve_site

    site = "layers.1.resid_post"
    ids = torch.randint(3, 30, (16, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r.clone()} for r in ids]

    def feature_mean(model, sae) -> float:
        seen = {}
        with torch.no_grad(), hook_site(resolve_site(model, site), lambda t: seen.update(h=t)):
            model(input_ids=ids)
        return float(sae.encode_pre(get_hidden(seen["h"]).reshape(-1, 16))[:, 3].mean())

    def run(lam: float) -> float:
        model = tiny_gpt2(30, n_layer=2, n_embd=16, seed=0)
        torch.manual_seed(1)
        sae = SAE(SAEConfig(d_in=16, d_sae=32, k=2))
        before = feature_mean(model, sae)

        class T(SASFTTrainerMixin, transformers.Trainer):
            pass

        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"lam{lam}"),
            per_device_train_batch_size=8,
            max_steps=20,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            seed=0,
        )
        reg = SASFTRegularizer(model, sae, site, [3], ref=before - 5.0, lam=lam)
        T(model=model, args=args, train_dataset=data, sasft=reg).train()
        reg.detach()
        return feature_mean(model, sae) - before

    plain, penalised = run(0.0), run(10.0)
    assert penalised < plain - 0.5
