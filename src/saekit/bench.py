"""``saekit bench``: every registered rule on the same synthetic ground-truth data.

One :class:`~saekit.sources.synthetic.SyntheticSource` stream (fixed seed) trains every
variant at once through :func:`saekit.train.train` (each batch is generated once and fed to
all SAEs; same width ``d_sae = n_features``, same optimiser, same input normalisation), the
trained SAEs are saved, loaded back from their run directories and evaluated on held-out
blocks of the same generator (block indices far beyond the training stream).

Matched sparsity: the TopK family uses ``k = round(expected true L0)``; batch rules
(batchtopk, mutual_choice, feature_choice) spend ``k*B`` per batch; ReLU (``l1_coeff``) and
JumpReLU (``l0_coeff``) are trained over a small coefficient grid in the same run and the
variant whose eval L0 is closest to ``k`` (in log ratio) is reported (all are in the JSON);
top-AFA chooses its own L0, which is reported as is. Every variant uses the same Adam lr
(``BenchSize.lr``, above Gao's width scaling because runs are short), ``normalize_input``,
``aux_k = min(512, d_sae/2)``, ``dead_tokens`` = 5% of the training tokens and the same
initial weights (seeded per variant; rules' own parameters aside).

gtopk needs dLoss/dx: the bench defines a synthetic downstream loss ``L(x) = 1/2 sum_i w_i
(d_i . (x - bias))^2`` (``d_i`` the true features, ``w_i`` log-normal importances), whose
gradient ``G^T diag(w) G (x - bias)`` every batch carries; gtopk is evaluated with it too.
Its matching metric is ``fvu_down``, the reconstruction error under that loss's metric.

Metrics (``saekit.evaluate``): L0, pooled mean-centred FVE, dead fraction (no firing on the
eval tokens), MCC (Hungarian one-to-one |cos|), MMCS, recovery (|cos| > 0.9), per-latent F1
against the true firing of each latent's best-matching feature (mean over all latents),
``fvu_down`` and the training step time. A second dataset with bidirectional (signed)
features compares AbsTopK with TopK where the sign matters.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.config import DataConfig, SAEConfig, TrainConfig, to_dict
from saekit.errors import ConfigError
from saekit.evaluate.core import CoreAccumulator
from saekit.evaluate.ground_truth import DetectionAccumulator, dictionary_metrics
from saekit.io import load_sae
from saekit.io.atomic import json_safe, save_figure, write_json
from saekit.rules import rule_names
from saekit.sae import SAE
from saekit.sources.base import ActivationSource, Batch
from saekit.sources.synthetic import SITE, SyntheticConfig, SyntheticSource

#: held-out evaluation blocks start at this block index of the generator's stream
EVAL_BLOCK_OFFSET = 1_000_000


@dataclass
class BenchSize:
    """Problem size and budget of one bench run."""

    n_features: int
    d: int
    tokens: int
    batch_size: int
    eval_tokens: int
    signed_tokens: int
    block_size: int = 4096
    lr: float = 4e-3  # one Adam lr for every variant (tuned for TopK on this data)


SIZES: dict[str, BenchSize] = {
    # for tests and smoke runs only: too short to rank rules
    "tiny": BenchSize(64, 24, 16_384, 512, 4096, 8192, block_size=2048),
    "small": BenchSize(256, 64, 1_500_000, 512, 32_768, 400_000),
    "large": BenchSize(1024, 128, 4_000_000, 1024, 131_072, 1_000_000, lr=2e-3),
}

#: rules whose L0 is set by a penalty: (option, grid, fixed options), on E||x||^2 = d inputs.
#: JumpReLU's paper init (theta = 1e-3, bandwidth 1e-3) barely moves its thresholds in a
#: short run, so the bench starts them at 1 with bandwidth 0.1 (measured: L0 stays ~d_sae).
GRIDS: dict[str, tuple[str, list[float], dict[str, Any]]] = {
    "relu": ("l1_coeff", [3.0, 4.0, 5.0], {}),
    "jumprelu": ("l0_coeff", [0.3, 1.0, 3.0], {"init_threshold": 1.0, "bandwidth": 0.1}),
}


@dataclass
class BenchConfig:
    """Options of :func:`run_bench`."""

    size: str = "small"
    out: str = "runs/bench"
    seed: int = 0
    rules: list[str] = field(default_factory=list)  # empty: every registered rule
    signed: bool = True  # also run the bidirectional-features comparison
    threads: int = 1  # the bench's matrices are small: one thread avoids sync overhead
    progress: bool = False
    keep_runs: bool = True  # keep the trained run directories under out/runs


class DownstreamGradSource(ActivationSource):
    """Adds ``grads = dL/dx`` of ``L(x) = 1/2 sum_i w_i (d_i . (x - bias))^2`` to a source."""

    def __init__(self, inner: SyntheticSource, weights: Tensor) -> None:
        self.inner = inner
        self.sites = list(inner.sites)
        G = inner.dictionary
        self.metric = G.T @ (weights[:, None] * G)  # [d, d], symmetric PSD
        self.bias = inner.bias

    def d_in(self, site: str) -> int:
        return self.inner.d_in(site)

    def grad(self, x: Tensor) -> Tensor:
        return (x - self.bias) @ self.metric

    def next_batch(self, batch_size: int) -> Batch:
        b = self.inner.next_batch(batch_size)
        b.inputs["grad"] = {SITE: self.grad(b.acts[SITE])}
        return b

    def request_inputs(self, names):
        return set(names) & {"grad"}

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


#: the data generator's seed is the bench seed plus this, never the training seed: with equal
#: seeds and shapes, torch's global generator would initialise the SAE decoder with the very
#: Gaussian draw the true dictionary starts from
DATA_SEED_OFFSET = 1000


def synthetic_config(size: BenchSize, seed: int, signed_frac: float = 0.0) -> SyntheticConfig:
    """The bench's ground-truth generator for ``size`` (hierarchy on ~1/3 of the features)."""
    return SyntheticConfig(
        n_features=size.n_features,
        d=size.d,
        n_roots=max(size.n_features // 64, 1),
        seed=seed + DATA_SEED_OFFSET,
        block_size=size.block_size,
        signed_frac=signed_frac,
    )


def base_sae_config(size: BenchSize, k: int, dead_tokens: int) -> SAEConfig:
    """Settings shared by every variant (only ``rule`` and ``rule_options`` differ)."""
    return SAEConfig(
        d_sae=size.n_features,
        k=k,
        aux_k=min(512, size.n_features // 2),
        dead_tokens=dead_tokens,
        normalize_input=True,
    )


def variants(
    names: list[str],
    base: SAEConfig,
    grids: dict[str, tuple[str, list[float], dict[str, Any]]] | None = None,
) -> dict[str, SAEConfig]:
    """``variant name -> SAEConfig``: one per rule, a grid for penalty rules, topk+zipf."""
    grids = GRIDS if grids is None else grids
    out: dict[str, SAEConfig] = {}
    for r in names:
        if r in grids:
            key, vals, fixed = grids[r]
            for v in vals:
                opts = {**fixed, key: v}
                out[f"{r}[{key}={v:g}]"] = replace(base, rule=r, rule_options=opts)
        else:
            out[r] = replace(base, rule=r, rule_options={})
    if "topk" in names:
        out["topk+aux_zipf"] = replace(base, rule="topk", aux="zipf", rule_options={})
    return out


def rule_of(variant: str) -> str:
    return variant.split("[")[0].split("+")[0]


def eval_batches(src: SyntheticSource, n_tokens: int) -> list[tuple[Tensor, Tensor]]:
    """Held-out ``(x, true codes)`` blocks of the generator, ``n_tokens`` in all."""
    out, got, block = [], 0, EVAL_BLOCK_OFFSET
    while got < n_tokens:
        x, c = src.sample_block(block)
        take = min(n_tokens - got, x.shape[0])
        out.append((x[:take], c[:take]))
        got += take
        block += 1
    return out


@torch.no_grad()
def evaluate_sae(
    sae: SAE,
    data: list[tuple[Tensor, Tensor]],
    dictionary: Tensor,
    grad_src: DownstreamGradSource | None = None,
) -> dict[str, Any]:
    """Core, dictionary and detection metrics of ``sae`` (in inference mode) on ``data``."""
    sae.eval()
    core = CoreAccumulator(sae.d_in, sae.d_sae)
    det = DetectionAccumulator(sae.W_dec, dictionary)
    down_err = down_var = 0.0
    xs = torch.cat([x for x, _ in data])
    mu = xs.mean(0)
    for x, codes in data:
        g = grad_src.grad(x) if grad_src is not None else None
        out = sae(x, inputs=None if g is None else {"grad": g})
        core.update(x, out.x_hat, out.codes)
        det.update(out.codes, codes)
        if grad_src is not None:
            e, c = out.x_hat - x, x - mu
            down_err += float(((e @ grad_src.metric) * e).sum())
            down_var += float(((c @ grad_src.metric) * c).sum())
    c = core.result()
    res: dict[str, Any] = {
        "l0": c["l0"],
        "fve": c["fve"],
        "dead_frac": c["dead_frac"],
        "dense_frac": c["dense_frac"],
    }
    res.update({k: v for k, v in dictionary_metrics(sae.W_dec, dictionary).items()})
    d = det.result()
    res.update({"f1": d["f1"], "precision": d["precision"], "recall": d["recall"]})
    if grad_src is not None:
        res["fvu_down"] = down_err / max(down_var, 1e-300)
    return res


def step_ms(sae: SAE, x: Tensor, g: Tensor | None, reps: int = 3) -> float:
    """Mean wall time of one forward + backward of the training loss, in milliseconds."""
    sae.train()
    fire = sae.fire_freq.clone()
    inputs = None if g is None else {"grad": g}
    sae.loss(x, inputs=inputs)[0].backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        sae.zero_grad(set_to_none=True)
        sae.loss(x, inputs=inputs)[0].backward()
    sae.zero_grad(set_to_none=True)
    sae.fire_freq.copy_(fire)
    sae.eval()
    return 1000 * (time.perf_counter() - t0) / reps


def _train_and_eval(
    cfgs: dict[str, SAEConfig],
    source: ActivationSource,
    syn: SyntheticSource,
    size: BenchSize,
    tokens: int,
    out_dir: Path,
    cfg: BenchConfig,
    grad_src: DownstreamGradSource | None,
) -> dict[str, dict[str, Any]]:
    from saekit.train import train

    tc = TrainConfig(
        out_dir=str(out_dir),
        total_tokens=tokens,
        batch_size=size.batch_size,
        lr=size.lr,
        seed=cfg.seed,
        log_every=max(tokens // size.batch_size // 20, 1),
        checkpoint_every=0,
        threads=cfg.threads,
        progress=cfg.progress,
        resume=False,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    t0 = time.perf_counter()
    saes = {}
    for n, c in cfgs.items():  # the same initial weights for every variant of the run
        torch.manual_seed(cfg.seed)
        saes[n] = SAE(c.resolved(source.d_in(SITE)))
    # recorded in each run's cfg.json, so that `saekit eval RUN` rebuilds the ground truth
    data_cfg = DataConfig(source="synthetic", sites=[SITE], synthetic=to_dict(syn.cfg))
    plan = {n: (SITE, c) for n, c in cfgs.items()}
    result = train(plan, tc, source, data_cfg=data_cfg, saes=saes)
    train_s = time.perf_counter() - t0
    data = eval_batches(syn, size.eval_tokens)
    x0 = data[0][0][: size.batch_size]
    g0 = grad_src.grad(x0) if grad_src is not None else None
    res = {}
    for name in cfgs:
        sae = load_sae(result.run_dirs[name])  # evaluate what was saved
        r = evaluate_sae(sae, data, syn.dictionary, grad_src)
        r["rule"] = rule_of(name)
        r["options"] = dict(cfgs[name].rule_options)
        r["aux"] = cfgs[name].aux
        r["step_ms"] = step_ms(sae, x0, g0)
        r["train_l0"] = result.metrics.get(name, {}).get("l0", math.nan)
        r["run_dir"] = str(result.run_dirs[name])
        res[name] = r
    res["_meta"] = {"train_s": train_s, "steps": result.steps, "tokens": result.tokens}
    return res


def pick_matched(
    results: dict[str, dict[str, Any]], target_l0: float
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """One row per rule: for grid rules, the variant with eval L0 closest to ``target_l0``."""
    sweeps: dict[str, list[str]] = {}
    for name, r in results.items():
        if "[" in name and not name.startswith("_"):
            sweeps.setdefault(r["rule"], []).append(name)

    def dist(n: str) -> float:
        return abs(math.log(max(results[n]["l0"], 1e-3) / target_l0))

    best = {rule: min(names, key=dist) for rule, names in sweeps.items()}
    table: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        if name.startswith("_") or ("[" in name and best[r["rule"]] != name):
            continue
        table[name] = r
    return table, sweeps


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Train, save, load and evaluate every variant; write ``bench.json`` and ``bench.png``."""
    if cfg.size not in SIZES:
        raise ConfigError(f"unknown bench size {cfg.size!r}; use {', '.join(SIZES)}")
    known = rule_names()
    names = list(cfg.rules) or known
    bad = [r for r in names if r not in known]
    if bad:
        raise ConfigError(f"unknown rule(s) {bad}; known rules: {', '.join(known)}")
    threads = torch.get_num_threads()
    try:
        return _run_bench(cfg, names)
    finally:
        torch.set_num_threads(threads)


def _run_bench(cfg: BenchConfig, names: list[str]) -> dict[str, Any]:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    size = SIZES[cfg.size]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    syn = SyntheticSource(synthetic_config(size, cfg.seed))
    k = max(1, round(syn.expected_l0))
    gw = torch.Generator().manual_seed(cfg.seed + 1)
    weights = torch.exp(torch.randn(size.n_features, generator=gw))
    src = DownstreamGradSource(syn, weights)
    base = base_sae_config(size, k, dead_tokens=max(size.tokens // 20, size.batch_size))
    cfgs = variants(names, base)
    results = _train_and_eval(cfgs, src, syn, size, size.tokens, out / "runs", cfg, src)
    meta = results.pop("_meta")
    table, sweeps = pick_matched(results, k)

    signed: dict[str, Any] = {}
    if cfg.signed and {"topk", "abstopk"} <= set(names):
        syn_s = SyntheticSource(synthetic_config(size, cfg.seed + 1, signed_frac=1.0))
        k_s = max(1, round(syn_s.expected_l0))
        base_s = base_sae_config(size, k_s, dead_tokens=max(size.signed_tokens // 20, 1))
        cfgs_s = {r: replace(base_s, rule=r) for r in ("topk", "abstopk")}
        signed = _train_and_eval(
            cfgs_s, syn_s, syn_s, size, size.signed_tokens, out / "runs_signed", cfg, None
        )
        signed["_meta"]["k"] = k_s
        signed["_meta"]["expected_l0"] = syn_s.expected_l0

    report = {
        "config": to_dict(cfg),
        "size": to_dict(size),
        "synthetic": to_dict(synthetic_config(size, cfg.seed)),
        "expected_l0": syn.expected_l0,
        "k": k,
        "sae": to_dict(base),
        "train": meta,
        "table": table,
        "all_variants": results,
        "sweeps": sweeps,
        "signed": signed,
        "total_s": time.perf_counter() - t_all,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_json(out / "bench.json", json_safe(report))
    plot_bench(report, out / "bench.png")
    if not cfg.keep_runs:
        shutil.rmtree(out / "runs", ignore_errors=True)
        shutil.rmtree(out / "runs_signed", ignore_errors=True)
    return report


COLUMNS = [
    ("l0", "L0", "{:.2f}"),
    ("fve", "FVE", "{:.4f}"),
    ("fvu_down", "FVU_down", "{:.4f}"),
    ("dead_frac", "dead", "{:.3f}"),
    ("mcc", "MCC", "{:.3f}"),
    ("mmcs", "MMCS", "{:.3f}"),
    ("recovery", "recov", "{:.3f}"),
    ("f1", "F1", "{:.3f}"),
    ("step_ms", "ms/step", "{:.1f}"),
]


def format_table(rows: dict[str, dict[str, Any]], columns: list | None = None) -> str:
    """A fixed-width text table of ``rows`` (variant -> metrics)."""
    columns = COLUMNS if columns is None else columns
    w = max([len("variant")] + [len(n) for n in rows]) + 2
    head = "variant".ljust(w) + "".join(h.rjust(10) for _, h, _ in columns)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append(("-" if v is None else fmt.format(v)).rjust(10))
        lines.append(name.ljust(w) + "".join(cells))
    return "\n".join(lines)


def report_text(report: dict[str, Any]) -> str:
    """The printed summary: main table, then the signed-features comparison."""
    parts = [
        f"saekit bench ({report['config']['size']}): {report['size']['n_features']} true features"
        f" in d={report['size']['d']}, d_sae={report['sae']['d_sae']},"
        f" expected true L0 {report['expected_l0']:.2f} -> k={report['k']},"
        f" {report['train']['tokens']} training tokens",
        format_table(report["table"]),
    ]
    if report["signed"]:
        s = {n: r for n, r in report["signed"].items() if not n.startswith("_")}
        parts.append(
            f"\nbidirectional features (every feature +-), k={report['signed']['_meta']['k']}:"
        )
        parts.append(format_table(s, [c for c in COLUMNS if c[0] != "fvu_down"]))
    parts.append(f"\ntotal {report['total_s']:.0f} s on {report['threads']} threads")
    return "\n".join(parts)


def plot_bench(report: dict[str, Any], path: Path) -> None:
    """Four panels: FVE vs L0, MCC, F1 and dead fraction per variant (+ signed MCC)."""
    from saekit.extras import require

    require("matplotlib.ticker", "the bench plot")
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["table"]
    names = list(rows)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    for n in names:
        ax.scatter(rows[n]["l0"], rows[n]["fve"])
        ax.annotate(n, (rows[n]["l0"], rows[n]["fve"]), fontsize=7)
    ax.axvline(report["k"], color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("L0 (eval)")
    ax.set_ylabel("FVE")
    ax.set_title("reconstruction vs sparsity")
    for ax, key, title in [
        (axes[0, 1], "mcc", "MCC (Hungarian |cos|)"),
        (axes[0, 2], "f1", "per-latent F1 vs true firing"),
        (axes[1, 0], "dead_frac", "dead fraction (eval)"),
        (axes[1, 1], "fvu_down", "FVU under the downstream loss"),
    ]:
        vals = [rows[n].get(key) or 0.0 for n in names]
        ax.barh(names, vals)
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    ax = axes[1, 2]
    if report["signed"]:
        s = {n: r for n, r in report["signed"].items() if not n.startswith("_")}
        keys = ["mcc", "f1", "fve"]
        for i, n in enumerate(s):
            ax.bar([j + 0.4 * i for j in range(len(keys))], [s[n][k] for k in keys], 0.4, label=n)
        ax.set_xticks([j + 0.2 for j in range(len(keys))], keys)
        ax.legend()
        ax.set_title("bidirectional features: TopK vs AbsTopK")
    else:
        ax.axis("off")
    fig.suptitle(
        f"saekit bench ({report['config']['size']}): d={report['size']['d']},"
        f" {report['size']['n_features']} features, k={report['k']}"
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
