"""top-AFA."""

import math

import pytest
import torch

from rule_helpers import make
from saekit.rules.topafa import afa_k


def test_topafa_hand_example() -> None:
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    opts = {"normalize": "none"}  # raw norms: the hand values below
    sae = make("topafa", d_in=6, d_sae=6, k=1, init_b_dec="zeros", rule_options=opts)
    with torch.no_grad():
        sae.W_dec.copy_(q)  # orthonormal atoms (rows)
        sae.W_enc.copy_(q.t())
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    coeffs = torch.tensor(
        [
            [3.0, 0, 0, 0, 0, 0],  # one atom carries the whole norm: k* = 1
            [1.0, 1, 1, 1, 0, 0],  # ||x|| = 2 = sqrt(4 * 1): k* = 4
            [2.0, 1, -2, 0, 0, 0],  # ||x|| = 3; c = (2, 2.24, 2.24, ...): k* = 2
        ]
    )
    x = coeffs @ q
    out = sae(x)
    assert out.extras["k_per_token"].tolist() == [1, 4, 2]
    assert out.codes.l0().tolist() == [1, 4, 2]
    assert torch.allclose(out.codes.to_dense()[:2], coeffs[:2], atol=1e-5)


def test_topafa_naive_reference_and_loss() -> None:
    sae = make("topafa", d_sae=24)
    x = torch.randn(16, 12) * 2
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(24, 1) + 0.5)  # decoder norms matter in s_i
    out = sae(x)
    pre = out.pre.detach()
    a = torch.relu(pre)
    dn = sae.W_dec.detach().norm(dim=1)
    xc = out.x_in.detach().norm(dim=1)
    ks = []
    for b in range(16):
        s = sorted(((float(a[b, i] * dn[i]) ** 2) for i in range(24)), reverse=True)
        c, best, kb = 0.0, math.inf, 0
        for j, v in enumerate(s):
            c += v
            cj = 1e4 if j == len(s) - 1 else math.sqrt(c)
            if abs(cj - float(xc[b])) < best:
                best, kb = abs(cj - float(xc[b])), j + 1
        ks.append(kb)
    assert out.extras["k_per_token"].tolist() == ks
    assert len(set(ks)) > 1
    k, _ = afa_k(a, dn, xc, k_max=3)
    assert int(k.max()) <= 3
    _, terms, out = sae.loss(x)
    f = out.codes.to_dense() * sae.W_dec.norm(dim=1)
    xs = out.x
    var = (xs - xs.mean(0)).pow(2).mean()
    expect = (1 / 32) * (f.norm(dim=1) - xs.norm(dim=1)).pow(2).mean() / var
    assert torch.allclose(terms["afa"], expect, rtol=1e-5)


@pytest.mark.parametrize("m_hint", [1, 3, 17, 0])
def test_topafa_prefix_search_equals_full_sort(m_hint):
    """afa_k's sorted-prefix search gives the full sort's k* for any starting prefix."""
    g = torch.Generator().manual_seed(3)
    a = torch.relu(torch.randn(64, 50, generator=g))
    dec_norm = torch.rand(50, generator=g) + 0.5
    target = torch.rand(64, generator=g) * 6  # some tokens need many latents, some few
    k_full, order_full = afa_k(a, dec_norm, target, 0, 0)
    k, order = afa_k(a, dec_norm, target, 0, m_hint)
    assert torch.equal(k, k_full)
    assert k.float().std() > 0
    km = int(k.max())
    s = (a * dec_norm).pow(2)
    # the selected sets agree (orders may differ only among equal scores)
    assert torch.equal(s.gather(1, order[:, :km]), s.gather(1, order_full[:, :km]))


def test_topafa_k_max_is_reachable() -> None:
    """Issue 10, fidelity 3: k_max=8 capped k at 7 (the 1e8 guard sat on the cap)."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(32, 40, generator=g)
    dec_norm = torch.ones(40)
    target = torch.full((32,), 100.0)  # far beyond any prefix: every token wants the cap
    k, order = afa_k(a, dec_norm, target, k_max=8)
    assert k.tolist() == [8] * 32 and order.shape[1] >= 8
    k_all, _ = afa_k(a, dec_norm, target)  # no cap: the authors' guard keeps k < width
    assert int(k_all.max()) == 39
    sae = make("topafa", d_sae=24, rule_options={"k_max": 8, "normalize": "none"})
    with torch.no_grad():
        out = sae(torch.randn(16, 12) * 50)
    assert int(out.extras["k_per_token"].max()) == 8


def test_topafa_standardises_every_token_by_default() -> None:
    sae = make("topafa", d_sae=24)
    assert sae.rule.opts.normalize == "token" and sae.rule.input_norm == "token"
    x = torch.randn(16, 12)
    scale = torch.rand(16, 1) * 5 + 0.5
    with torch.no_grad():
        out = sae(x)
        moved = sae(x * scale + 3.0)  # another affine map per token: the same codes
    assert torch.allclose(out.codes.to_dense(), moved.codes.to_dense(), atol=1e-4)
    # ||x|| is the same for every token in the AFA bound and loss
    norms = out.x.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 11**0.5), rtol=1e-4, atol=1e-4)
    # the reconstruction is mapped back with each token's mean and std
    mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True)
    torch.testing.assert_close(out.x_hat, out.x_hat_n * sd + mu)
    torch.testing.assert_close(sae.decode(out.codes, like=x), out.x_hat)
    with pytest.raises(ValueError, match="like=x"):
        sae.decode(out.codes)
    with pytest.raises(ValueError, match="normalize"):
        make("topafa", rule_options={"normalize": "layer"})


def test_topafa_refuses_the_saelens_export(tmp_path) -> None:
    """Issue 10, fidelity 3: it was exported as plain TopK with k=cfg.k (other codes)."""
    import json

    from saekit.errors import FormatError
    from saekit.io import load_sae, save_sae
    from saekit.io.saelens import saelens_export

    sae = make("topafa", d_sae=24)
    with pytest.raises(FormatError, match="SAELens has no such architecture"):
        saelens_export(sae)
    with pytest.warns(UserWarning, match="not loadable by SAELens"):
        save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "saekit.topafa" and "k" not in cfg
    assert cfg["saekit"]["saelens_export"].startswith("refused")
    x = torch.randn(8, 12)
    with torch.no_grad():
        torch.testing.assert_close(load_sae(tmp_path)(x).x_hat, sae(x).x_hat)
