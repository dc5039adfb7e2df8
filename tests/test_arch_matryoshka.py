"""Matryoshka SAEs: nested prefixes, prefix-sum loss, every rule, sampling, eval, export."""

from __future__ import annotations

import pytest
import torch

from peer_helpers import needs_peers, run_peers
from saekit import SAE, SAEConfig
from saekit.arch.matryoshka import pareto_widths, prefix_reconstructions, resolve_widths
from saekit.errors import ConfigError
from saekit.losses import recon_loss
from saekit.rules import get_rule_class, rule_names

WIDTHS = [4, 16, 64]


def make(rule: str = "topk", **arch_options) -> SAE:
    torch.manual_seed(0)
    opts = {"widths": WIDTHS, **arch_options}
    return SAE(SAEConfig(d_in=8, d_sae=64, k=4, rule=rule, arch=["matryoshka"], arch_options=opts))


def naive_prefix(sae: SAE, codes: torch.Tensor, m: int) -> torch.Tensor:
    """b_dec + f[:, :m] W_dec[:m], from the dense codes."""
    return sae.b_dec + codes[:, :m] @ sae.W_dec[:m]


def rule_inputs(rule: str, x: torch.Tensor) -> dict:
    return {"grad": torch.randn_like(x)} if "grad" in get_rule_class(rule).requires else {}


@pytest.mark.parametrize("rule", ["topk", "batchtopk", "relu", "abstopk", "feature_choice"])
def test_prefix_decodes_to_the_nested_reconstruction(rule: str) -> None:
    sae = make(rule)
    x = torch.randn(40, 8)
    sae.init_from_data(x)
    sae.train()
    with torch.no_grad():
        out = sae(x)
        dense = out.codes.to_dense()
        preds = prefix_reconstructions(sae, out.codes, WIDTHS, sae.b_dec.expand(40, 8))
    for m, p in zip(WIDTHS, preds):
        torch.testing.assert_close(p, naive_prefix(sae, dense, m), rtol=1e-5, atol=1e-5)
    # nested: the last prefix is the SAE's reconstruction; each adds only its own block
    torch.testing.assert_close(preds[-1], out.x_hat_n, rtol=1e-5, atol=1e-5)
    block = preds[1] - preds[0]
    torch.testing.assert_close(block, dense[:, 4:16] @ sae.W_dec[4:16], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recon", ["nmse", "mse"])
def test_loss_is_the_sum_of_the_prefix_losses(recon: str) -> None:
    sae = make("batchtopk", weights=[0.5, 2.0, 1.0])
    sae = SAE(SAEConfig(**{**sae.cfg.__dict__, "recon_loss": recon}))
    x = torch.randn(64, 8)
    sae.init_from_data(x)
    sae.train()
    total, terms, out = sae.loss(x)
    dense = out.codes.to_dense()
    want = sum(
        w * recon_loss(recon, naive_prefix(sae, dense, m), out.x)
        for m, w in zip(WIDTHS, [0.5, 2.0, 1.0])
    )
    got = terms["recon"] + terms["recon_m4"] + terms["recon_m16"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, got + terms["aux"], rtol=1e-6, atol=1e-7)
    # the gradients are those of the prefix sum (checked against the dense reference)
    g_dec = torch.autograd.grad(got, sae.W_dec, retain_graph=True)[0]
    ref = torch.autograd.grad(want, sae.W_dec)[0]
    torch.testing.assert_close(g_dec, ref, rtol=1e-4, atol=1e-6)


def test_weighted_full_prefix_replaces_the_recon_term() -> None:
    sae = make("topk", weights=[1.0, 1.0, 3.0])
    x = torch.randn(32, 8)
    sae.init_from_data(x)
    _, terms, out = sae.loss(x)
    plain = recon_loss(sae.recon_kind, out.x_hat_n, out.x)
    torch.testing.assert_close(terms["recon"], 3 * plain)


@pytest.mark.parametrize("rule", rule_names())
def test_every_rule_trains_as_matryoshka(rule: str) -> None:
    sae = make(rule)
    x = torch.randn(64, 8)
    ins = rule_inputs(rule, x)
    sae.init_from_data(x)
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), 1e-3)
    for step in range(3):
        loss, terms, out = sae.loss(x, inputs=ins, step=step)
        assert torch.isfinite(loss) and {"recon", "recon_m4", "recon_m16"} <= set(terms)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sae.W_dec.grad is not None and sae.W_dec.grad[:4].abs().sum() > 0


