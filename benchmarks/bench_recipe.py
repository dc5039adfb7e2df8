"""saekit's training recipe against SAELens's on SAELens's own synthetic benchmark.

Run with the peers venv (it has sae_lens; saekit is imported from this checkout's src)::

    benchmarks/.peers/bin/python benchmarks/bench_recipe.py --seeds 0 1 2 --lrs 1e-4 3e-4 1e-3

Data: a ``sae_lens.synthetic.SyntheticModel`` built with the SynthSAEBench-16k recipe scaled
to 1024 features in d=128 (Zipfian firing, exponent 0.5, p in [5e-4, 0.4]; hierarchy of
8 roots, branching 4, depth 3, mutually exclusive children; low-rank correlation, rank 25,
scale 0.1; 100 orthogonalisation steps; magnitudes linear 5 -> 4 with a folded-normal std,
mean 0.5, std 0.5). Both libraries see the very same batches: batch ``i`` is
``model.sample(batch_size)`` under ``torch.manual_seed(data_seed * 1_000_003 + i)``.

Training: SAELens's ``SAETrainer`` with its synthetic defaults (``train_toy_sae``: constant
lr, Adam(0.9, 0.999), dead window 1000 steps, gradient clipping 1) and its TopK / BatchTopK
training SAEs; saekit's :func:`saekit.train.train` with its defaults plus the variant's
overrides. Both at the same k, width (d_sae = 1024), batch (1024), tokens (3M) and lr.

Evaluation: saekit's SAE is saved, loaded by SAELens (``SAE.load_from_disk``) and both are
scored by ``sae_lens.synthetic.eval_sae_on_synthetic_data`` on the same held-out samples:
MCC, explained variance, F1 and dead latents. Prints a table (mean +- sd over seeds) and
writes ``benchmarks/results/bench_recipe-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
warnings.filterwarnings("ignore")
os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's generator and trainer bars

from saekit.sources.base import ActivationSource, Batch  # noqa: E402

N_FEATURES, D, WIDTH, K, BATCH = 1024, 128, 1024, 7, 1024

#: saekit variants: SAEConfig and TrainConfig overrides (the ablations of the recipe)
#: before item 11: the decoder at the lr, the encoder scaled to the inputs' norm, and BatchTopK's
#: aux in its paper code's form
ROUND1: dict[str, Any] = {
    "train": {"decoder_lr_scale": 1.0},
    "sae": {"init_scale": 1.0},
    "by_rule": {"batchtopk": {"sae": {"aux_options": {"form": "bussmann"}}}},
}
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "saekit": {},
    "saekit-round1": ROUND1,
    "saekit+dec_lr1": {"train": {"decoder_lr_scale": 1.0}},
    "saekit+init1": {"sae": {"init_scale": 1.0}},
    "saekit+aux_bussmann": {"sae": {"aux_options": {"form": "bussmann"}}},
    "saekit+const_lr": {"train": {"warmup_frac": 0.0, "decay_start_frac": 1.0}},
    "saekit+mse": {"sae": {"recon_loss": "mse"}},
    "saekit+eps1e-8": {"train": {"eps": 1e-8}},
    "saekit+b_dec0": {"sae": {"init_b_dec": "zeros"}},
    "saekit+dead_saelens": {"sae": {"dead_tokens": -1}},  # SAELens's window (see --dead-steps)
    "saekit+free_dec": {"sae": {"unit_norm_decoder": False}},
    "saekit+noclip": {"train": {"grad_clip": 0.0}},
    "saekit+norm_in": {"sae": {"normalize_input": True}},
    "saekit+aux_saelens": {
        "sae": {
            "recon_loss": "mse",
            "aux_k": 64,
            "aux_coeff": 1.0,
            "aux_options": {"form": "saelens"},
        }
    },
}


def synth_model(seed: int):
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
    from sae_lens.synthetic.firing_magnitudes import (
        FoldedNormalMagnitudeConfig,
        LinearMagnitudeConfig,
    )
    from sae_lens.synthetic.firing_probabilities import ZipfianFiringProbabilityConfig
    from sae_lens.synthetic.hierarchy import HierarchyConfig
    from sae_lens.synthetic.synthetic_model import (
        LowRankCorrelationConfig as Corr,
    )
    from sae_lens.synthetic.synthetic_model import OrthogonalizationConfig

    cfg = SyntheticModelConfig(
        num_features=N_FEATURES,
        hidden_dim=D,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=0.5, max_prob=0.4, min_prob=5e-4
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=8,
            branching_factor=4,
            max_depth=3,
            mutually_exclusive_portion=1.0,
            compensate_probabilities=True,
        ),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=Corr(rank=25, correlation_scale=0.1),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        seed=seed,
    )
    return SyntheticModel(cfg)


class Stream:
    """Batch ``i`` of the benchmark stream, the same for every consumer.

    The first ``n_cached`` batches are generated once into a float32 memory map under
    ``cache_dir`` (SAELens's generator takes ~0.2 s per batch on one CPU thread).
    """

    def __init__(
        self, model, data_seed: int, n_cached: int = 0, cache_dir: str = "", batch_size: int = BATCH
    ) -> None:
        self.model, self.data_seed, self.batch_size = model, data_seed, batch_size
        self.cache = None
        if n_cached and cache_dir:
            self.cache = self._materialise(Path(cache_dir), n_cached)

    def _materialise(self, root: Path, n: int) -> np.ndarray:
        root.mkdir(parents=True, exist_ok=True)
        stem = f"stream-s{self.data_seed}-b{self.batch_size}-n"
        for done in sorted(root.glob(stem + "*.done")):  # a longer finished stream will do
            if int(done.stem.rsplit("-n", 1)[1]) >= n:
                return np.load(str(done.with_suffix(".f32")), mmap_mode="r")
        path = root / f"{stem}{n}.f32"
        done = path.with_suffix(".done")
        shape = (n * self.batch_size, D)
        if not done.exists():
            mm = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=shape)
            for i in range(n):
                mm[i * self.batch_size : (i + 1) * self.batch_size] = self._generate(i).numpy()
            mm.flush()
            done.write_text("ok")
        return np.load(str(path), mmap_mode="r")

    @torch.no_grad()
    def _generate(self, i: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.data_seed * 1_000_003 + i)
            return self.model.sample(self.batch_size).float()

    def batch(self, i: int) -> torch.Tensor:
        if self.cache is not None and (i + 1) * self.batch_size <= self.cache.shape[0]:
            rows = self.cache[i * self.batch_size : (i + 1) * self.batch_size]
            return torch.from_numpy(np.array(rows))
        return self._generate(i)


class SaekitSource(ActivationSource):
    """The stream as a saekit ActivationSource (site ``x``)."""

    def __init__(self, stream: Stream) -> None:
        self.stream, self.i, self.sites = stream, 0, ["x"]

    def d_in(self, site: str) -> int:
        return D

    def next_batch(self, batch_size: int) -> Batch:
        assert batch_size == self.stream.batch_size
        x = self.stream.batch(self.i)
        self.i += 1
        return Batch({"x": x})

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = int(state["i"])


def train_saelens(rule: str, stream: Stream, steps: int, lr: float, seed: int, dead_steps: int):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    kw = dict(d_in=D, d_sae=WIDTH, k=K, device="cpu", dtype="float32")
    if rule == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**kw))
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**kw))
    cfg = SAETrainerConfig(
        total_training_samples=steps * BATCH,
        train_batch_size_samples=BATCH,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        dead_feature_window=dead_steps,
        feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
    )
    data = (stream.batch(i) for i in range(10**9))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=data, save_checkpoint_fn=lambda p: None)
    trainer.fit()
    out = Path(tempfile.mkdtemp(prefix="sl_"))
    sae.save_inference_model(out)
    return out


def train_saekit(
    rule: str, variant: dict, stream: Stream, steps: int, lr: float, seed: int, dead_steps: int
):
    from saekit import SAEConfig, TrainConfig
    from saekit.train import train

    out = Path(tempfile.mkdtemp(prefix="sk_"))
    sae_kw: dict[str, Any] = dict(d_sae=WIDTH, k=K, rule=rule)
    sae_kw.update(variant.get("sae", {}))
    sae_kw.update(variant.get("by_rule", {}).get(rule, {}).get("sae", {}))
    if sae_kw.get("dead_tokens") == -1:
        sae_kw["dead_tokens"] = dead_steps * BATCH
    tr_kw = dict(
        out_dir=str(out),
        total_tokens=steps * BATCH,
        batch_size=BATCH,
        lr=lr,
        seed=seed,
        progress=False,
        checkpoint_every=0,
        resume=False,
        threads=torch.get_num_threads(),
    )
    tr_kw.update(variant.get("train", {}))
    train(SAEConfig(**sae_kw), TrainConfig(**tr_kw), SaekitSource(stream))
    return out


def evaluate(run_dir: Path, model, eval_seed: int, n: int) -> dict[str, float]:
    from sae_lens import SAE
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    sae = SAE.load_from_disk(str(run_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(eval_seed)
        r = eval_sae_on_synthetic_data(
            sae, model.feature_dict, model.activation_generator, num_samples=n, batch_size=8192
        )
    c = r.classification
    return {
        "mcc": float(r.mcc),
        "fve": float(r.explained_variance),
        "f1": float(getattr(c, "mean_f1_score", getattr(c, "f1_score", math.nan))),
        "l0": float(r.sae_l0),
        "dead_frac": float(r.dead_latents) / WIDTH,
        "true_l0": float(r.true_l0),
    }


def summarise(rows: list[dict]) -> dict[tuple, dict[str, str]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["rule"], r["lr"], r["variant"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        cell = {}
        for m in ("mcc", "fve", "f1", "l0", "dead_frac"):
            v = [r[m] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cell[m] = f"{statistics.mean(v):.3f}±{sd:.3f}"
        cell["n"] = str(len(rs))
        out[key] = cell
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rules", nargs="+", default=["topk", "batchtopk"])
    ap.add_argument("--lrs", nargs="+", type=float, default=[3e-4])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--variants", nargs="+", default=["saelens", "saekit"])
    ap.add_argument("--tokens", type=int, default=3_000_000)
    ap.add_argument("--eval-samples", type=int, default=131_072)
    ap.add_argument(
        "--dead-steps",
        type=int,
        default=0,
        help="SAELens's dead_feature_window (0: 1000 steps scaled by tokens / 3M, its 3M setting)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default="/tmp/saekit_bench_recipe", help="stream cache")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument(
        "--rows",
        default="",
        help="JSONL file: each finished row is appended; rows already there (same rule, lr,"
        " variant, seed, tokens) are reused, so runs split over processes merge into one table",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.tokens // BATCH
    dead_steps = args.dead_steps or max(1, round(1000 * args.tokens / 3_000_000))
    done: dict[tuple, dict] = {}
    if args.rows and Path(args.rows).exists():
        for line in Path(args.rows).read_text().splitlines():
            r = json.loads(line)
            done[(r["rule"], r["lr"], r["variant"], r["seed"], r.get("tokens"))] = r
    rows: list[dict] = []
    t_all = time.perf_counter()
    for seed in args.seeds:
        model = synth_model(1000 + seed)
        stream = Stream(model, data_seed=seed, n_cached=steps + 80, cache_dir=args.cache_dir)
        for rule in args.rules:
            for lr in args.lrs:
                for v in args.variants:
                    if (rule, lr, v, seed, args.tokens) in done:
                        rows.append(done[(rule, lr, v, seed, args.tokens)])
                        continue
                    t0 = time.perf_counter()
                    if v == "saelens":
                        run = train_saelens(rule, stream, steps, lr, seed, dead_steps)
                    else:
                        run = train_saekit(rule, VARIANTS[v], stream, steps, lr, seed, dead_steps)
                    m = evaluate(run, model, eval_seed=10**6 + seed, n=args.eval_samples)
                    row = {"rule": rule, "lr": lr, "variant": v, "seed": seed, **m}
                    row["tokens"], row["train_s"] = args.tokens, time.perf_counter() - t0
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.rows:
                        with open(args.rows, "a") as f:
                            f.write(json.dumps(row) + "\n")
    table = summarise(rows)
    print(
        f"\n{'rule':10} {'lr':>7} {'variant':22} "
        + " ".join(f"{m:>13}" for m in ("mcc", "fve", "f1", "l0", "dead_frac"))
    )
    for (rule, lr, v), c in sorted(table.items()):
        print(
            f"{rule:10} {lr:7.0e} {v:22} "
            + " ".join(f"{c[m]:>13}" for m in ("mcc", "fve", "f1", "l0", "dead_frac"))
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(args.out) / f"bench_recipe-{stamp}.json"
    report = {
        "args": vars(args),
        "rows": rows,
        "total_s": time.perf_counter() - t_all,
        "torch": torch.__version__,
    }
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path} ({report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
