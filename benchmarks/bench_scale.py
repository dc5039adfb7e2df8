#!/usr/bin/env python
"""Scaling benchmark: 1 vs N processes per strategy, and memory per rank of latent sharding.

Every measurement runs the public trainer (:class:`saekit.train.Trainer`, what ``saekit
train`` runs) in fresh processes started the way ``torchrun`` starts them (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ...; gloo on CPU, NCCL with ``--device cuda``):

* **throughput**: the same plan (``--saes`` TopK SAEs on one synthetic stream, so that
  ``layers`` has SAEs to split) trained by 1 process and by N processes with each strategy;
  tokens/s is the median over the logged windows after the first (steady state), taken by
  rank 0 from the trainer's own ``tokens_per_s``. Each configuration is run ``--repeats``
  times, round-robin, and the median kept; speed-ups are ratios to the 1-process figure.
* **memory**: one wide SAE, unsharded (1 process, and ``ddp`` on N: every rank holds it
  whole) against ``latents`` on N: per rank, the bytes of the SAE's parameters plus Adam's
  state (the claim: about 1/N), and the peak resident size of the process.

On a shared CPU machine the throughput figures show overheads and correctness, not speed:
N processes on N cores compete with everything else running there.

Usage::

    python benchmarks/bench_scale.py --quick           # a smoke run, < 2 min
    python benchmarks/bench_scale.py                   # the figures in the notes
    python benchmarks/bench_scale.py --device cuda     # on a GPU machine (NCCL)

Results: ``benchmarks/results/bench_scale-<device>-<time>.json`` and a printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STRATEGIES = ("ddp", "layers", "latents")


# ---------------------------------------------------------------------- one rank
def worker(spec: dict[str, Any]) -> None:
    """One rank: train ``spec`` and write this rank's figures to ``spec['out']/rank-R.json``."""
    import torch

    from saekit.config import DistConfig, SAEConfig, TrainConfig
    from saekit.distributed.launch import from_env, rank_device
    from saekit.sources.synthetic import SyntheticConfig, SyntheticSource
    from saekit.train import Trainer

    torch.set_num_threads(spec["threads"])
    strategy = from_env(DistConfig(strategy=spec["strategy"]), spec["device"])
    device = rank_device(spec["device"])
    plan = {
        f"sae{i}": ("synthetic", SAEConfig(d_sae=spec["d_sae"], k=spec["k"], aux_k=256))
        for i in range(spec["saes"])
    }
    out = Path(spec["out"])
    tc = TrainConfig(
        out_dir=str(out / "run"),
        total_tokens=spec["batch"] * spec["steps"],
        batch_size=spec["batch"],
        log_every=spec["log_every"],
        checkpoint_every=0,
        progress=False,
        device=device,
        threads=spec["threads"],
    )
    syn = SyntheticConfig(
        n_features=spec["n_features"], d=spec["d_in"], n_roots=0, block_size=spec["block"]
    )
    trainer = Trainer(plan, tc, SyntheticSource(syn), strategy=strategy)
    sae_bytes = sum(
        t.numel() * t.element_size()
        for s in trainer.slots
        for t in [*s.sae.parameters(), *s.sae.buffers()]
    )
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0
    adam_bytes = sum(
        v.numel() * v.element_size()
        for s in trainer.slots
        for st in s.opt.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    )
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    if strategy.is_writer:
        rates = [r["tokens_per_s"] for r in rows if r["sae"] == "sae0"][1:]
    else:
        rates = []
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    if device.startswith("cuda"):
        peak_dev = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    else:
        peak_dev = None
    res = {
        "rank": strategy.rank,
        "world": strategy.world,
        "tokens_per_s": statistics.median(rates) if rates else None,
        "wall_s": wall,
        "sae_mib": sae_bytes / 2**20,
        "adam_mib": adam_bytes / 2**20,
        "peak_rss_mib": peak,
        "peak_device_mib": peak_dev,
    }
    (out / f"rank-{strategy.rank}.json").write_text(json.dumps(res))
    strategy.close()


