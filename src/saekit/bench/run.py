"""Train, save, reload and evaluate every variant, seed after seed.

Per seed ``s``: one :class:`~saekit.sources.synthetic.SyntheticSource` (structure seed
``s + 1000``, so the true dictionary never equals an SAE init under the training seed ``s``)
trains every variant at once through :func:`saekit.train.train` (each batch is generated
once and fed to all SAEs; same width ``d_sae = n_features``, same Adam lr, input
normalisation, ``aux_k = min(512, d_sae/2)``, the automatic dead window and the same initial
weights). Each trained SAE is saved, then evaluated by :func:`saekit.evaluate.evaluate_run`
on its run directory, exactly as ``saekit eval RUN`` would (held-out samples of the same
generator; rules that require the named input ``grad``, such as gtopk, get the synthetic
downstream-loss gradient there as in training). The table aggregates the seeds.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from saekit.bench.config import BenchConfig, BenchSize
from saekit.bench.report import aggregate, plot_bench
from saekit.bench.variants import pick_matched, rule_of, variants
from saekit.config import DataConfig, SAEConfig, TrainConfig, to_dict
from saekit.errors import ConfigError
from saekit.inputs import site_inputs
from saekit.io import load_sae
from saekit.io.atomic import json_safe, write_json
from saekit.rules import rule_names
from saekit.sae import SAE
from saekit.sources.synthetic import SITE, SyntheticConfig, SyntheticSource

#: the data generator's seed is the bench seed plus this, never the training seed: with equal
#: seeds and shapes, torch's global generator would initialise the SAE decoder with the very
#: Gaussian draw the true dictionary starts from
DATA_SEED_OFFSET = 1000

Log = Callable[[str], None]


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


def base_sae_config(size: BenchSize, k: int) -> SAEConfig:
    """Settings shared by every variant (only ``rule``, ``rule_options`` and ``aux`` differ)."""
    return SAEConfig(
        d_sae=size.n_features, k=k, aux_k=min(512, size.n_features // 2), normalize_input=True
    )


def step_ms(sae: SAE, x: torch.Tensor, inputs: dict, reps: int = 3) -> float:
    """Mean wall time of one forward + backward of the public training loss, in ms."""
    sae.train()
    fire = sae.fire_freq.clone()
    sae.loss(x, inputs=inputs)[0].backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        sae.zero_grad(set_to_none=True)
        sae.loss(x, inputs=inputs)[0].backward()
    sae.zero_grad(set_to_none=True)
    sae.fire_freq.copy_(fire)
    sae.eval()
    return 1000 * (time.perf_counter() - t0) / reps


#: (section of eval.json's "sae", key) of each bench metric
EVAL_KEYS = {
    "l0": ("core", "l0"),
    "fve": ("core", "fve"),
    "dead_frac": ("core", "dead_frac"),
    "dead_frac_train": ("core", "dead_frac_train"),
    "dense_frac": ("core", "dense_frac"),
    "mcc": ("ground_truth", "mcc"),
    "mmcs": ("ground_truth", "mmcs"),
    "recovery": ("ground_truth", "recovery"),
    "f1": ("detection", "f1"),
    "precision": ("detection", "precision"),
    "recall": ("detection", "recall"),
    "absorption": ("absorption", "absorption"),
    "fvu_down": ("downstream", "fvu_down"),
}


def eval_row(run_dir: Path, size: BenchSize) -> dict[str, Any]:
    """The bench metrics of one run directory, from :func:`saekit.evaluate.evaluate_run`."""
    from saekit.evaluate import EvalConfig, evaluate_run

    cfg = EvalConfig(tokens=size.eval_tokens, baselines=False, plots=False)
    ev = evaluate_run(run_dir, cfg=cfg)["sae"]
    return {m: ev.get(sec, {}).get(key) for m, (sec, key) in EVAL_KEYS.items()}


def _train_and_eval(
    cfgs: dict[str, SAEConfig],
    syn: Any,
    size: BenchSize,
    tokens: int,
    out_dir: Path,
    cfg: BenchConfig,
    seed: int,
    log: Log,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    from saekit.train import train

    tc = TrainConfig(
        out_dir=str(out_dir),
        total_tokens=tokens,
        batch_size=size.batch_size,
        lr=size.lr,
        seed=seed,
        log_every=max(tokens // size.batch_size // 20, 1),
        checkpoint_every=0,
        threads=cfg.threads,
        progress=cfg.progress,
        resume=False,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    saes = {}
    for n, c in cfgs.items():  # the same initial weights for every variant of the run
        torch.manual_seed(seed)
        saes[n] = SAE(c.resolved(syn.d_in(SITE)))
    # recorded in each run's cfg.json, so that `saekit eval RUN` rebuilds the ground truth
    if hasattr(syn, "data_config"):  # a SAELens synthetic model
        data_cfg = syn.data_config()
    else:
        data_cfg = DataConfig(source="synthetic", sites=[SITE], synthetic=to_dict(syn.cfg))
    log(f"  training {len(cfgs)} SAEs together on {tokens:,} tokens ({', '.join(cfgs)})")
    t0 = time.perf_counter()
    result = train({n: (SITE, c) for n, c in cfgs.items()}, tc, syn, data_cfg=data_cfg, saes=saes)
    train_s = time.perf_counter() - t0
    log(f"  trained in {train_s:.0f} s; evaluating on {size.eval_tokens:,} held-out tokens")
    b = syn.next_batch(size.batch_size)  # after training: a batch to time one step on
    res: dict[str, dict[str, Any]] = {}
    for name in cfgs:
        run_dir = result.run_dirs[name]
        r = eval_row(run_dir, size)
        sae = load_sae(run_dir)
        ins = site_inputs(b.inputs, SITE, sae.requires)
        r.update(
            rule=rule_of(name),
            options=dict(cfgs[name].rule_options),
            aux=cfgs[name].aux,
            arch=list(cfgs[name].arch),
            step_ms=step_ms(sae, b.acts[SITE], ins),
            train_l0=result.metrics.get(name, {}).get("l0"),
            run_dir=str(run_dir),
        )
        res[name] = r
        log(f"    {name:28s} L0 {r['l0']:7.2f}  FVE {r['fve']:.3f}  MCC {r['mcc']:.3f}")
    meta = {"train_s": train_s, "steps": result.steps, "tokens": result.tokens}
    return res, meta


def _source(cfg: BenchConfig, size: BenchSize, seed: int) -> Any:
    """The training stream of one seed: saekit's generator, or a SAELens synthetic model."""
    if cfg.saelens:
        from saekit.sources.saelens_synthetic import SAELensSyntheticSource

        return SAELensSyntheticSource(cfg.saelens, seed=seed + DATA_SEED_OFFSET)
    return SyntheticSource(synthetic_config(size, seed))


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_bench(cfg: BenchConfig, log: Log | None = None) -> dict[str, Any]:
    """Train, save, reload and evaluate every variant over ``cfg.seeds``; write
    ``OUT/bench.json`` and ``OUT/bench.png``; return the report. ``log``: progress lines
    (default: stderr unless ``cfg.quiet``)."""
    known = rule_names()
    names = list(cfg.rules) or known
    bad = [r for r in names if r not in known]
    if bad:
        raise ConfigError(f"unknown rule(s) {bad}; known rules: {', '.join(known)}")
    if log is None:
        log = (lambda _m: None) if cfg.quiet else _stderr
    threads = torch.get_num_threads()
    try:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        return _run(cfg, names, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: BenchConfig, names: list[str], log: Log) -> dict[str, Any]:
    size = cfg.sized()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    seeds: dict[str, dict[str, Any]] = {}
    tables, signed_tables = [], []
    for i, seed in enumerate(cfg.seeds):
        syn = _source(cfg, size, seed)
        if cfg.saelens:  # the widths follow the model
            size = replace(size, n_features=syn.dictionary.shape[0], d=syn.dictionary.shape[1])
        k = max(1, round(syn.expected_l0))
        log(
            f"seed {seed} ({i + 1}/{len(cfg.seeds)}): expected true L0 {syn.expected_l0:.2f}, k={k}"
        )
        base = base_sae_config(size, k)
        cfgs = variants(names, base, cfg.aux_variants, cfg.grids, cfg.arch_variants)
        results, meta = _train_and_eval(
            cfgs, syn, size, size.tokens, out / "runs" / f"seed{seed}", cfg, seed, log
        )
        table, sweeps = pick_matched(results, k)
        tables.append(table)
        entry: dict[str, Any] = {
            "sae": to_dict(base),
            "synthetic": dict(cfg.saelens) or to_dict(syn.cfg),
            "expected_l0": syn.expected_l0,
            "k": k,
            "train": meta,
            "table": table,
            "all_variants": results,
            "sweeps": sweeps,
        }
        signed_rules = list(cfg.signed_rules)
        if cfg.signed and signed_rules and set(signed_rules) <= set(names) and not cfg.saelens:
            syn_s = SyntheticSource(synthetic_config(size, seed + 1, signed_frac=1.0))
            k_s = max(1, round(syn_s.expected_l0))
            log(f"  signed features: {', '.join(signed_rules)} at k={k_s}")
            base_s = base_sae_config(size, k_s)
            cfgs_s = {r: replace(base_s, rule=r) for r in signed_rules}
            out_s = out / "runs_signed" / f"seed{seed}"
            res_s, meta_s = _train_and_eval(
                cfgs_s, syn_s, size, size.signed_tokens, out_s, cfg, seed, log
            )
            signed_tables.append(res_s)
            entry["signed"] = {
                "k": k_s,
                "expected_l0": syn_s.expected_l0,
                "train": meta_s,
                "table": res_s,
            }
        seeds[str(seed)] = entry
    report = {
        "config": to_dict(cfg),
        "size": to_dict(size),
        "seeds": seeds,
        "table": aggregate(tables),
        "signed": aggregate(signed_tables) if signed_tables else {},
        "total_s": time.perf_counter() - t_all,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_json(out / "bench.json", json_safe(report))
    plot_bench(report, out / "bench.png")
    if not cfg.keep_runs:
        shutil.rmtree(out / "runs", ignore_errors=True)
        shutil.rmtree(out / "runs_signed", ignore_errors=True)
    log(f"done in {report['total_s']:.0f} s")
    return report
