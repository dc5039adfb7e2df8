#!/usr/bin/env python
"""End-to-end benchmark: the same TopK SAE trained by saekit, sparsify and SAELens, as users
run them (model forward included), then scored on the same held-out tokens.

Every library trains the same SAE (TopK, ``d_sae``, ``k``, Adam at the same ``lr``) on the
same model, site and text for the same number of tokens with the same tokens per step:

* saekit: ``saekit train --model DIR --sites layers.L.resid_post --dataset train.jsonl ...``
  (:func:`saekit.cli.main`, the function behind the console script);
* sparsify: its README's Python route, ``chunk_and_tokenize`` then
  ``Trainer(TrainConfig(SaeConfig(...)), dataset, model).fit()`` (hookpoint ``h.L``,
  ``optimizer="adam"``, saekit's warm-up steps; sequences per step = B / context);
* SAELens: its README's ``LanguageModelSAETrainingRunner(LanguageModelSAERunnerConfig(
  sae=TopKTrainingSAEConfig(...), model_class_name="AutoModelForCausalLM", ...)).run()``
  (hook ``transformer.h.L``, the text as a local dataset directory, saekit's warm-up).

Each run is a fresh subprocess (``--worker``) timed from the library call to its end (model
load, tokenisation, model forwards, SAE steps, saving), with peak memory measured there (CPU:
peak resident size ``VmHWM`` minus the resident size after imports; CUDA:
``torch.cuda.max_memory_allocated``). Runs alternate between libraries (order rotated each
repeat) so that load changes on a shared machine hit all alike. Then one ``--worker eval``
process computes the held-out activations once (saekit's HF source on ``eval.jsonl``, the
same tokens for all) and the FVE of each trained SAE through its own library's forward.

The model is a word-level GPT-2 (``saekit.apply.toy.make_demo_lm``, trained briefly on the
built-in pydoc text), cached under ``benchmarks/.cache``; the peers venv
(``benchmarks/.peers``, ``setup_peers.sh``) runs everything, saekit from ``src/``.

Usage::

    benchmarks/.peers/bin/python benchmarks/bench_e2e.py --quick          # smoke run, ~2 min
    benchmarks/.peers/bin/python benchmarks/bench_e2e.py --repeats 3      # CPU figures
    python benchmarks/bench_e2e.py --device cuda --B 4096 --n-embd 768 --d-sae 16384

Results: ``benchmarks/results/bench_e2e-<device>-<time>.json``, printed as a table with the
ratios saekit / peer (tokens/s, memory) per repeat and as medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_PY = HERE / ".peers" / "bin" / "python"
sys.path.insert(0, str(ROOT / "src"))
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

IMPLS = ("saekit", "sparsify", "saelens")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--B", type=int, default=1024, help="tokens per SAE step")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=131072, help="training tokens per run")
    p.add_argument("--ctx", type=int, default=128, help="tokens per sequence")
    p.add_argument("--n-embd", type=int, default=128, help="model width (d_in)")
    p.add_argument("--layer", type=int, default=1, help="block whose output is the site")
    p.add_argument("--vocab", type=int, default=4096, help="word vocabulary of the model")
    p.add_argument("--lm-steps", type=int, default=100, help="training steps of the model")
    p.add_argument("--lr", type=float, default=0.0, help="0: 2e-4 / sqrt(d_sae / 16384)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--quick", action="store_true", help="small smoke run, 1 repeat")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--cache", default=str(HERE / ".cache"))
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.B, a.d_sae, a.tokens, a.n_embd, a.repeats = 512, 2048, 16384, 128, 1
        a.eval_tokens = min(a.eval_tokens, 4096)
    if a.lr <= 0:
        a.lr = 2e-4 / math.sqrt(a.d_sae / 16384)
    return a


# ---------------------------------------------------------------------- shared set-up
def prepare(a: argparse.Namespace) -> dict[str, Any]:
    """Model directory and train / held-out text files (cached); returns the run spec."""
    from saekit.sources.text import iter_texts

    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = cache / f"e2e-gpt2-{a.n_embd}-v{a.vocab}-s{a.lm_steps}"
    if not (model / "config.json").exists():
        from saekit.apply.toy import make_demo_lm

        print(f"building the benchmark model at {model} ...", flush=True)
        make_demo_lm(model, steps=a.lm_steps, vocab_size=a.vocab, n_embd=a.n_embd)
    data = cache / "e2e-text"
    (data / "train").mkdir(parents=True, exist_ok=True)
    for part, path in (("train", data / "train" / "train.jsonl"), ("eval", data / "eval.jsonl")):
        if not path.exists():
            rows = [json.dumps({"text": t}) for t in iter_texts("", part=part)]
            path.write_text("\n".join(rows) + "\n")
    return {
        "device": a.device,
        "B": a.B,
        "d_sae": a.d_sae,
        "k": a.k,
        "tokens": a.tokens,
        "ctx": a.ctx,
        "layer": a.layer,
        "lr": a.lr,
        "threads": a.threads,
        "eval_tokens": a.eval_tokens,
        "model": str(model),
        "train_jsonl": str(data / "train" / "train.jsonl"),
        "train_dir": str(data / "train"),
        "eval_jsonl": str(data / "eval.jsonl"),
    }


# ---------------------------------------------------------------------- memory
def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Meter:
    """Peak memory of the code run after construction (see the module docstring)."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _status_bytes("VmRSS")

    def peak(self) -> dict[str, int]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return {"peak_bytes": torch.cuda.max_memory_allocated() - self.base}
        hwm = _status_bytes("VmHWM")
        return {"peak_bytes": hwm - self.base, "peak_rss_bytes": hwm}