# ---------------------------------------------------------------------- launcher
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict[str, Any], world: int, timeout: float) -> list[dict]:
    """Run ``spec`` on ``world`` ranks (1: a plain process); every rank's figures."""
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("rank-*.json"):
        f.unlink()
    port = _port()
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    if world > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world))
    procs = []
    for r in range(world):
        e = dict(env, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world))
        if world == 1:
            e = {k: v for k, v in e.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        procs.append(subprocess.Popen(cmd, env=e, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        if p.returncode:
            raise RuntimeError(f"a rank failed (exit {p.returncode}):\n{err[-3000:]}")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


def throughput(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    base = {
        "d_in": args.d_in,
        "d_sae": args.d_sae,
        "k": args.k,
        "batch": args.batch,
        "steps": args.steps,
        "log_every": max(args.steps // 6, 1),
        "saes": args.saes,
        "n_features": 4 * args.d_in,
        "block": args.batch // args.world,
        "device": args.device,
    }
    threads = sorted({args.threads, args.threads * args.world})
    configs = [(f"1 process x {t} thread(s)", 1, "ddp", t) for t in threads]
    configs += [
        (f"{st} x {args.world} processes", args.world, st, args.threads) for st in STRATEGIES
    ]
    runs: dict[str, list[float]] = {name: [] for name, *_ in configs}
    for rep in range(args.repeats):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        for name, world, st, threads in order:
            out = tmp / f"tp-{rep}-{st}-{world}-{threads}"  # a fresh run directory
            spec = {**base, "strategy": st, "threads": threads, "out": str(out)}
            rank0 = launch(spec, world, args.timeout)[0]
            runs[name].append(rank0["tokens_per_s"])
            print(f"  repeat {rep + 1}: {name:28s} {rank0['tokens_per_s']:10.0f} tokens/s")
    ref = statistics.median(runs[configs[0][0]])
    return {
        "config": base,
        "world": args.world,
        "runs": runs,
        "median_tokens_per_s": {k: statistics.median(v) for k, v in runs.items()},
        "ratio_to_1_process": {k: statistics.median(v) / ref for k, v in runs.items()},
        "reference": configs[0][0],
    }


def memory(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    spec = {
        "d_in": args.mem_d_in,
        "d_sae": args.mem_d_sae,
        "k": args.k,
        "batch": args.mem_batch,
        "steps": 3,
        "log_every": 1,
        "saes": 1,
        "n_features": 4 * args.mem_d_in,
        "block": args.mem_batch,
        "threads": args.threads,
        "device": args.device,
    }
    out = {}
    for name, world, st in [("unsharded (1 process)", 1, "ddp"),
                            (f"ddp x {args.world}", args.world, "ddp"),
                            (f"latents x {args.world}", args.world, "latents")]:  # fmt: skip
        ranks = launch({**spec, "strategy": st, "out": str(tmp / f"mem-{st}-{world}")},
                       world, args.timeout)  # fmt: skip
        out[name] = ranks
        for r in ranks:
            print(
                f"  {name:22s} rank {r['rank']}: SAE {r['sae_mib']:8.1f} MiB  Adam"
                f" {r['adam_mib']:8.1f} MiB  peak RSS {r['peak_rss_mib']:8.1f} MiB"
            )
    return {"config": spec, "ranks": out}


def table(tp: dict[str, Any] | None, mem: dict[str, Any] | None) -> str:
    lines = []
    if tp:
        lines += [
            f"throughput ({tp['config']['saes']} x TopK {tp['config']['d_in']}->"
            f"{tp['config']['d_sae']} k={tp['config']['k']}, global batch"
            f" {tp['config']['batch']}; median of {len(next(iter(tp['runs'].values())))})",
            f"{'configuration':30s} {'tokens/s':>10s} {'vs ' + tp['reference']:>30s}",
        ]
        for k, v in tp["median_tokens_per_s"].items():
            lines.append(f"{k:30s} {v:10.0f} {tp['ratio_to_1_process'][k]:29.2f}x")
    if mem:
        c = mem["config"]
        lines += [
            "",
            f"memory per rank (one TopK {c['d_in']}->{c['d_sae']}, batch {c['batch']})",
            f"{'configuration':24s} {'rank':>4s} {'SAE MiB':>9s} {'Adam MiB':>9s}"
            f" {'SAE+Adam':>9s} {'vs 1 proc':>9s} {'peak RSS':>9s}",
        ]
        one = mem["ranks"]["unsharded (1 process)"][0]
        one_total = one["sae_mib"] + one["adam_mib"]
        for name, ranks in mem["ranks"].items():
            for r in ranks:
                tot = r["sae_mib"] + r["adam_mib"]
                lines.append(
                    f"{name:24s} {r['rank']:4d} {r['sae_mib']:9.1f} {r['adam_mib']:9.1f}"
                    f" {tot:9.1f} {tot / one_total:8.2f}x {r['peak_rss_mib']:9.1f}"
                )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=2, help="processes of the multi-process runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per rank, NCCL)")
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048, help="global batch (tokens per step)")
    p.add_argument("--steps", type=int, default=36)
    p.add_argument("--saes", type=int, default=2, help="SAEs in the plan (layers splits them)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-d-in", type=int, default=512)
    p.add_argument("--mem-d-sae", type=int, default=65536)
    p.add_argument("--mem-batch", type=int, default=256)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--quick", action="store_true", help="small shapes, one repeat")
    p.add_argument("--skip", choices=["throughput", "memory"], default=None)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.quick:
        args.d_in, args.d_sae, args.batch, args.steps, args.repeats = 64, 2048, 512, 12, 1
        args.mem_d_in, args.mem_d_sae = 128, 16384
        args.skip = args.skip or "throughput"
    import tempfile

    import torch

    with tempfile.TemporaryDirectory(prefix="bench_scale-") as tmp:
        print(f"bench_scale: {args.world} processes, device {args.device}")
        tp = None if args.skip == "throughput" else throughput(args, Path(tmp))
        mem = None if args.skip == "memory" else memory(args, Path(tmp))
    text = table(tp, mem)
    print("\n" + text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    res_dir = HERE / "results"
    res_dir.mkdir(exist_ok=True)
    path = res_dir / f"bench_scale-{args.device.split(':')[0]}-{stamp}.json"
    info = {
        "args": vars(args),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "note": "shared CPU machine: figures show correctness and overheads, not speed",
    }
    path.write_text(json.dumps({"info": info, "throughput": tp, "memory": mem, "table": text},
                               indent=1))  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
