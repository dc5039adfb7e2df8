"""SAELens's Arrow activation cache: read by saekit, written for SAELens.

The normal suite builds caches in the documented layout with ``datasets``; the peers tests
run SAELens's own ``CacheActivationsRunner`` (on a TransformerLens model built from a config)
and its ``ActivationsStore`` on a cache saekit wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from peer_helpers import needs_peers, run_peers
from saekit.config import DataConfig
from saekit.sources import build_source
from saekit.sources.base import MemorySource
from saekit.sources.saelens_cache import SAELensCacheSource, is_saelens_cache, write_saelens_cache

datasets = pytest.importorskip("datasets", reason="datasets is a dev/[datasets] extra")
T, D = 8, 6


def _saelens_layout(path: Path, rows: int = 40, shards: int = 3) -> tuple[np.ndarray, np.ndarray]:
    acts = np.random.default_rng(0).normal(size=(rows, T, D)).astype(np.float32)
    toks = np.arange(rows * T, dtype=np.int32).reshape(rows, T)
    feats = datasets.Features({
        "blocks.2.hook_resid_post": datasets.Array2D(shape=(T, D), dtype="float32"),
        "token_ids": datasets.Sequence(datasets.Value("int32"), length=T),
    })  # fmt: skip
    ds = datasets.Dataset.from_dict(
        {"blocks.2.hook_resid_post": acts, "token_ids": toks}, features=feats
    )
    ds.save_to_disk(str(path), num_shards=shards)
    return acts.reshape(-1, D), toks.reshape(-1)


def test_read_in_order_shuffled_and_resumed(tmp_path: Path) -> None:
    acts, toks = _saelens_layout(tmp_path / "c")
    assert is_saelens_cache(tmp_path / "c")
    src = SAELensCacheSource(tmp_path / "c", shuffle=False)
    assert src.sites == ["layers.2.resid_post"] and src.d_in("layers.2.resid_post") == D
    b = src.next_batch(acts.shape[0])
    assert np.array_equal(b.acts["layers.2.resid_post"].numpy(), acts)
    assert np.array_equal(b.meta["token_ids"].numpy(), toks)
    shuf = SAELensCacheSource(tmp_path / "c", seed=4, window_shards=1)
    a = shuf.next_batch(100)
    state = shuf.state_dict()
    rest = shuf.next_batch(acts.shape[0] - 100)
    epoch = torch.cat([a.meta["token_ids"], rest.meta["token_ids"]])
    assert sorted(epoch.tolist()) == toks.tolist()  # one epoch: every token once
    again = SAELensCacheSource(tmp_path / "c", seed=4, window_shards=1)
    again.load_state_dict(state)
    assert torch.equal(
        again.next_batch(50).acts["layers.2.resid_post"], rest.acts["layers.2.resid_post"][:50]
    )
    via_cfg = build_source(DataConfig(source="cache", cache_dir=str(tmp_path / "c")), seed=0)
    assert isinstance(via_cfg, SAELensCacheSource) and via_cfg.sites == ["layers.2.resid_post"]


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    x = torch.randn(T * 12, D)
    src = MemorySource({"layers.1.mlp_out": x}, shuffle=False)
    write_saelens_cache(src, tmp_path / "w", n_tokens=T * 12, context_size=T, batch_size=T * 5)
    ds = datasets.load_from_disk(str(tmp_path / "w"))
    assert ds.column_names == ["blocks.1.hook_mlp_out"]
    assert ds.features["blocks.1.hook_mlp_out"].shape == (T, D) and len(ds) == 12
    back = SAELensCacheSource(tmp_path / "w", shuffle=False).next_batch(T * 12)
    assert torch.equal(back.acts["layers.1.mlp_out"], x)
    with pytest.raises(ValueError, match="multiple of context_size"):
        write_saelens_cache(src, tmp_path / "v", n_tokens=T * 2 + 1, context_size=T)


RUN_SAELENS_CACHE = r"""
import sys, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
import sae_lens.cache_activations_runner as car
from sae_lens.config import CacheActivationsRunnerConfig
from sae_lens.training.activations_store import ActivationsStore
out = Path(sys.argv[1]); torch.manual_seed(0)
model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=16, d_head=4,
                                                  d_vocab=50, act_fn="relu", d_mlp=32))
