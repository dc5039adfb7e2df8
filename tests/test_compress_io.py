"""Saved compressed models: `from_pretrained` gives the compressed model or refuses the
directory; `load_compressed` reloads exactly; memory stays bounded by one block."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compress_helpers import BUILDERS, batches, perturb
from saekit.compress import (
    CompressConfig,
    LowRankLinear,
    compress_model,
    load_compressed,
    save_compressed,
)
from saekit.compress.io import META, WEIGHTS, read_meta


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers' remote-code module cache in a temporary directory."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path / "hf_modules"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_from_pretrained_gives_the_compressed_model_or_refuses(arch, tmp_path, modules_cache):
    """With trust_remote_code the saved directory loads as the compressed model (logits equal
    to load_compressed's and the in-memory model's); without it, and through the base class,
    transformers refuses the directory. (The old directory loaded silently with random
    compressed layers: max logit difference 0.5.)"""
    from transformers import AutoModelForCausalLM

    model = BUILDERS[arch](2)
    perturb(model)
    data = batches(2)
    res = compress_model(model, CompressConfig(method="saes", ratio=0.4, grid=0), data)
    out = tmp_path / f"saved_{arch}"
    size = save_compressed(model, out, res.summary())
    assert size == (out / WEIGHTS).stat().st_size > 0
    with torch.no_grad():
        ref = model(data[0]).logits
        ours = load_compressed(out)(data[0]).logits
        hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        got = hf(data[0]).logits
    assert torch.equal(ours, ref) and torch.equal(got, ref)
    assert isinstance(hf.get_submodule(next(iter(res.layers))), torch.nn.Module)
    assert type(hf.get_submodule(next(iter(res.layers)))).__name__ == "LowRankLinear"
    with pytest.raises((ValueError, OSError)):  # unknown model type with custom code
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    base_cls = type(model)
    with pytest.raises(OSError, match="model.safetensors"):
        base_cls.from_pretrained(out)


def test_saved_layout_and_meta(tmp_path):
    model = BUILDERS["llama"](2)
    res = compress_model(model, CompressConfig(method="svd", ratio=0.5))
    save_compressed(model, tmp_path, res.summary())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "saekit_lowrank_llama"
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_saekit_lowrank.")
    assert set(cfg["saekit_lowrank"]["layers"]) == set(res.layers)
    assert (tmp_path / "modeling_saekit_lowrank.py").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    meta = read_meta(tmp_path)
    assert meta["version"] == 2 and meta["dtype"] == "float32"
    assert not list(tmp_path.glob(".saving-*"))


def test_bf16_round_trip(tmp_path, modules_cache):
    from transformers import AutoModelForCausalLM

    model = BUILDERS["llama"](2).to(torch.bfloat16)
    data = batches(1, 2, 8)
    compress_model(model, CompressConfig(method="svdllm", ratio=0.5, grid=0), data)
    save_compressed(model, tmp_path / "bf")
    loaded = load_compressed(tmp_path / "bf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bf", trust_remote_code=True)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert next(hf.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(data[0]).logits, model(data[0]).logits)
        assert torch.equal(hf.eval()(data[0]).logits, model(data[0]).logits)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="compression.json"):
        load_compressed(tmp_path)
    (tmp_path / META).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        load_compressed(tmp_path)


def test_version1_directories_still_load(tmp_path):
    """Directories written before the remote-code layout (config.json of the base model,
    model.safetensors) still reload through load_compressed."""
    from safetensors.torch import save_model

    model = BUILDERS["gpt2"](2)
    compress_model(model, CompressConfig(method="svd", ratio=0.5))
    model.config.save_pretrained(tmp_path)
    save_model(model, str(tmp_path / "model.safetensors"))
    layers = {
        n: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "rank": m.rank,
            "bias": m.bias is not None,
        }
        for n, m in model.named_modules()
        if isinstance(m, LowRankLinear)
    }
    meta = {
        "format": "saekit-lowrank",
        "version": 1,
        "model_class": "GPT2LMHeadModel",
        "dtype": "float32",
        "layers": layers,
        "report": {},
    }
    (tmp_path / META).write_text(json.dumps(meta))
    ids = batches(1)[0]
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp_path)(ids).logits, model(ids).logits)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    sys.path.insert(0, {tests!r})
    from compress_helpers import batches, llama
    from saekit.compress import CompressConfig, compress_model

    def rss_bytes(field="VmRSS"):  # this process's resident bytes (peak: VmHWM)
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    def reset_rss_peak():
        open("/proc/self/clear_refs", "w").write("5")
        return rss_bytes("VmHWM") <= rss_bytes() + 2**20

    torch.set_num_threads(1)
    cfg = CompressConfig(method="saes", ratio=0.5, grid=0)
    data = [b % 64 for b in batches(2, 4, 32)]
    warm = llama(2, dtype=torch.bfloat16, d=128, mlp=256)  # warm every code path first
    compress_model(warm, cfg, data)
    del warm
    model = llama(4, dtype=torch.bfloat16, vocab=200_000, d=128, mlp=256)
    gc.collect()
    base = rss_bytes()
    assert reset_rss_peak()
    compress_model(model, cfg, data)
    peak = rss_bytes("VmHWM")
    blk = model.model.layers[0]
    print(json.dumps({{
        "extra": peak - base,
        "model": sum(p.numel() * p.element_size() for p in model.parameters()),
        "block": 4 * 128 * 128 * 2 + 3 * 128 * 256 * 2,
        "tokens": sum(b.numel() for b in data),
    }}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_bf16_is_one_block_plus_cached_inputs():
    """A bf16 Llama (4 blocks, 102 MB of embeddings) compressed with SAES-SVD: the process's
    peak resident memory above the loaded model stays within one block (the full-precision
    twin) + the cached hidden states of both paths + the float64 statistics and factor
    work space of the largest layer + 40 MB of interpreter slack; the old pipeline's copy
    of the whole model (and a forced fp32) exceeds that."""
    script = MEMORY_SCRIPT.format(tests=str(Path(__file__).parent))
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=240,
        env={  # PYTHONPATH kept: run against another checkout's src, this measures that code
            "OMP_NUM_THREADS": "1",
            "PATH": "/usr/bin:/bin",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        },
    )
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    d, n_mlp = 128, 256
    cache = 2 * m["tokens"] * d * 2  # both paths, bf16
    stats = 2 * 2 * n_mlp * n_mlp * 8  # H and Δ of the two widest inputs, float64
    work = 12 * n_mlp * n_mlp * 8  # float64 W, L, G, G0/G1, Gram pieces, SVD factors
    bound = m["block"] + cache + stats + work + 40 * 2**20
    assert bound < m["model"] / 2  # so a second copy of the model could not hide in it
    assert m["extra"] <= bound, m