# ---------------------------------------------------------------------- the three runs
def _warmup_steps(s: dict[str, Any]) -> int:
    """saekit's warm-up (``warmup_frac`` 0.02 of the steps), given to the peers too."""
    return round(0.02 * (s["tokens"] // s["B"]))


def run_saekit(s: dict[str, Any], out: Path) -> Path:
    from saekit.cli import main

    argv = ["train", "--model", s["model"], "--sites", f"layers.{s['layer']}.resid_post",
            "--dataset", s["train_jsonl"], "--dataset-split", "all",
            "--context-len", str(s["ctx"]), "--rule", "topk", "--d-sae", str(s["d_sae"]),
            "--k", str(s["k"]), "--batch-size", str(s["B"]), "--total-tokens", str(s["tokens"]),
            "--lr", str(s["lr"]), "--out-dir", str(out), "--progress", "false",
            "--checkpoint-every", "0", "--device", s["device"], "--model-device", s["device"],
            "--threads", str(s["threads"])]  # fmt: skip
    if main(argv) != 0:
        raise RuntimeError("saekit train failed")
    return out


def run_sparsify(s: dict[str, Any], out: Path) -> Path:
    import torch
    from datasets import load_dataset
    from sparsify import SaeConfig, TrainConfig, Trainer
    from sparsify.data import chunk_and_tokenize
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(s["model"])
    ds = load_dataset("json", data_files=s["train_jsonl"], split="train")
    ds = chunk_and_tokenize(ds, tok, max_seq_len=s["ctx"], num_proc=1)
    n = s["tokens"] // s["ctx"]
    ds = ds.select([i % len(ds) for i in range(n)])  # epochs as needed, exactly n sequences
    model = AutoModel.from_pretrained(s["model"], dtype=torch.float32).to(s["device"])
    cfg = TrainConfig(
        SaeConfig(num_latents=s["d_sae"], k=s["k"]),
        batch_size=s["B"] // s["ctx"],
        optimizer="adam",
        lr=s["lr"],
        lr_warmup_steps=_warmup_steps(s),  # its default, 1000, outlasts a short run
        auxk_alpha=1 / 32,
        hookpoints=[f"h.{s['layer']}"],
        log_to_wandb=False,
        save_dir=str(out),
        run_name="run",
    )
    trainer = Trainer(cfg, ds, model)
    trainer.fit()
    path = out / "sae"
    next(iter(trainer.saes.values())).save_to_disk(path)
    return path


def run_saelens(s: dict[str, Any], out: Path) -> Path:
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
    from sae_lens.config import LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    from transformers import AutoConfig

    d_in = AutoConfig.from_pretrained(s["model"]).n_embd
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d_in, d_sae=s["d_sae"], k=s["k"], device=s["device"]),
        model_name=s["model"],
        model_class_name="AutoModelForCausalLM",
        hook_name=f"transformer.h.{s['layer']}",
        dataset_path=s["train_dir"],
        is_dataset_tokenized=False,
        streaming=True,
        context_size=s["ctx"],
        train_batch_size_tokens=s["B"],
        training_tokens=s["tokens"],
        lr=s["lr"],
        lr_warm_up_steps=_warmup_steps(s),
        device=s["device"],
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(out / "checkpoints"),
        output_path=str(out / "output"),
        verbose=False,
    )
    sae = LanguageModelSAETrainingRunner(cfg).run()
    path = out / "sae"
    sae.save_inference_model(path)
    return path


