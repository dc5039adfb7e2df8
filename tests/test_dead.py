"""Fidelity 4: one definition of "dead", scaled to the run, used by the aux loss, the
training logs and eval (a default run used to have a 10M-token window in the loss, longer
than the run, while the logs counted dead latents on a shorter window)."""

from __future__ import annotations

import json

from saekit import DataConfig, SAEConfig, TrainConfig
from saekit.evaluate import EvalConfig, evaluate_run
from saekit.losses import DEAD_TOKENS_MAX, auto_dead_tokens
from saekit.sources import build_source
from saekit.train import Trainer


def test_auto_window() -> None:
    assert auto_dead_tokens(2_000_000, 4096) == 100_000  # the default run: 24 batches
    assert auto_dead_tokens(10_000, 4096) == 4096  # at least one batch
    assert auto_dead_tokens(10**10, 4096) == DEAD_TOKENS_MAX  # Gao et al.'s 10M at most


def test_default_run_uses_aux_k_and_logs_what_the_loss_uses(tmp_path) -> None:
    syn = {"n_features": 32, "d": 16, "n_roots": 1, "depth": 2, "ortho_steps": 10, "seed": 7}
    data = DataConfig(source="synthetic", sites=["synthetic"], synthetic=syn)
    src = build_source(data)
    cfg = SAEConfig(d_sae=128, k=2)  # 4x more latents than features: many go dead
    assert cfg.dead_tokens == 0 and cfg.aux == "auxk"
    tc = TrainConfig(
        out_dir=str(tmp_path), total_tokens=16_384, batch_size=256, log_every=1, progress=False
    )
    tr = Trainer(cfg, tc, src, data)
    sae = tr.slots[0].sae
    assert sae.cfg.dead_tokens == auto_dead_tokens(16_384, 256) == 819
    tr.run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    aux = [r["aux"] for r in rows]
    assert max(aux) > 0  # the aux-k loss ran (it never did with a 10M window)
    # a row logs the counters after its step, which the next step's aux loss uses: dead > 0
    # exactly when that loss has dead candidates
    for r, nxt in zip(rows, rows[1:]):
        assert (r["dead_frac"] > 0) == (nxt["aux"] > 0), (r, nxt)
    assert any(r["dead_frac"] > 0 for r in rows)
    assert rows[-1]["dead_frac"] == float(sae.dead_latents().float().mean())
    # eval reports the same training-time figure from the saved counters
    ev = evaluate_run(tmp_path, cfg=EvalConfig(tokens=1024, baselines=False, plots=False))
    core = ev["sae"]["core"]
    assert core["dead_frac_train"] == rows[-1]["dead_frac"] and core["dead_tokens"] == 819
    assert core["dead_frac_train"] > 0
