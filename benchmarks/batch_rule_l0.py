"""Inference L0 after a 60-step run at k=8 (batch rules), in saekit and in SAELens (peers venv).

Usage: .venv/bin/python benchmarks/batch_rule_l0.py [OUT_DIR]  (prints JSON; ~1 CPU-minute)
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from saekit import SAEConfig, TrainConfig
from saekit.evaluate.core import core_metrics
from saekit.io import load_sae
from saekit.sources.synthetic import SITE, SyntheticConfig, SyntheticSource
from saekit.train import train

torch.set_num_threads(1)
out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/batch_rule_l0")
K, B = 8, 512
out.mkdir(parents=True, exist_ok=True)
PEERS = Path(__file__).resolve().parent / ".peers" / "bin" / "python"


def syn() -> SyntheticConfig:
    return SyntheticConfig(n_features=256, d=64, n_roots=4)


ev = SyntheticSource(syn(), stream_seed=99)
xs = [ev.next_batch(4096).acts[SITE] for _ in range(4)]
save_file({"x": torch.cat(xs).contiguous()}, str(out / "x.safetensors"))
rows = {}
for rule in ["batchtopk", "mutual_choice", "feature_choice"]:
    tc = TrainConfig(
        out_dir=str(out / rule),
        total_tokens=60 * B,
        batch_size=B,
        lr=3e-3,
        progress=False,
        checkpoint_every=0,
        resume=False,
    )
    res = train(SAEConfig(rule=rule, k=K, d_sae=512), tc, SyntheticSource(syn()))
    m, _ = core_metrics(load_sae(out / rule), xs)
    rows[rule] = {
        "train_l0": res.metrics[next(iter(res.metrics))]["l0"],
        "saekit_l0": m["l0"],
        "fve": m["fve"],
    }
code = """
import sys, warnings, torch
warnings.filterwarnings("ignore")
from safetensors.torch import load_file
from sae_lens import SAE
x = load_file(sys.argv[1] + "/x.safetensors")["x"]
for rule in sys.argv[2:]:
    sae = SAE.load_from_disk(f"{sys.argv[1]}/{rule}")
    with torch.no_grad():
        print(rule, float((sae.encode(x) != 0).sum(-1).float().mean()))
"""
r = subprocess.run([str(PEERS), "-c", code, str(out), *rows], capture_output=True, text=True)
for ln in r.stdout.splitlines():
    rule, v = ln.split()
    rows[rule]["saelens_l0"] = float(v)
print(json.dumps(rows, indent=1))
