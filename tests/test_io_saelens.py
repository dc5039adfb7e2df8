"""Interop with the real SAELens, run in the peers venv (benchmarks/.peers) when it exists."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from peer_helpers import needs_peers, run_peers
from saekit import SAE, SAEConfig
from saekit.io import load_sae, save_sae

pytestmark = needs_peers
RULES = ["topk", "batchtopk", "jumprelu", "relu", "abstopk"]


def test_sae_lens_loads_saekit_dirs(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    x = torch.randn(64, 16) * 2
    for rule in RULES:
        sae = SAE(SAEConfig(d_in=16, d_sae=64, rule=rule, k=5, normalize_input=True))
        sae.train()
        sae.init_from_data(x)
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
        for rule in sys.argv[2:]:
            d = f"{sys.argv[1]}/{rule}"
            sae = SAE.load_from_disk(d)
            e = load_file(d + "/expected.safetensors")
            with torch.no_grad():
                err = float((sae(e["x"]) - e["x_hat"]).abs().max())
            print(rule, type(sae).__name__, err)
    """
    lines = run_peers(code, str(tmp_path), *RULES).split("\n")
    got = {ln.split()[0]: (ln.split()[1], float(ln.split()[2])) for ln in lines if ln.strip()}
    assert got["topk"][0] == "TopKSAE" and got["relu"][0] == "StandardSAE"
    assert got["jumprelu"][0] == got["batchtopk"][0] == "JumpReLUSAE"
    assert got["abstopk"][0] == "AbsTopKSAE"  # signed codes, exact in SAELens too
    assert all(err < 1e-4 for _, err in got.values()), got


def test_saekit_loads_sae_lens_dirs(tmp_path: Path) -> None:
    code = """
        import sys, warnings
        warnings.filterwarnings("ignore")
        import torch
        from safetensors.torch import save_file
        from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
        from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
        from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
        torch.manual_seed(0)
        x = torch.randn(32, 16)
        saes = [
            ("topk", TopKSAE(TopKSAEConfig(d_in=16, d_sae=48, k=4))),
            ("jumprelu", JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=48))),
            ("relu", StandardSAE(StandardSAEConfig(d_in=16, d_sae=48))),
        ]
        for name, sae in saes:
            with torch.no_grad():
                for p in sae.parameters():
                    p.copy_(torch.randn_like(p) * 0.3)
                if name == "jumprelu":
                    sae.threshold.copy_(torch.rand(48) * 0.3)
                y = sae(x).contiguous()
            sae.save_model(f"{sys.argv[1]}/{name}")
            save_file({"x": x, "x_hat": y}, f"{sys.argv[1]}/{name}/expected.safetensors")
    """
    run_peers(code, str(tmp_path))
    for rule in ("topk", "jumprelu", "relu"):
        sae = load_sae(tmp_path / rule)
        e = load_file(str(tmp_path / rule / "expected.safetensors"))
        assert sae.cfg.rule == rule
        with torch.no_grad():
            torch.testing.assert_close(sae(e["x"]).x_hat, e["x_hat"], rtol=1e-5, atol=1e-5)
    assert load_sae(tmp_path / "topk").cfg.k == 4
