"""Diagnostic behind issue 10, item 11 (kept for provenance): bench_recipe.py's own training
and evaluation functions, with per-tensor Adam lr multipliers (``dec_mult`` for W_dec,
``enc_lr``, ``benc_lr``, ``b_mult``) and an encoder init multiplier (``enc_mult``,
``enc_abs``) set by patching saekit, as it ran before ``decoder_lr_scale`` and
``init_scale`` existed (they equal ``dec_mult`` / ``enc_mult``).

    benchmarks/.peers/bin/python benchmarks/recipe_knobs.py --out rows.jsonl --tokens 3000000 \
        --runs saelens:3e-4 'sk:3e-4' 'sk:3e-4:{"dec_mult":10,"enc_mult":0.3}'

A run is ``saelens:LR`` or ``sk:LR[:JSON]`` (JSON: knobs, plus ``sae`` / ``train`` overrides).
The knobs multiply today's defaults: ``{"train": {"decoder_lr_scale": 1}, "sae": {"init_scale":
1, "aux_options": {"form": "bussmann"}}}`` restores the round-1 recipe the figures started from.
"""

# ruff: noqa: E401, E402, E501, I001
import json, sys, time, argparse, os
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import torch
import bench_recipe as b
from saekit import sae as sae_mod, train as train_mod

ap = argparse.ArgumentParser()
ap.add_argument(
    "--runs", nargs="+", required=True
)  # name:lr:json  e.g. saelens:3e-4 or sk:3e-4:{"dec_mult":10}
ap.add_argument("--rule", default="topk")
ap.add_argument("--tokens", type=int, default=512000)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--eval", type=int, default=32768)
ap.add_argument("--out", required=True)
a = ap.parse_args()
torch.set_num_threads(1)

KN = {
    "dec_mult": 1.0,
    "enc_mult": 1.0,
    "b_mult": 1.0,
    "enc_lr": 1.0,
    "benc_lr": 1.0,
    "enc_abs": 0.0,
}
DEF = dict(KN)
orig_init = sae_mod.SAE.init_from_data


def init_from_data(self, x, target=None):
    orig_init(self, x, target)
    with torch.no_grad():
        self.W_enc.mul_(KN["enc_mult"])
        if KN["enc_abs"]:
            self.W_enc.copy_(self.W_dec.t() * KN["enc_abs"])


sae_mod.SAE.init_from_data = init_from_data


class MultAdam(torch.optim.Adam):
    def step(self, closure=None):
        saved = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * g.get("mult", 1.0)
        r = super().step(closure)
        for g, l in zip(self.param_groups, saved):
            g["lr"] = l
        return r


orig_own = train_mod.Trainer._own


def _own(self, slot):
    slot = orig_own(self, slot)
    if KN == DEF:
        return slot
    s = slot.sae
    groups = [
        {"params": [s.W_dec], "mult": KN["dec_mult"]},
        {"params": [s.W_enc], "mult": KN["enc_lr"]},
        {"params": [s.b_enc], "mult": KN["benc_lr"]},
        {"params": [s.b_dec], "mult": KN["b_mult"]},
    ]
    rest = [p for n, p in s.named_parameters() if n not in ("W_dec", "W_enc", "b_enc", "b_dec")]
    if rest:
        groups.append({"params": rest, "mult": 1.0})
    c = self.cfg
    slot.opt = MultAdam(groups, lr=slot.base_lr, betas=(c.beta1, c.beta2), eps=c.eps, fused=True)
    return slot


train_mod.Trainer._own = _own

steps = a.tokens // b.BATCH
dead_steps = max(1, round(1000 * a.tokens / 3_000_000))
model = b.synth_model(1000 + a.seed)
stream = b.Stream(
    model,
    data_seed=a.seed,
    n_cached=steps + 80,
    cache_dir=os.environ.get("RECIPE_CACHE", "/tmp/saekit_bench_recipe"),
)
for spec in a.runs:
    parts = spec.split(":", 2)
    name, lr = parts[0], float(parts[1])
    extra = json.loads(parts[2]) if len(parts) > 2 else {}
    KN.update(DEF)
    KN.update({k: v for k, v in extra.items() if k in KN})
    variant = {"sae": extra.get("sae", {}), "train": extra.get("train", {})}
    t0 = time.perf_counter()
    if name == "saelens":
        run = b.train_saelens(a.rule, stream, steps, lr, a.seed, dead_steps)
    else:
        run = b.train_saekit(a.rule, variant, stream, steps, lr, a.seed, dead_steps)
    m = b.evaluate(run, model, eval_seed=10**6 + a.seed, n=a.eval)
    row = {
        "spec": spec,
        "rule": a.rule,
        "seed": a.seed,
        "tokens": a.tokens,
        **m,
        "s": time.perf_counter() - t0,
    }
    print(json.dumps(row), flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
