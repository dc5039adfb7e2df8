"""Shared helpers of the format tests: trained SAEs, dense codes, tolerances, a fake hub cache."""

from __future__ import annotations

from pathlib import Path

import torch

from saekit import SAE, SAEConfig

HUB_COMMIT = "0" * 40


def trained(rule: str, d: int, f: int, k: int, steps: int = 5, **kw) -> SAE:
    """An SAE trained a few steps (thresholds, biases and decoder moved off their init)."""
    sae = SAE(SAEConfig(d_in=d, d_sae=f, rule=rule, k=k, **kw))
    xs = torch.randn(512, d) * 2 + 0.5
    sae.train()
    sae.init_from_data(xs)
    opt = torch.optim.Adam(sae.parameters(), 1e-2)
    for step in range(steps):
        loss, _, out = sae.loss(xs, step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.normalize_decoder()
        sae.observe(out.codes, xs.shape[0])
    return sae.eval()


def codes(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sae.encode(x).to_dense()


def close(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """Equal to 1e-5 of the largest magnitude (float32 rounding of equal formulas)."""
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def fake_hub_file(hub: Path, repo: str, rel: str) -> Path:
    """The path of ``rel`` in a hub-cache snapshot of model repo ``repo`` (made on demand)."""
    root = hub / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(HUB_COMMIT)
    path = root / "snapshots" / HUB_COMMIT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