RUNNERS = {"saekit": run_saekit, "sparsify": run_sparsify, "saelens": run_saelens}


def train_worker(impl: str, spec_path: str) -> None:
    import torch

    s = json.loads(Path(spec_path).read_text())
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    torch.manual_seed(0)
    out = Path(s["run_dir"])
    _import_library(impl)
    meter = Meter(s["device"])
    t0 = time.perf_counter()
    path = RUNNERS[impl](s, out)
    if s["device"].startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    res = {"impl": impl, "wall_s": wall, "tokens_per_s": s["tokens"] / wall, "sae_path": str(path)}
    res.update(meter.peak())
    print("RESULT " + json.dumps(res), flush=True)


def _import_library(impl: str) -> None:
    if impl == "saekit":
        import saekit.cli  # noqa: F401
        import saekit.sources.hf  # noqa: F401
        import saekit.train  # noqa: F401
    elif impl == "sparsify":
        import sparsify  # noqa: F401
        import sparsify.data  # noqa: F401
    else:
        import sae_lens  # noqa: F401
    import datasets  # noqa: F401
    import transformers  # noqa: F401
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401  (lazy in transformers)


# ---------------------------------------------------------------------- held-out FVE
def eval_worker(spec_path: str) -> None:
    import torch

    s = json.loads(Path(spec_path).read_text())
    dev = s["device"]
    from saekit.config import DataConfig
    from saekit.sources.hf import HFSource

    cfg = DataConfig(model=s["model"], sites=[f"layers.{s['layer']}.resid_post"],
                     dataset=s["eval_jsonl"], dataset_split="all", context_len=s["ctx"],
                     shuffle_buffer=0, device=dev)  # fmt: skip
    src = HFSource(cfg, seed=0)
    x = src.next_batch(s["eval_tokens"]).acts[cfg.sites[0]].to(dev, torch.float32)
    src.close()
    out: dict[str, Any] = {"eval_tokens": int(x.shape[0])}
    for impl, path in s["sae_paths"].items():
        with torch.no_grad():
            x_hat = _reconstruct(impl, path, x, dev)
        num = (x - x_hat.float()).pow(2).sum()
        den = (x - x.mean(0, keepdim=True)).pow(2).sum()
        out[impl] = float(1 - num / den)
    print("RESULT " + json.dumps(out), flush=True)


def _reconstruct(impl: str, path: str, x: Any, dev: str) -> Any:
    if impl == "saekit":
        from saekit.io import load_sae

        sae = load_sae(path).to(dev).eval()
        return sae(x).x_hat
    if impl == "sparsify":
        from sparsify import SparseCoder

        return SparseCoder.load_from_disk(path, device=dev)(x).sae_out
    from sae_lens import SAE

    sae = SAE.load_from_disk(path, device=dev)
    return sae(x)


# ---------------------------------------------------------------------- driver
def _run_worker(args: list[str], log: Path, timeout: float = 3600) -> dict[str, Any]:
    py = sys.executable
    r = subprocess.run([py, __file__, *args], capture_output=True, text=True, timeout=timeout)
    log.write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": f"exit {r.returncode}: {tail} (log: {log})"}
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    in_peers = Path(sys.prefix).resolve() == (HERE / ".peers").resolve()
    if not a.worker and PEERS_PY.exists() and not in_peers:
        os.execv(str(PEERS_PY), [str(PEERS_PY), __file__, *sys.argv[1:]])
    if a.worker == "eval":
        eval_worker(a.spec)
        return {}
    if a.worker:
        train_worker(a.worker, a.spec)
        return {}
    impls = [i for i in a.impls.split(",") if i]
    notes = []
    for impl, mod in (("sparsify", "sparsify"), ("saelens", "sae_lens")):
        if impl in impls:
            try:
                __import__(mod)
            except Exception as e:  # noqa: BLE001 - any import failure skips the peer
                impls.remove(impl)
                notes.append(f"{impl} skipped: {type(e).__name__}: {e}")
    spec = prepare(a)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(a.cache) / f"e2e-runs-{stamp}"
    work.mkdir(parents=True)
    runs: dict[str, list[dict[str, Any]]] = {i: [] for i in impls}
    print(f"bench_e2e: {impls} x {a.repeats} | {json.dumps(spec)}", flush=True)
    for r in range(a.repeats):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for impl in order:
            s = {**spec, "run_dir": str(work / f"{impl}-{r}")}
            sp = work / f"spec-{impl}-{r}.json"
            sp.write_text(json.dumps(s))
            res = _run_worker(["--worker", impl, "--spec", str(sp)], work / f"{impl}-{r}.log")
            runs[impl].append(res)
            print(f"repeat {r} {impl}: {json.dumps(res)}", flush=True)
    paths = {i: v[-1]["sae_path"] for i, v in runs.items() if v and "sae_path" in v[-1]}
    sp = work / "spec-eval.json"
    sp.write_text(json.dumps({**spec, "sae_paths": paths}))
    fve = _run_worker(["--worker", "eval", "--spec", str(sp)], work / "eval.log")
    result = summarise(a, spec, runs, fve, notes)
    report(result)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick-" if a.quick else ""
    path = out / f"bench_e2e-{tag}{a.device.split(':')[0]}-d{a.d_sae}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