car.load_model = lambda *a, **kw: model  # the runner's own load, with an offline model
tokens = Dataset.from_dict({"input_ids": torch.randint(1, 50, (64, 16)).tolist()})
cfg = CacheActivationsRunnerConfig(dataset_path="unused", model_name="tiny", model_batch_size=4,
    hook_name="blocks.1.hook_resid_post", d_in=16, training_tokens=16 * 32, context_size=16,
    new_cached_activations_path=str(out / "theirs"), shuffle=False, device="cpu",
    prepend_bos=False, buffer_size_gb=16 * 16 * 4 * 8 / 1e9)
car.CacheActivationsRunner(cfg, override_dataset=tokens).run()
# SAELens reads the cache saekit wrote
store = ActivationsStore(model=model, dataset=tokens, streaming=False,
    hook_name="blocks.0.hook_resid_post", hook_head_index=None, context_size=8, d_in=6,
    n_batches_in_buffer=2, total_training_tokens=8 * 12, store_batch_size_prompts=4,
    train_batch_size_tokens=16, prepend_bos=False, normalize_activations="none",
    device=torch.device("cpu"), dtype="float32", cached_activations_path=str(out / "ours"))
got = torch.cat([store.get_raw_llm_batch(raise_on_epoch_end=True)[0] for _ in range(3)])
save_file({"acts": got.contiguous()}, str(out / "saelens_read.safetensors"))
"""


@needs_peers
def test_with_saelens(tmp_path: Path) -> None:
    x = torch.randn(8 * 12, 6)
    src = MemorySource({"layers.0.resid_post": x}, shuffle=False)
    write_saelens_cache(src, tmp_path / "ours", n_tokens=8 * 12, context_size=8)
    run_peers(RUN_SAELENS_CACHE, str(tmp_path))
    assert torch.equal(load_file(str(tmp_path / "saelens_read.safetensors"))["acts"], x)
    theirs = SAELensCacheSource(tmp_path / "theirs", shuffle=False)
    assert theirs.sites == ["layers.1.resid_post"]
    b = theirs.next_batch(theirs.n)
    ref = datasets.load_from_disk(str(tmp_path / "theirs")).with_format("numpy")
    want = np.asarray(ref["blocks.1.hook_resid_post"]).reshape(-1, 16)
    assert np.array_equal(b.acts["layers.1.resid_post"].numpy(), want)
    assert np.array_equal(b.meta["token_ids"].numpy(), np.asarray(ref["token_ids"]).reshape(-1))


def test_cli_cache_format_saelens(tmp_path: Path) -> None:
    from saekit.cli import main

    syn = '{"n_features": 32, "d": 8, "n_roots": 1}'
    rc = main(["cache", "--source", "synthetic", "--synthetic", syn, "--out", str(tmp_path / "c"),
               "--tokens", "640", "--format", "saelens", "--context-size", "16"])  # fmt: skip
    assert rc == 0
    src = build_source(DataConfig(source="cache", cache_dir=str(tmp_path / "c")))
    assert isinstance(src, SAELensCacheSource) and src.n == 640 and src.d_in(src.sites[0]) == 8
    assert main(["train", "--source", "cache", "--cache-dir", str(tmp_path / "c"), "--d-sae", "32",
                 "--k", "4", "--total-tokens", "1280", "--batch-size", "128",
                 "--out-dir", str(tmp_path / "run"), "--progress", "false"]) == 0  # fmt: skip


def test_cli_cache_format_saelens_from_a_model(tmp_path: Path) -> None:
    """The HF source holds generators (not picklable): writing must not hash the source."""
    from saekit.cli import main

    rc = main(["cache", "--out", str(tmp_path / "c"), "--tokens", "256", "--context-len", "16",
               "--format", "saelens", "--shuffle-buffer", "0"])  # fmt: skip
    assert rc == 0
    src = SAELensCacheSource(tmp_path / "c", shuffle=False)
    assert src.sites == ["layers.3.resid_post"] and src.n == 256 and src.d_in(src.sites[0]) == 384
    assert src.tokens is not None  # token ids ride along, as in SAELens's caches