def test_widths_are_checked_and_completed() -> None:
    assert resolve_widths([], 64) == [4, 16, 64]
    assert resolve_widths([8, 32], 64) == [8, 32, 64]
    for bad in ([16, 8], [0, 8], [8, 8], [128]):
        with pytest.raises(ConfigError, match="strictly increasing"):
            resolve_widths(bad, 64)
    with pytest.raises(ConfigError, match="one weight per prefix"):
        make(weights=[1.0])
    with pytest.raises(ConfigError, match="did you mean 'widths'"):
        SAEConfig(arch=["matryoshka"], arch_options={"width": [4]})
    with pytest.raises(ConfigError, match="not one of"):
        SAEConfig(arch=["matrioshka"])


def test_sampled_widths_follow_the_torch_seed_and_end_at_d_sae() -> None:
    torch.manual_seed(3)
    a = [pareto_widths(256, 3, 0.5, 2) for _ in range(20)]
    torch.manual_seed(3)
    b = [pareto_widths(256, 3, 0.5, 2) for _ in range(20)]
    assert a == b
    for w in a:
        assert w[-1] == 256 and len(w) == 4 and w == sorted(set(w)) and w[0] >= 2
    # the law favours small prefixes: P(one draw < 64) = (62/255)^0.5 = 0.49, so with 3
    # draws P(the smallest < 64) = 0.87 (without replacement, a little more)
    small = sum(w[0] < 64 for w in a)
    assert small >= 12
    sae = make("topk", sample=2)
    sae.train()
    x = torch.randn(16, 8)
    sae.init_from_data(x)
    _, terms, _ = sae.loss(x)
    assert len([t for t in terms if t.startswith("recon_m")]) == 2
    sae.eval()
    _, terms, _ = sae.loss(x)
    assert {t for t in terms if t.startswith("recon_m")} == {"recon_m4", "recon_m16"}


SYN = dict(n_features=64, d=16, n_roots=4, branching=2, depth=2, ortho_steps=5, block_size=256)


