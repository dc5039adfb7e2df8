"""vSAE (vtopk)."""

import json
import math
from pathlib import Path

import pytest
import torch

from rule_helpers import dense_codes, make

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.filterwarnings("ignore:vtopk sample=true")


def test_vtopk_sampling_train_only() -> None:
    sae = make("vtopk", k=4, rule_options={"sample": True})
    x = torch.randn(20, 12)
    sae.train()
    a, b = dense_codes(sae, x), dense_codes(sae, x)
    assert not torch.equal(a, b)
    assert (a < 0).any()  # sampled codes can be negative
    sae.eval()
    c, d = dense_codes(sae, x), dense_codes(sae, x)
    assert torch.equal(c, d)
    pre = sae.encode_pre(x).detach()
    topk = torch.relu(pre).topk(4, dim=1)
    ref = torch.zeros_like(pre).scatter(1, topk.indices, topk.values)
    assert torch.allclose(c, ref)


def test_vtopk_kl_term_and_warmup() -> None:
    sae = make("vtopk", k=4, rule_options={"kl_coeff": 0.5, "kl_warmup_steps": 10})
    sae.train()
    x = torch.randn(20, 12)
    _, terms, out = sae.loss(x, step=9)
    mu = torch.relu(out.pre).clamp(max=10)
    assert torch.allclose(terms["kl"], 0.5 * 0.5 * mu.pow(2).sum(-1).mean())
    _, terms2, _ = sae.loss(x, step=4)
    assert torch.allclose(terms2["kl"], terms["kl"] * 0.5)
    assert not sae.rule.signed
    # the KL reaches latents outside the top-k: W_enc gets gradient on unselected columns
    sae.zero_grad()
    terms["kl"].backward()
    sel = out.codes.fired()
    assert sae.W_enc.grad[:, ~sel].abs().sum() > 0


def test_vtopk_learned_variance() -> None:
    sae = make("vtopk", k=4, rule_options={"sample": True, "learn_variance": True})
    x = torch.randn(20, 12)
    lv = sae.rule.log_var(x)
    assert torch.allclose(lv, torch.full_like(lv, -2.0))
    _, terms, out = sae.loss(x)
    mu = torch.relu(out.pre)
    expect = 0.5 * (mu.pow(2) + math.exp(-2) - 1 + 2).sum(-1).mean()
    assert torch.allclose(terms["kl"], expect, rtol=1e-5)
    assert "rule.W_var" in sae.state_dict()


def test_sampling_warns() -> None:
    """Issue 10, fidelity 6: the README's sample=true example trained a useless SAE silently."""
    with pytest.warns(UserWarning, match="sample=true"):
        make("vtopk", rule_options={"sample": True, "kl_warmup_steps": 20})


def _syn_train(tmp_path: Path, cfg, tokens: int = 40_960):
    from saekit import TrainConfig
    from saekit.sources.synthetic import SyntheticConfig, SyntheticSource
    from saekit.train import train

    syn = SyntheticConfig(n_features=128, d=32, n_roots=2)
    tc = TrainConfig(
        out_dir=str(tmp_path), total_tokens=tokens, batch_size=512, progress=False, log_every=8
    )
    res = train(cfg, tc, SyntheticSource(syn))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return res, rows


def test_a_run_that_gets_worse_warns(tmp_path: Path) -> None:
    from saekit import SAEConfig

    opts = {"sample": True, "kl_warmup_steps": 20}  # the README's old example
    cfg = SAEConfig(rule="vtopk", k=4, d_sae=128, aux="none", rule_options=opts)
    with pytest.warns(UserWarning, match="training FVE fell"):
        _, rows = _syn_train(tmp_path, cfg)
    assert rows[-1]["fve"] < rows[0]["fve"] - 0.05


def test_authors_preset_is_their_code_and_trains(tmp_path: Path) -> None:
    from saekit.run_config import load_run_config

    rc = load_run_config(EXAMPLES / "vsae_authors.json", overrides={"sae": {"k": 4, "d_sae": 128}})
    sae_cfg = rc.sae
    assert sae_cfg.rule == "vtopk" and sae_cfg.aux == "none"
    assert not sae_cfg.apply_b_dec_to_input and not sae_cfg.unit_norm_decoder
    assert sae_cfg.init_b_dec == "zeros" and rc.train.lr == pytest.approx(8e-4)
    assert sae_cfg.rule_options == {"sample": False, "learn_variance": False, "kl_coeff": 1.0}
    res, rows = _syn_train(tmp_path, sae_cfg)
    assert rows[-1]["fve"] > rows[0]["fve"] + 0.1 and rows[-1]["fve"] > 0.3
    assert torch.count_nonzero(res.sae.b_dec) > 0  # learned from 0
    norms = res.sae.W_dec.detach().norm(dim=1)
    assert float(norms.std()) > 1e-3  # free decoder norms


def test_sampled_aux_uses_the_sampled_latents() -> None:
    from saekit.losses.aux import aux_k_loss

    torch.manual_seed(0)
    x_in, W_enc, b_enc = torch.randn(8, 6), torch.randn(6, 10), torch.zeros(10)
    W_dec = torch.randn(10, 6)
    pre = x_in @ W_enc + b_enc
    z = (torch.relu(pre) + torch.randn(8, 10)).requires_grad_()
    cand = torch.zeros(10, dtype=torch.bool)
    cand[[1, 4, 7]] = True
    residual = torch.randn(8, 6)
    got = aux_k_loss(x_in, W_enc, b_enc, W_dec, pre, residual, cand, 2, signed=True, latents=z)
    zz = torch.where(cand, z.detach().abs(), torch.tensor(-1.0))
    idx = zz.topk(2, dim=1).indices
    vals = torch.zeros(8, 10).scatter(1, idx, z.detach().gather(1, idx))
    e = vals @ W_dec
    expect = (e - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    torch.testing.assert_close(got.detach(), expect)
    got.backward()
    assert z.grad is not None and z.grad[:, [0, 2, 3, 5, 6, 8, 9]].abs().sum() == 0
    sae = make("vtopk", k=4, rule_options={"sample": True})
    sae.train()
    out = sae(torch.randn(5, 12))
    assert sae.rule.aux_latents(out) is out.extras["z"]
    assert make("vtopk", k=4).rule.aux_latents(out) is None
