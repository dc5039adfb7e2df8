"""One rank of the library-level checks in tests/test_distributed.py (torchrun's env).

1. Fixed batch: every rank builds the same SAEs and batch and compares a sharded forward /
   backward with the one-process result computed on the same rank: ``latents`` (each rank
   holds some latents, the whole batch) and ``ddp`` (some tokens, every latent). Writes
   ``{rank}.json`` with the largest differences.
2. Training through :func:`saekit.train.train` with the ``latents`` and ``layers``
   strategies into ``latents/`` and ``layers/`` (the test trains the same plans in one
   process with :func:`train_plan`), and each again stopped after step 10 and resumed by
   the same launch into ``<kind>-resumed/`` (the test asks for the same bits).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from saekit.config import DistConfig, SAEConfig, TrainConfig
from saekit.distributed.launch import from_env, rank_device
from saekit.distributed.state import shard_range
from saekit.distributed.strategy import DataParallel, LayerParallel, Strategy
from saekit.sae import SAE
from saekit.sources.synthetic import SyntheticConfig, SyntheticSource
from saekit.train import TrainResult, train

#: SAEs with architecture parts (saekit.arch), checked under ddp: name -> SAEConfig fields
#: (nmse: the parts' loss terms must divide by the global batch's variance)
ARCHS: dict[str, dict] = {
    "batchtopk+matryoshka": {
        "rule": "batchtopk", "arch": ["matryoshka"], "arch_options": {"widths": [8, 25]},
        "recon_loss": "nmse",
    },
    "topk+gated": {"rule": "topk", "arch": ["gated"], "recon_loss": "nmse"},
}  # fmt: skip
RULES = ["topk", "batchtopk", "abstopk", "mutual_choice", "feature_choice", "topafa", *ARCHS]
LATENT_RULES = ["topk", "batchtopk", "abstopk", "mutual_choice"]
B, D, F, K = 64, 16, 51, 4  # F odd: uneven latent shards
#: cpu (gloo) or cuda (NCCL, one GPU per rank): SAEKIT_DIST_DEVICE, as in test_distributed.py
DEVICE = os.environ.get("SAEKIT_DIST_DEVICE", "cpu")


def make_sae(rule: str) -> SAE:
    return _make_sae(rule).to(rank_device(DEVICE))


def _make_sae(rule: str) -> SAE:
    torch.manual_seed(1)
    fields = ARCHS.get(rule, {"rule": rule})
    sae = SAE(SAEConfig(d_in=D, d_sae=F, k=K, aux_k=8, dead_tokens=100, **fields))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.1)
        sae.tokens_since_fired[::3] = 1000  # a third of the latents dead: aux-k is active
        sae.tokens_seen.fill_(1000)
        sae.fire_freq.copy_(torch.rand(F))
    return sae.train()


def dense(sae: SAE, x: torch.Tensor, step: int = 1) -> tuple:
    out = sae(x, step=step)
    return out.codes.to_dense().detach(), out.x_hat.detach()


def grads(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    loss, terms, _ = sae.loss(x, step=1)
    loss.backward()
    g = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    g["loss"] = loss.detach()
    g["aux"] = terms.get("aux", torch.zeros(())).detach()
    return g


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


#: strategy -> the SAEs it trains (all on the synthetic site)
PLANS = {
    "latents": ["topk", "batchtopk", "abstopk", "mutual_choice"],
    "layers": ["topk", "batchtopk", "feature_choice"],
}


def train_plan(
    kind: str, out: Path, strategy: Strategy | None = None, stop_after: int = 0
) -> TrainResult:
    """Train ``PLANS[kind]`` for 20 steps of 128 tokens (aux-k active: short dead window);
    ``stop_after``: stop there (a checkpoint is written), as a killed run would."""
    plan = {
        r: ("synthetic", SAEConfig(rule=r, d_sae=129, k=4, aux_k=16, dead_tokens=256))
        for r in PLANS[kind]
    }
    tc = TrainConfig(
        out_dir=str(out), total_tokens=128 * 20, batch_size=128, progress=False,
        log_every=10, checkpoint_every=10, threads=1, device=rank_device(DEVICE),
        stop_after_steps=stop_after,
    )  # fmt: skip
    src = SyntheticSource(SyntheticConfig(n_features=128, d=32, n_roots=4, block_size=256))
    return train(plan, tc, src, strategy=strategy)


def main(out_dir: str) -> None:
    lat = from_env(DistConfig(strategy="latents"), DEVICE)
    ddp = DataParallel()
    rank, world = lat.rank, lat.world
    torch.manual_seed(2)
    x = (torch.randn(B, D) * 2).to(rank_device(DEVICE))
    res: dict = {"rank": rank}
    for i, rule in enumerate(RULES):
        ref = make_sae(rule)
        ref_codes, ref_xhat = dense(ref, x)
        ref_g = grads(make_sae(rule), x)
        r: dict = {}
        if rule in LATENT_RULES:
            lo, hi = shard_range(F, world, rank)
            codes, xhat = dense(lat.prepare_sae(i, make_sae(rule)), x)
            g = grads(lat.prepare_sae(i, make_sae(rule)), x)
            r["latents"] = {
                "codes": maxdiff(codes, ref_codes[:, lo:hi]),
                "same_support": bool(((codes != 0) == (ref_codes[:, lo:hi] != 0)).all()),
                "x_hat": maxdiff(xhat, ref_xhat),
                "loss": maxdiff(g["loss"], ref_g["loss"]),
                "aux": float(ref_g["aux"]),
                "g_W_enc": maxdiff(g["W_enc"], ref_g["W_enc"][:, lo:hi]),
                "g_W_dec": maxdiff(g["W_dec"], ref_g["W_dec"][lo:hi]),
                "g_b_enc": maxdiff(g["b_enc"], ref_g["b_enc"][lo:hi]),
                "g_b_dec": maxdiff(g["b_dec"], ref_g["b_dec"]),
            }
        n = B // world
        xs = x[rank * n : (rank + 1) * n]
        sh = ddp.prepare_sae(i, make_sae(rule))
        codes, xhat = dense(sh, xs)
        sh = ddp.prepare_sae(i, make_sae(rule))
        g = grads(sh, xs)
        ddp.sync_grads(sh)
        g.update({n_: p.grad for n_, p in sh.named_parameters() if p.grad is not None})
        rows = slice(rank * n, (rank + 1) * n)
        r["ddp"] = {
            "codes": maxdiff(codes, ref_codes[rows]),
            "same_support": bool(((codes != 0) == (ref_codes[rows] != 0)).all()),
            "x_hat": maxdiff(xhat, ref_xhat[rows]),
            "loss": maxdiff(g["loss"], ref_g["loss"]),
            **{f"g_{k}": maxdiff(g[k], ref_g[k]) for k in ("W_enc", "W_dec", "b_enc", "b_dec")},
        }
        res[rule] = r
    Path(out_dir, f"{rank}.json").write_text(json.dumps(res, indent=1))
    layers = LayerParallel()
    for kind, st in (("latents", lat), ("layers", layers)):
        train_plan(kind, Path(out_dir, kind), st)
        stopped = train_plan(kind, Path(out_dir, f"{kind}-resumed"), st, stop_after=10)
        Path(out_dir, f"{kind}-stopped-{rank}.json").write_text(
            json.dumps({"steps": stopped.steps, "completed": stopped.completed})
        )
        train_plan(kind, Path(out_dir, f"{kind}-resumed"), st)  # resumes from step 10
    lat.close()


if __name__ == "__main__":
    main(sys.argv[1])