def test_trained_run_saves_loads_and_evaluates_every_prefix(tmp_path, capsys) -> None:
    from saekit import DataConfig, TrainConfig
    from saekit.evaluate.run import EvalConfig, evaluate_run
    from saekit.io import load_sae
    from saekit.io.native import read_run_config
    from saekit.sources.synthetic import SyntheticConfig, SyntheticSource
    from saekit.train import train

    src = SyntheticSource(SyntheticConfig.from_dict(dict(SYN)))
    cfg = SAEConfig(d_sae=64, k=4, rule="batchtopk", arch=["matryoshka"],
                    arch_options={"widths": [8, 32]})  # fmt: skip
    tc = TrainConfig(out_dir=str(tmp_path / "run"), total_tokens=8192, batch_size=256,
                     lr=3e-3, progress=False, checkpoint_every=0)  # fmt: skip
    dc = DataConfig(source="synthetic", synthetic=dict(SYN), sites=["synthetic"])
    res = train(cfg, tc, src, data_cfg=dc)
    run = res.run_dirs["synthetic"]
    assert "recon_m8" in res.metrics["synthetic"]  # the prefix terms are logged
    back = load_sae(run)
    assert back.cfg.arch == ["matryoshka"] and back.arch["matryoshka"].widths == [8, 32, 64]
    x = torch.randn(16, 16)
    torch.testing.assert_close(back(x).x_hat, res.sae.eval()(x).x_hat, rtol=0, atol=0)
    cfg_json = read_run_config(run)
    assert cfg_json["architecture"] == "jumprelu"  # BatchTopK's inference, as SAELens saves it
    assert cfg_json["matryoshka_widths"] == [8, 32, 64]
    assert cfg_json["metadata"]["saekit_arch"] == ["matryoshka"]
    r = evaluate_run(run, cfg=EvalConfig(tokens=2048, batch_size=512, pca_fit_tokens=512))
    m = r["sae"]["matryoshka"]
    assert m["widths"] == [8, 32, 64] and m["n_tokens"] == r["sae"]["core"]["n_tokens"]
    fves = [m["prefix_fve"][str(w)] for w in m["widths"]]
    assert fves[-1] == pytest.approx(r["sae"]["core"]["fve"], abs=1e-6)
    assert fves[0] < fves[-1]  # a smaller prefix explains less
    assert "matryoshka" not in r["baselines"]["random"]
    # `saekit eval` prints each prefix's FVE in its headline table
    from saekit.cli import main

    args = ["eval", str(run), "--tokens", "1024", "--baselines", "false", "--plots", "false"]
    assert main([*args, "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "| FVE of the prefix 8/64 |" in printed and "| FVE of the prefix 32/64 |" in printed


@needs_peers
def test_sae_lens_loads_matryoshka_files(tmp_path) -> None:
    from safetensors.torch import save_file

    from saekit.io import save_sae

    x = torch.randn(64, 8) * 2
    for rule in ("batchtopk", "topk"):
        sae = make(rule)
        sae.init_from_data(x)
        sae.train()
        opt = torch.optim.Adam(sae.parameters(), 1e-2)
        for s in range(3):
            loss, _, out = sae.loss(x, step=s)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sae.observe(out.codes, 64)
        sae.eval()
        save_sae(sae, tmp_path / rule, {"site": "layers.1.resid_post"})
        with torch.no_grad():
            ref = {"x": x, "x_hat": sae(x).x_hat.contiguous()}
        save_file(ref, str(tmp_path / rule / "expected.safetensors"))
    code = """
        import sys, warnings
        warnings.filterwarnings("ignore")
        import torch
        from safetensors.torch import load_file
        from sae_lens import SAE
        for rule in ("batchtopk", "topk"):
            d = f"{sys.argv[1]}/{rule}"
            sae = SAE.load_from_disk(d)
            e = load_file(d + "/expected.safetensors")
            with torch.no_grad():
                err = float((sae(e["x"]) - e["x_hat"]).abs().max())
            print(rule, type(sae).__name__, err)
    """
    lines = [ln.split() for ln in run_peers(code, str(tmp_path)).splitlines() if ln.strip()]
    got = {ln[0]: (ln[1], float(ln[2])) for ln in lines}
    assert got["batchtopk"][0] == "JumpReLUSAE" and got["topk"][0] == "TopKSAE"
    assert all(err < 1e-4 for _, err in got.values()), got


def test_bench_has_a_matryoshka_row_with_absorption(tmp_path, monkeypatch) -> None:
    import saekit.bench as bench

    base = bench.base_sae_config(bench.SIZES["tiny"], 3)
    v = bench.variants(["batchtopk"], base, arch_variants=["batchtopk+matryoshka"])
    assert v["batchtopk+arch_matryoshka"].arch == ["matryoshka"] and v["batchtopk"].arch == []
    assert "topk+arch_matryoshka" not in bench.variants(
        ["relu"], base, (), None, ["topk+matryoshka"]
    )
    with pytest.raises(ConfigError, match="RULE\\+PART"):
        bench.variants(["topk"], base, arch_variants=["matryoshka"])
    tiny = bench.BenchSize(32, 16, 4096, 256, 1024, 2048, block_size=1024)
    monkeypatch.setitem(bench.SIZES, "tiny", tiny)
    cfg = bench.BenchConfig(size="tiny", seeds=[0], rules=["batchtopk"], aux_variants=[],
                            signed=False, out=str(tmp_path / "b"))  # fmt: skip
    report = bench.run_bench(cfg, log=lambda _m: None)
    rows = report["table"]
    assert set(rows) == {"batchtopk", "batchtopk+arch_matryoshka"}
    for r in rows.values():
        assert 0 <= r["absorption"]["mean"] <= 1
    assert "absorb" in bench.format_table(rows)
