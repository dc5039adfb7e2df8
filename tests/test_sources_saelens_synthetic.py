"""SAELens's synthetic models (SynthSAEBench recipe) as the data of ``saekit train`` and
``saekit bench``: run in the peers venv (sae-lens installed), saekit from ``src``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peer_helpers import needs_peers, run_peers
from saekit.config import DataConfig
from saekit.errors import EnvironmentProblem

SMALL = {"overrides": {"num_features": 256, "hidden_dim": 48, "hierarchy": {"total_root_nodes": 2},
                       "orthogonalization": {"num_steps": 10}}, "block_size": 1024}  # fmt: skip

SCRIPT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
import torch
from saekit.cli import main
from saekit.sources import build_source
from saekit.config import DataConfig
out = Path(sys.argv[1]); opts = sys.argv[2]; res = {}
src = build_source(DataConfig(source="saelens_synthetic", sites=["synthetic"],
                              synthetic=json.loads(opts)), seed=3)
x, codes = src.sample_block(0)
res["recon"] = float((codes @ src.dictionary + src.model.feature_dict.bias - x).abs().max())
res["shape"] = list(src.dictionary.shape)
res["children"] = int((src.parent >= 0).sum())
a = src.next_batch(700); state = src.state_dict(); b = src.next_batch(900)
again = build_source(DataConfig(source="saelens_synthetic", sites=["synthetic"],
                                synthetic=json.loads(opts)), seed=3)
again.load_state_dict(state)
res["resume"] = bool(torch.equal(again.next_batch(900).acts["synthetic"], b.acts["synthetic"]))
res["train_rc"] = main(["train", "--source", "saelens_synthetic", "--sites", "synthetic",
    "--synthetic", opts, "--d-sae", "256", "--k", "4", "--total-tokens", "8192",
    "--batch-size", "512", "--out-dir", str(out / "run"), "--progress", "false"])
res["eval_rc"] = main(["eval", str(out / "run"), "--tokens", "2048", "--baselines", "false",
                       "--plots", "false"])
ev = json.loads((out / "run" / "eval.json").read_text())
res["mcc"] = ev["sae"].get("ground_truth", {}).get("mcc")
res["fresh"] = ev["data"]["fresh"]
res["bench_rc"] = main(["bench", "--size", "tiny", "--rules", "topk", "batchtopk", "--seeds", "0",
    "--saelens-synthetic", opts, "--out", str(out / "bench"), "--keep-runs", "false"])
bench = json.loads((out / "bench" / "bench.json").read_text())
res["bench_rules"] = sorted(bench["table"])
res["bench_mcc"] = {n: r["mcc"]["mean"] for n, r in bench["table"].items()}
print(json.dumps(res))
"""


@needs_peers
def test_train_eval_and_bench_on_saelens_synthetic(tmp_path: Path) -> None:
    out = run_peers(
        SCRIPT, str(tmp_path), json.dumps(SMALL), timeout=900, env={"TQDM_DISABLE": "1"}
    )
    res = json.loads(out.strip().splitlines()[-1])
    assert res["recon"] < 1e-4 and res["shape"] == [256, 48] and res["children"] > 0
    assert res["resume"]
    assert res["train_rc"] == res["eval_rc"] == res["bench_rc"] == 0, res
    assert res["mcc"] is not None and 0 < res["mcc"] <= 1, res
    assert res["fresh"], res  # evaluated on a new sample stream of the same world
    assert {"batchtopk", "topk"} <= set(res["bench_rules"])
    assert all(0 < v <= 1 for v in res["bench_mcc"].values()), res


def test_without_sae_lens_the_error_says_how(monkeypatch) -> None:
    import sys

    from saekit.sources import build_source

    monkeypatch.setitem(sys.modules, "sae_lens", None)
    monkeypatch.setitem(sys.modules, "sae_lens.synthetic", None)
    with pytest.raises(EnvironmentProblem, match="pip install sae-lens"):
        build_source(DataConfig(source="saelens_synthetic", sites=["synthetic"]))
