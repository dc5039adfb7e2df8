"""Crosscoders: one encoder over several sites, a decoder into each, every rule, the
paper's norm-weighted penalty, planning from the run's sites, per-site FVE in eval."""

from __future__ import annotations

import pytest
import torch

from saekit import SAE, DataConfig, SAEConfig, TrainConfig
from saekit.errors import ConfigError
from saekit.rules import get_rule_class, rule_names
from saekit.sources.base import MemorySource
from saekit.train import train

SITES = ["a", "b"]


def make(rule: str = "topk", widths: list[int] | None = None, **kw) -> SAE:
    torch.manual_seed(0)
    w = widths or [8, 8]
    opts = {"sites": SITES[: len(w)], **({"site_widths": w} if widths else {})}
    return SAE(
        SAEConfig(
            d_in=sum(w), d_sae=64, k=4, rule=rule, arch=["crosscoder"], arch_options=opts, **kw
        )
    )


def two_layers(n: int = 4096, seed: int = 0) -> dict[str, torch.Tensor]:
    """Site b is a fixed linear map of site a's sparse features, plus noise: shared
    features with a different direction in each layer."""
    g = torch.Generator().manual_seed(seed)
    F, d = 32, 8
    D_a = torch.randn(F, d, generator=g)
    D_b = torch.randn(F, d, generator=g)
    f = (torch.rand(n, F, generator=g) < 0.08) * torch.rand(n, F, generator=g) * 3
    noise = 0.01 * torch.randn(n, 2 * d, generator=g)
    return {"a": f @ D_a + noise[:, :d], "b": f @ D_b + noise[:, d:]}


def test_decodes_into_each_site() -> None:
    sae = make("topk", [8, 12])
    x = torch.randn(16, 20)
    out = sae(x)
    f = out.codes.to_dense()
    part = sae.arch["crosscoder"]
    Wa, Wb = part.blocks(sae.W_dec)
    assert Wa.shape == (64, 8) and Wb.shape == (64, 12)
    xa, xb = part.blocks(out.x_hat)
    ba, bb = part.blocks(sae.b_dec)
    s = sae.input_scale
    torch.testing.assert_close(xa, (f @ Wa + ba) / s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xb, (f @ Wb + bb) / s, rtol=1e-5, atol=1e-5)
    # one encoder reads every site: each site's input moves the codes
    pre = sae.encode_pre(x)
    for lo, hi in ((0, 8), (8, 20)):
        y = x.clone()
        y[:, lo:hi] += 1.0
        assert (sae.encode_pre(y) - pre).abs().max() > 1e-3


def test_the_penalty_weights_by_the_summed_decoder_norms() -> None:
    sae = make("relu", [8, 12], normalize_input=False)
    x = torch.randn(32, 20)
    _, terms, out = sae.loss(x)
    Wa, Wb = sae.W_dec[:, :8], sae.W_dec[:, 8:]
    w = Wa.norm(dim=1) + Wb.norm(dim=1)  # Lindsey et al.: sum over layers of ||W_dec^l_i||
    want = sae.rule.opts.l1_coeff * (out.codes.to_dense() * w).sum(-1).mean()
    torch.testing.assert_close(terms["l1"], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w, sae.W_dec.norm(dim=1))  # not the plain row norm


@pytest.mark.parametrize("rule", rule_names())
def test_every_rule_trains_as_a_crosscoder(rule: str) -> None:
    sae = make(rule)
    x = torch.randn(64, 16)
    ins = {"grad": torch.randn_like(x)} if "grad" in get_rule_class(rule).requires else {}
    sae.init_from_data(x)
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), 1e-3)
    for step in range(3):
        loss, _, _ = sae.loss(x, inputs=ins, step=step)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_options_and_widths_are_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="sites"):
        SAEConfig(arch=["crosscoder"])  # no sites
    with pytest.raises(ConfigError, match="site_widths"):
        SAE(SAEConfig(d_in=15, arch=["crosscoder"], arch_options={"sites": SITES}))
    acts = {"a": torch.randn(256, 8), "b": torch.randn(256, 12)}
    cfg = SAEConfig(d_sae=32, k=4, arch=["crosscoder"], arch_options={"sites": SITES})
    tc = TrainConfig(out_dir=str(tmp_path / "r"), total_tokens=256, batch_size=64,
                     progress=False, checkpoint_every=0)  # fmt: skip
    with pytest.raises(ConfigError, match=r"set arch_options.site_widths to \[8, 12\]"):
        train(cfg, tc, MemorySource(acts))
    bad = SAEConfig(d_sae=32, k=4, arch=["crosscoder"], arch_options={"sites": ["a", "c"]})
    with pytest.raises(ConfigError, match="does not produce"):
        train(bad, tc, MemorySource(acts))


def test_trained_crosscoder_reconstructs_each_site_and_eval_reports_it(tmp_path) -> None:
    from saekit.evaluate.run import EvalConfig, evaluate_run
    from saekit.io import load_sae
    from saekit.sources import build_source
    from saekit.sources.cache import write_cache

    acts = two_layers()
    acts["c"] = torch.randn(4096, 4)  # a third site: no SAE is planned there
    cache = write_cache(MemorySource(acts, shuffle=False), tmp_path / "cache", 4096)
    dc = DataConfig(source="cache", cache_dir=str(cache), sites=["a", "b", "c"])
    cfg = SAEConfig(d_sae=64, k=4, rule="topk", arch=["crosscoder"],
                    arch_options={"sites": SITES})  # fmt: skip
    tc = TrainConfig(out_dir=str(tmp_path / "run"), total_tokens=4096 * 3, batch_size=256,
                     lr=3e-3, progress=False, checkpoint_every=0)  # fmt: skip
    with pytest.warns(UserWarning, match="no crosscoder class"):
        res = train(cfg, tc, build_source(dc), data_cfg=dc)
    assert list(res.run_dirs) == ["a"] and res.sae.d_in == 16
    run = res.run_dirs["a"]
    back = load_sae(run)
    x = torch.cat([acts["a"][:64], acts["b"][:64]], -1)
    torch.testing.assert_close(back(x).x_hat, res.sae.eval()(x).x_hat, rtol=0, atol=0)
    r = evaluate_run(run, cfg=EvalConfig(tokens=2048, batch_size=512, pca_fit_tokens=512))
    c = r["sae"]["crosscoder"]
    assert c["sites"] == SITES and c["widths"] == [8, 8]
    assert all(v > 0.5 for v in c["site_fve"].values())  # shared features rebuild each
    from saekit.evaluate.report import headline_table

    assert "| FVE at site a |" in headline_table(r) and "| FVE at site b |" in headline_table(r)
    # the accumulator's per-site FVE, against a hand computation on known tokens
    acc = back.arch.eval_accumulators(back)["crosscoder"]
    xs = torch.cat([acts["a"][:1024], acts["b"][:1024]], -1)
    with torch.no_grad():
        for chunk in xs.split(300):
            acc.update(back, chunk, chunk, back(chunk))
        xh = back(xs).x_hat.double()
    got = acc.result()
    assert got["n_tokens"] == 1024
    for i, s in enumerate(SITES):
        y, p = xs[:, 8 * i : 8 * i + 8].double(), xh[:, 8 * i : 8 * i + 8]
        fve = 1 - float((y - p).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        assert got["site_fve"][s] == pytest.approx(fve, abs=1e-6)