def summarise(
    a: argparse.Namespace, spec: dict, runs: dict, fve: dict, notes: list[str]
) -> dict[str, Any]:
    import torch

    med: dict[str, dict[str, float]] = {}
    for impl, rs in runs.items():
        ok = [r for r in rs if "tokens_per_s" in r]
        if ok:
            med[impl] = {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
                "peak_bytes": statistics.median(r["peak_bytes"] for r in ok),
                "wall_s": statistics.median(r["wall_s"] for r in ok),
            }
    ratios: dict[str, Any] = {}
    for peer in ("sparsify", "saelens"):
        if "saekit" in med and peer in med:
            pairs = [
                (x["tokens_per_s"] / y["tokens_per_s"], y["peak_bytes"] / max(x["peak_bytes"], 1))
                for x, y in zip(runs["saekit"], runs[peer])
                if "tokens_per_s" in x and "tokens_per_s" in y
            ]
            ratios[f"saekit_vs_{peer}"] = {
                "speed_per_repeat": [p[0] for p in pairs],
                "speed_median": statistics.median(p[0] for p in pairs),
                "memory_saving_median": statistics.median(p[1] for p in pairs),
                "fve_difference": (fve.get("saekit", math.nan) - fve.get(peer, math.nan)),
            }
    machine = {"cores": os.cpu_count(), "threads": torch.get_num_threads()}
    with contextlib.suppress(Exception):
        machine["loadavg_end"] = os.getloadavg()
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "transformers", "sae-lens", "eai-sparsify", "datasets"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[name] = md.version(name)
    return {
        "spec": spec,
        "repeats": a.repeats,
        "runs": runs,
        "median": med,
        "fve_heldout": fve,
        "ratios": ratios,
        "machine": machine,
        "versions": versions,
        "notes": notes,
        "method": "each run a fresh subprocess, libraries alternating (order rotated per"
        " repeat); tokens/s = training tokens / wall time of the whole library call;"
        " FVE on the same held-out activations through each library's own forward",
    }


def report(r: dict[str, Any]) -> None:
    s = r["spec"]
    print(
        f"\nend to end, {s['device']}: GPT-2 d_in from {Path(s['model']).name}, site block "
        f"{s['layer']}, B={s['B']} d_sae={s['d_sae']} k={s['k']} tokens={s['tokens']}"
    )
    print(f"{'library':<10}{'tokens/s':>12}{'wall (s)':>10}{'peak MiB':>10}{'held-out FVE':>14}")
    for impl, m in r["median"].items():
        fve = r["fve_heldout"].get(impl, float("nan"))
        print(
            f"{impl:<10}{m['tokens_per_s']:12.0f}{m['wall_s']:10.1f}"
            f"{m['peak_bytes'] / 2**20:10.0f}{fve:14.3f}"
        )
    for name, v in r["ratios"].items():
        per = ", ".join(f"{x:.2f}" for x in v["speed_per_repeat"])
        print(
            f"{name}: {v['speed_median']:.2f}x tokens/s (repeats: {per}), "
            f"{v['memory_saving_median']:.2f}x less peak memory, "
            f"FVE {v['fve_difference']:+.3f}"
        )
    for impl, rs in r["runs"].items():
        for x in rs:
            if "error" in x:
                print(f"error {impl}: {x['error']}")
    if "error" in r["fve_heldout"]:
        print("eval error:", r["fve_heldout"]["error"])
    for n in r["notes"]:
        print("note:", n)


if __name__ == "__main__":
    main()
