"""Gated SAEs: shared directions, the gate's L1 and frozen-decoder aux loss, every rule,
save/load, SAELens export (loaded by the real SAELens in the peers venv)."""

from __future__ import annotations

import pytest
import torch

from peer_helpers import needs_peers, run_peers
from saekit import SAE, SAEConfig
from saekit.errors import FormatError
from saekit.io import load_sae, save_sae
from saekit.io.saelens import saelens_export
from saekit.losses import recon_loss
from saekit.rules import get_rule_class, rule_names


def make(rule: str = "relu", d_sae: int = 48, normalize: bool = True, **arch_options) -> SAE:
    torch.manual_seed(0)
    cfg = SAEConfig(
        d_in=8,
        d_sae=d_sae,
        k=4,
        rule=rule,
        normalize_input=normalize,
        arch=["gated"],
        arch_options=arch_options,
    )
    sae = SAE(cfg)
    with torch.no_grad():  # away from the zero init, so that the two paths differ
        sae.arch["gated"].r_mag.copy_(torch.randn(d_sae) * 0.5)
        sae.arch["gated"].b_mag.copy_(torch.randn(d_sae) * 0.3)
        sae.b_enc.copy_(torch.randn(d_sae) * 0.3)
    return sae


def naive(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's equations, dense (x in SAE units, no input scaling)."""
    g = sae.arch["gated"]
    xc = x - sae.b_dec
    pi_gate = xc @ sae.W_enc + sae.b_enc
    pi_mag = xc @ (sae.W_enc * g.r_mag.exp()) + g.b_mag
    f = (pi_gate > 0).float() * torch.relu(pi_mag)
    return {"pi_gate": pi_gate, "f": f, "x_hat": f @ sae.W_dec + sae.b_dec}


def test_gate_and_magnitude_share_directions() -> None:
    sae = make("relu", normalize=False)
    x = torch.randn(32, 8)
    ref = naive(sae, x)
    out = sae(x)
    torch.testing.assert_close(out.codes.to_dense(), ref["f"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.x_hat, ref["x_hat"], rtol=1e-5, atol=1e-5)
    # the magnitude path is W_enc scaled per latent, no matrix of its own
    assert {n for n, _ in sae.named_parameters() if n.startswith("arch.")} == {
        "arch.gated.r_mag",
        "arch.gated.b_mag",
    }
    # the reconstruction trains W_enc only through the magnitude path (the gate's step
    # passes no gradient): b_gate gets none from it, W_enc gets exp(r_mag)-scaled gradients
    recon = (out.x_hat - x).pow(2).sum()
    g_enc, g_gate = torch.autograd.grad(recon, [sae.W_enc, sae.b_enc])
    assert float(g_gate.abs().max()) == 0.0
    W_mag = (sae.W_enc * sae.arch["gated"].r_mag.exp()).detach().requires_grad_(True)
    g = sae.arch["gated"]
    xc = x - sae.b_dec.detach()
    f = (ref["pi_gate"] > 0).float().detach() * torch.relu(xc @ W_mag + g.b_mag.detach())
    err = f @ sae.W_dec.detach() + sae.b_dec.detach() - x
    g_mag = torch.autograd.grad(err.pow(2).sum(), W_mag)[0]
    torch.testing.assert_close(g_enc, g_mag * g.r_mag.exp().detach(), rtol=1e-4, atol=1e-5)


def test_l1_on_the_gate_and_aux_through_a_frozen_decoder() -> None:
    sae = make("relu", normalize=False, aux_coeff=0.7)
    x = torch.randn(32, 8)
    _, terms, out = sae.loss(x)
    ref = naive(sae, x)
    gate = torch.relu(ref["pi_gate"])
    l1 = sae.rule.opts.l1_coeff * (gate * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(terms["l1"], l1, rtol=1e-5, atol=1e-6)
    aux = 0.7 * recon_loss(sae.recon_kind, gate @ sae.W_dec + sae.b_dec, x)
    torch.testing.assert_close(terms["gate_recon"], aux, rtol=1e-5, atol=1e-6)
    # frozen decoder: the aux term trains the gate (W_enc, b_gate), never W_dec (b_dec
    # only through the encoder's input x - b_dec)
    wrt = [sae.W_dec, sae.b_enc]
    g = torch.autograd.grad(terms["gate_recon"], wrt, allow_unused=True, retain_graph=True)
    assert g[0] is None and float(g[1].abs().sum()) > 0
    # frozen=false: SAELens's variant, where the decoder gets the aux gradient too
    loose = make("relu", frozen=False)
    _, t2, _ = loose.loss(x)
    assert torch.autograd.grad(t2["gate_recon"], loose.W_dec)[0].abs().sum() > 0


def rule_inputs(rule: str, x: torch.Tensor) -> dict:
    return {"grad": torch.randn_like(x)} if "grad" in get_rule_class(rule).requires else {}


@pytest.mark.parametrize("rule", rule_names())
def test_every_rule_gates(rule: str) -> None:
    sae = make(rule, d_sae=64)
    x = torch.randn(64, 8)
    ins = rule_inputs(rule, x)
    sae.init_from_data(x)
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), 1e-3)
    for step in range(3):
        loss, terms, out = sae.loss(x, inputs=ins, step=step)
        assert torch.isfinite(loss) and "gate_recon" in terms
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sae.arch["gated"].r_mag.grad is not None
    # the codes are the magnitudes where the gate (the rule's selection) fires
    sae.eval()
    with torch.no_grad():
        out = sae(x, inputs=ins)
        gate = out.extras["gate_codes"].to_dense()
        mag = sae.arch["gated"].magnitude(sae, sae.encode_pre(x))
        mag = mag if sae.rule.signed else torch.relu(mag)
        want = torch.where(gate != 0, mag, torch.zeros_like(mag))
    torch.testing.assert_close(out.codes.to_dense(), want, rtol=1e-5, atol=1e-5)


def trained(rule: str, normalize: bool = True) -> tuple[SAE, torch.Tensor]:
    sae = make(rule, d_sae=48, normalize=normalize)
    x = torch.randn(64, 8) * 3 + 1
    sae.init_from_data(x)
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), 1e-2)
    for s in range(5):
        loss, _, out = sae.loss(x, step=s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.observe(out.codes, 64)
    return sae.eval(), x


@pytest.mark.parametrize("normalize", [True, False])
def test_native_round_trip_is_exact(tmp_path, normalize: bool) -> None:
    sae, x = trained("relu", normalize)
    save_sae(sae, tmp_path / "g", {"site": "layers.1.resid_post"})
    back = load_sae(tmp_path / "g")
    assert back.cfg.arch == ["gated"]
    with torch.no_grad():
        torch.testing.assert_close(back(x).x_hat, sae(x).x_hat, rtol=0, atol=0)


def test_saelens_export_is_gated_or_refused() -> None:
    sae, _ = trained("relu")
    cfg, w = saelens_export(sae)
    assert cfg["architecture"] == "gated" and "b_enc" not in w
    assert {"b_gate", "b_mag", "r_mag", "W_enc", "W_dec", "b_dec"} <= set(w)
    sae, _ = trained("jumprelu")
    cfg, w = saelens_export(sae)
    assert cfg["architecture"] == "gated" and "threshold" not in w
    with pytest.raises(FormatError, match="no SAELens equivalent"):
        saelens_export(trained("topk")[0])


@needs_peers
def test_sae_lens_loads_gated_files(tmp_path) -> None:
    from safetensors.torch import save_file

    rules = ["relu", "jumprelu"]
    for rule in rules:
        sae, x = trained(rule)
        save_sae(sae, tmp_path / rule, {"site": "layers.1.resid_post"})
        with torch.no_grad():
            out = sae(x)
            ref = {"x": x, "codes": out.codes.to_dense().contiguous(), "x_hat": out.x_hat}
        save_file(ref, str(tmp_path / rule / "expected.safetensors"))
    code = """
        import sys, warnings
        warnings.filterwarnings("ignore")
        import torch
        from safetensors.torch import load_file
        from sae_lens import SAE
        for rule in sys.argv[2:]:
            d = f"{sys.argv[1]}/{rule}"
            sae = SAE.load_from_disk(d)
            e = load_file(d + "/expected.safetensors")
            with torch.no_grad():
                f = sae.encode(e["x"])
                codes = float((f - e["codes"]).abs().max())
                recon = float((sae.decode(f) - e["x_hat"]).abs().max())
            print(rule, type(sae).__name__, codes, recon, int((e["codes"] != 0).sum()))
    """
    lines = [ln.split() for ln in run_peers(code, str(tmp_path), *rules).splitlines() if ln]
    got = {ln[0]: ln[1:] for ln in lines}
    for rule in rules:
        cls, codes, recon, active = got[rule]
        assert cls == "GatedSAE" and int(active) > 0, got
        assert float(codes) < 1e-5 and float(recon) < 1e-4, got


def test_parts_of_different_stages_combine() -> None:
    """A gated Matryoshka crosscoder: the prefix losses decode the magnitudes, the gate's
    aux loss and L1 use the crosscoder's summed decoder norms; the export stays gated."""
    from saekit.arch.matryoshka import prefix_reconstructions

    torch.manual_seed(0)
    opts = {"widths": [8, 32], "sites": ["a", "b"]}
    cfg = SAEConfig(d_in=16, d_sae=64, rule="relu", arch=["matryoshka", "gated", "crosscoder"],
                    arch_options=opts, normalize_input=False)  # fmt: skip
    sae = SAE(cfg)
    assert [p.stage for p in sae.arch.all] == ["objective", "encoder", "wiring"]
    x = torch.randn(32, 16)
    _, terms, out = sae.loss(x)
    assert {"recon", "recon_m8", "recon_m32", "l1", "gate_recon"} <= set(terms)
    f = out.codes.to_dense()
    pre8 = prefix_reconstructions(sae, out.codes, [8], sae.b_dec.expand(32, 16))[0]
    torch.testing.assert_close(pre8, f[:, :8] @ sae.W_dec[:8] + sae.b_dec, rtol=1e-5, atol=1e-5)
    gate = torch.relu(sae.encode_pre(x))
    w = sae.W_dec[:, :8].norm(dim=1) + sae.W_dec[:, 8:].norm(dim=1)
    l1 = sae.rule.opts.l1_coeff * (gate * w).sum(-1).mean()
    torch.testing.assert_close(terms["l1"], l1, rtol=1e-5, atol=1e-6)
    with pytest.raises(FormatError, match="crosscoder"):
        saelens_export(sae)
    plain = SAE(SAEConfig(d_in=8, d_sae=32, rule="relu", arch=["matryoshka", "gated"]))
    cfg_json, _ = saelens_export(plain)
    assert cfg_json["architecture"] == "gated" and cfg_json["matryoshka_widths"] == [2, 8, 32]
