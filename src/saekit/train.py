"""The trainer: one activation stream feeds one or many SAEs, with exact resume.

Recipe (Gao et al. 2024 defaults, all in :class:`~saekit.config.TrainConfig`): Adam,
``lr = 2e-4 / sqrt(d_sae / 16384)`` when ``lr`` is 0 (per SAE), linear warm-up over
``warmup_frac`` of the steps, linear decay to 0 from ``decay_start_frac``, gradient-norm
clipping per SAE, decoder gradient projected (``remove_parallel_grad``) before and rows
renormalised (``normalize_decoder``) after each step; ``init_from_data`` on the first
batch. Steps = ``total_tokens // batch_size``. After the last step, rules that calibrate
(``Rule.calibrates``: the batch rules' inference thresholds) see ``calibration_tokens`` of
held-back batches drawn from the source (:meth:`Trainer.calibrate`).

Checkpoints (``out_dir/checkpoint``, every ``checkpoint_every`` steps and at the end) hold
the SAEs' weights and buffers, the optimizer states, the torch / Python / NumPy RNG states,
the source's ``state_dict`` and the configs, so that a run resumed from step N ends with
weights equal to the bit to an uninterrupted run (same device, same torch build). A
non-finite activation or loss stops the run with :class:`TrainingError` before any update
of that step and without touching the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saekit.config import DataConfig, SAEConfig, TrainConfig, to_dict
from saekit.device import autocast, autocast_dtype, resolve_device
from saekit.errors import ConfigError, TrainingError
from saekit.evaluate.core import fve
from saekit.inputs import site_inputs
from saekit.io import checkpoint as ckpt
from saekit.io import metrics_log, rundir
from saekit.io.lock import run_lock
from saekit.io.native import save_sae
from saekit.io.paths import check_writable_dir, user_path
from saekit.losses import auto_dead_tokens
from saekit.options import fields_where, validate
from saekit.sae import SAE, SAEOutput
from saekit.sources.base import ActivationSource, Batch

#: config fields that may change between a checkpoint and its resumption (declared on the
#: fields as ``resumable=True``)
RESUMABLE_TRAIN_FIELDS = fields_where(TrainConfig, "resumable")
RESUMABLE_DATA_FIELDS = fields_where(DataConfig, "resumable")
#: held-back tokens for calibration when TrainConfig.calibration_tokens is -1 (at most a
#: quarter of total_tokens, at least 4 batches): measured on synthetic data, 2k tokens leave
#: the inference L0 ~4% off k, 16k ~1%
DEFAULT_CALIBRATION_TOKENS = 65_536


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    saes: dict[str, SAE]
    run_dirs: dict[str, Path]
    out_dir: Path
    steps: int
    tokens: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    completed: bool = True  # False when stopped by stop_after_steps or an exhausted source
    already_finished: bool = False  # True when out_dir held this finished run: nothing redone

    @property
    def sae(self) -> SAE:
        """The SAE, when only one was trained."""
        if len(self.saes) != 1:
            raise ConfigError(f"{len(self.saes)} SAEs were trained; use .saes[name]")
        return next(iter(self.saes.values()))


@dataclass
class _Slot:
    """One SAE being trained and everything that belongs to it."""

    name: str
    site: str
    sae: SAE
    opt: torch.optim.Adam
    base_lr: float
    run_dir: Path


def default_lr(d_sae: int) -> float:
    """Gao et al.'s scaling: ``2e-4 / sqrt(d_sae / 16384)``."""
    return 2e-4 / math.sqrt(d_sae / 16384)


def lr_factor(step: int, total: int, warmup_frac: float, decay_start_frac: float) -> float:
    """Multiplier of the base lr at 0-based ``step``: linear warm-up, then linear decay to 0."""
    warm = int(round(warmup_frac * total))
    if warm > 0 and step < warm:
        return (step + 1) / warm
    start = int(decay_start_frac * total)
    if decay_start_frac < 1.0 and step >= start:
        return max(0.0, (total - step) / max(total - start, 1))
    return 1.0


def plan_saes(
    sae_cfgs: SAEConfig | dict[str, Any], sites: list[str]
) -> dict[str, tuple[str, SAEConfig]]:
    """``name -> (site, SAEConfig)``.

    One SAEConfig: one SAE per source site, named after the site. A dict maps a name to
    ``(site, SAEConfig)`` or to a SAEConfig (then the name is the site).
    """
    if isinstance(sae_cfgs, SAEConfig):
        return {s: (s, sae_cfgs) for s in sites}
    if not isinstance(sae_cfgs, dict) or not sae_cfgs:
        raise ConfigError("sae_cfgs must be a SAEConfig or a non-empty dict name -> config")
    plan: dict[str, tuple[str, SAEConfig]] = {}
    for name, v in sae_cfgs.items():
        if isinstance(v, SAEConfig):
            site, cfg = name, v
        elif isinstance(v, (tuple, list)) and len(v) == 2 and isinstance(v[1], SAEConfig):
            site, cfg = v
        else:
            raise ConfigError(f"sae_cfgs[{name!r}] must be a SAEConfig or (site, SAEConfig)")
        if site not in sites:
            raise ConfigError(f"SAE {name!r}: site {site!r} is not produced by the source {sites}")
        plan[name] = (site, cfg)
    return plan


def _dir_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name) or "sae"


class Trainer:
    """Trains several SAEs on one activation source; see the module docstring."""

    def __init__(
        self,
        sae_cfgs: SAEConfig | dict[str, Any],
        train_cfg: TrainConfig,
        source: ActivationSource,
        data_cfg: DataConfig | None = None,
        saes: dict[str, SAE] | None = None,
    ) -> None:
        if not isinstance(train_cfg, TrainConfig):
            raise ConfigError(f"train_cfg must be a TrainConfig, got {type(train_cfg).__name__}")
        if data_cfg is not None and not isinstance(data_cfg, DataConfig):
            raise ConfigError(f"data_cfg must be a DataConfig, got {type(data_cfg).__name__}")
        # fields are checked on assignment; this also sees in-place edits of lists / dicts
        validate(train_cfg)
        if data_cfg is not None:
            validate(data_cfg)
        self.cfg, self.source, self.data_cfg = train_cfg, source, data_cfg
        self.out_dir = Path(train_cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoint"
        self.total_steps = train_cfg.total_tokens // train_cfg.batch_size
        self.step = 0
        self.tokens = 0
        self.last_ckpt_step: int | None = None
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.calibrated = False  # held-back calibration done (after the last step)
        self.cur_factor = 1.0
        self.finished = False  # out_dir held this run, finished: nothing to do
        if train_cfg.threads > 0:
            torch.set_num_threads(train_cfg.threads)
        self._seed(train_cfg.seed)
        self.device = resolve_device(train_cfg.device)
        self.autocast_dtype = autocast_dtype(train_cfg.autocast, self.device)
        self.dtype = getattr(torch, train_cfg.dtype)  # a DTYPES name (validated)
        self.plan = plan_saes(sae_cfgs, list(source.sites))
        given = saes or {}
        self.slots = [self._make_slot(n, s, c, given.get(n)) for n, (s, c) in self.plan.items()]
        # the named inputs the rules read (e.g. gtopk's "grad"), asked of the source once
        wanted = {name for s in self.slots for name in s.sae.rule.requires}
        self.inputs = source.request_inputs(wanted) if wanted else set()

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _seed(seed: int) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def _make_slot(self, name: str, site: str, cfg: SAEConfig, sae: SAE | None) -> _Slot:
        d_in = self.source.d_in(site)
        if sae is None:
            sae = SAE(cfg.resolved(d_in))
        elif sae.d_in != d_in:
            raise ConfigError(f"SAE {name!r} has d_in={sae.d_in} but site {site!r} has {d_in}")
        sae = sae.to(device=self.device, dtype=self.dtype).train()
        c = self.cfg
        if sae.cfg.dead_tokens == 0:  # automatic: scaled to this run
            sae.cfg.dead_tokens = auto_dead_tokens(c.total_tokens, c.batch_size)
        base_lr = c.lr if c.lr > 0 else default_lr(sae.d_sae)
        # fused Adam (one kernel over all tensors) is ~5x cheaper than the default on CPU
        fused = sae.W_enc.device.type in ("cpu", "cuda")
        opt = torch.optim.Adam(
            sae.parameters(), lr=base_lr, betas=(c.beta1, c.beta2), eps=c.eps, fused=fused
        )
        # the loop drops each step's output, so the [B, d_sae] pre-activation buffer is reused
        sae.reuse_buffers = True
        sae.rule.setup_training(self.total_steps)
        run_dir = self.out_dir if len(self.plan) == 1 else self.out_dir / _dir_name(name)
        return _Slot(name, site, sae, opt, base_lr, run_dir)

    def configs(self) -> dict:
        """The configs a checkpoint must match to be resumed."""
        train = {k: v for k, v in to_dict(self.cfg).items() if k not in RESUMABLE_TRAIN_FIELDS}
        data = None
        if self.data_cfg is not None:
            data = {
                k: v for k, v in to_dict(self.data_cfg).items() if k not in RESUMABLE_DATA_FIELDS
            }
        saes = {s.name: {"site": s.site, "sae": to_dict(s.sae.cfg)} for s in self.slots}
        return {"saes": saes, "train": train, "data": data}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        files: dict[str, dict[str, Tensor]] = {}
        misc: dict[str, Tensor] = {}
        optim = {}
        for i, s in enumerate(self.slots):
            files[f"sae-{i}"] = dict(s.sae.state_dict())
            t: dict[str, Tensor] = {}
            optim[s.name] = ckpt.encode(s.opt.state_dict(), t, "o")
            files[f"optim-{i}"] = t
        rng = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {
            "step": self.step,
            "tokens": self.tokens,
            "total_steps": self.total_steps,
            "calibrated": self.calibrated,
            "configs": self.configs(),
            "names": [s.name for s in self.slots],
            "optim": optim,
            "rng": ckpt.encode(rng, misc, "rng"),
            "source": ckpt.encode(self.source.state_dict(), misc, "src"),
            "last_metrics": self.last_metrics,
        }
        files["misc"] = misc
        ckpt.write_checkpoint(self.ckpt_dir, files, meta)
        self.last_ckpt_step = self.step

    def maybe_resume(self) -> bool:
        """Load ``out_dir/checkpoint`` when resuming and it exists; True if loaded.

        A checkpoint at the last step loads only the SAEs (there is nothing left to train);
        when the final files are there too the run is ``finished``.
        """
        for note in rundir.prepare(self.ckpt_dir, self.cfg.resume):
            _note(note)
        if not (self.cfg.resume and ckpt.checkpoint_exists(self.ckpt_dir)):
            moved = metrics_log.set_aside(self.out_dir)
            if moved is not None:
                _note(f"starting afresh: the earlier metrics log is kept as {moved}")
            return False
        meta, files = ckpt.read_checkpoint(self.ckpt_dir)
        diff = ckpt.describe_diff(meta.get("configs"), json.loads(json.dumps(self.configs())))
        if diff:
            raise ckpt.CheckpointError(
                f"checkpoint {self.ckpt_dir} is from a run with other configs; use another"
                f" out_dir or resume=false. Differences: {'; '.join(diff)}"
            )
        with rundir.checkpoint_fields(self.ckpt_dir):
            for i, s in enumerate(self.slots):
                s.sae.load_state_dict(files[f"sae-{i}"])
            self.step, self.tokens = int(meta["step"]), int(meta["tokens"])
            self.calibrated = bool(meta.get("calibrated", False))
            self.last_metrics = dict(meta.get("last_metrics") or {})
            self.last_ckpt_step = self.step
            if self.step >= self.total_steps and not self.calibration_pending():
                self.finished = rundir.is_finished([s.run_dir for s in self.slots], self.step)
                return True
            for i, s in enumerate(self.slots):
                s.opt.load_state_dict(ckpt.decode(meta["optim"][s.name], files[f"optim-{i}"]))
                _match_state_layout(s.opt)
            self.source.load_state_dict(ckpt.decode(meta["source"], files["misc"]))
            rng = ckpt.decode(meta["rng"], files["misc"])
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        bad = metrics_log.truncate(self.out_dir / metrics_log.FILE, self.step)
        if bad:
            _note(f"{self.out_dir / metrics_log.FILE}: skipped unreadable line(s) {bad[:5]}")
        return True

    # ------------------------------------------------------------------ one step
    def _check_finite(self, batch: Batch) -> None:
        for site in {s.site for s in self.slots}:
            if site not in batch.acts:
                raise TrainingError(f"step {self.step}: the batch has no activations for {site!r}")
            x = batch.acts[site]
            if not torch.isfinite(x).all():
                n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
                raise TrainingError(
                    f"step {self.step}: non-finite activations at site {site!r} ({n_nan} NaN,"
                    f" {n_inf} Inf of {x.numel()} values); {self._last_good()}"
                )

    def _last_good(self) -> str:
        if self.last_ckpt_step is None:
            return "no checkpoint was written yet"
        return f"last good checkpoint: {self.ckpt_dir} (step {self.last_ckpt_step})"

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.autocast_dtype, self.device)

    def _update(self, s: _Slot, x: Tensor, inputs: dict[str, Tensor], lr: float) -> SAEOutput:
        with self._autocast():
            loss, terms, out = s.sae.loss(x, inputs=inputs, step=self.step)
        if not torch.isfinite(loss):
            vals = {k: float(v) for k, v in terms.items()}
            raise TrainingError(
                f"step {self.step}: SAE {s.name!r} (site {s.site!r}) has a non-finite loss"
                f" {vals}; {self._last_good()}"
            )
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        s.sae.remove_parallel_grad()
        if self.cfg.grad_clip > 0:
            try:
                torch.nn.utils.clip_grad_norm_(
                    s.sae.parameters(), self.cfg.grad_clip, error_if_nonfinite=True
                )
            except RuntimeError as e:
                raise TrainingError(
                    f"step {self.step}: SAE {s.name!r} has non-finite gradients; "
                    f"{self._last_good()}"
                ) from e
        for group in s.opt.param_groups:
            group["lr"] = lr * s.base_lr
        s.opt.step()
        s.sae.normalize_decoder()
        s.sae.observe(out.codes, x.shape[0])
        out.extras["loss"] = loss.detach()
        out.extras["terms"] = {k: v.detach() for k, v in terms.items()}
        return out

    def train_step(self, batch: Batch) -> dict[str, SAEOutput]:
        """One optimisation step of every SAE on ``batch``."""
        self._check_finite(batch)
        factor = lr_factor(
            self.step, self.total_steps, self.cfg.warmup_frac, self.cfg.decay_start_frac
        )
        outs = {}
        for s in self.slots:
            x = batch.acts[s.site].to(self.device, self.dtype)
            inputs = site_inputs(batch.inputs, s.site, s.sae.rule.requires)
            inputs = {n: t.to(self.device, self.dtype) for n, t in inputs.items()}
            if self.step == 0:
                s.sae.init_from_data(x)
            outs[s.name] = self._update(s, x, inputs, factor)
        self.step += 1
        self.tokens += self.cfg.batch_size
        self.cur_factor = factor
        return outs

    # ------------------------------------------------------------------ logging
    def metrics(self, outs: dict[str, SAEOutput], batch: Batch, rate: float) -> list[dict]:
        rows = []
        for s in self.slots:
            out = outs[s.name]
            x = batch.acts[s.site].to(out.x_hat.device)
            dead = s.sae.dead_latents()  # what the aux loss uses
            row: dict[str, Any] = {
                "step": self.step,
                "tokens": self.tokens,
                "sae": s.name,
                "site": s.site,
                "lr": self.cur_factor * s.base_lr,
                "loss": float(out.extras["loss"]),
                **{k: float(v) for k, v in out.extras["terms"].items()},
                "l0": float(out.codes.l0().float().mean()),
                "fve": fve(x, out.x_hat.detach()),
                "dead_frac": float(dead.float().mean()),
                "tokens_per_s": rate,
            }
            rows.append(row)
            self.last_metrics[s.name] = {k: v for k, v in row.items() if k not in ("sae", "site")}
        return rows

    def _write_metrics(self, rows: list[dict]) -> None:
        path = self.out_dir / metrics_log.FILE
        with user_path(path), open(path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train to the end (or ``stop_after_steps``) and save the final SAE(s).

        Holds ``out_dir``'s lock throughout (a second writer gets a LockedError). A run
        found finished in ``out_dir`` returns its final metrics at once, rewriting nothing.
        """
        check_writable_dir(self.out_dir, "out_dir")
        with run_lock(self.out_dir):
            return self._run()

    def _run(self) -> TrainResult:
        from tqdm.auto import tqdm

        self.maybe_resume()
        if self.finished:
            return rundir.finished_result(self._result(completed=True))
        c = self.cfg
        completed = True
        t0, tok0 = time.perf_counter(), self.tokens
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not c.progress,
            unit="step",
            dynamic_ncols=True,
            desc="train",
        )
        with bar:
            while self.step < self.total_steps:
                try:
                    batch = self.source.next_batch(c.batch_size)
                except StopIteration:
                    completed = False
                    break
                outs = self.train_step(batch)
                bar.update(1)
                if self.step % max(c.log_every, 1) == 0 or self.step == self.total_steps:
                    dt = max(time.perf_counter() - t0, 1e-9)
                    rows = self.metrics(outs, batch, (self.tokens - tok0) / dt)
                    t0, tok0 = time.perf_counter(), self.tokens
                    self._write_metrics(rows)
                    r = rows[0]
                    bar.set_postfix(
                        loss=f"{r['loss']:.4g}", L0=f"{r['l0']:.1f}", FVE=f"{r['fve']:.3f}"
                    )
                if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint()
                if c.stop_after_steps and self.step >= c.stop_after_steps:
                    if self.last_ckpt_step != self.step:
                        self.save_checkpoint()
                    return self._result(completed=False)  # like a kill after a checkpoint
        calibrated_now = completed and self.calibrate()
        if self.last_ckpt_step != self.step or calibrated_now:
            self.save_checkpoint()
        self.save_final()
        return self._result(completed=completed)

    def calibration_batches(self) -> int:
        """Held-back batches drawn after training for the rules that calibrate."""
        n = self.cfg.calibration_tokens
        if n < 0:
            n = min(DEFAULT_CALIBRATION_TOKENS, self.cfg.total_tokens // 4)
            n = max(4 * self.cfg.batch_size, n)
        return -(-n // self.cfg.batch_size)

    def calibration_pending(self) -> bool:
        """Some rule calibrates and has not yet been calibrated in this run."""
        wanted = any(s.sae.rule.calibrates for s in self.slots)
        return wanted and not self.calibrated and self.calibration_batches() > 0

    @torch.no_grad()
    def calibrate(self) -> bool:
        """After the last step: rules with ``calibrates`` set their inference state on
        held-back batches drawn from the source (never trained on). True if it ran.

        Nothing else changes, so a run killed here resumes from its last checkpoint and
        draws the same batches again: the result equals an uninterrupted run.
        """
        if not self.calibration_pending():
            self.calibrated = True
            return False
        slots = [s for s in self.slots if s.sae.rule.calibrates]
        n = self.calibration_batches()
        for s in slots:
            s.sae.eval()
            s.sae.begin_calibration()
        got, bs = 0, self.cfg.batch_size
        for _ in range(n):
            try:
                batch = self.source.next_batch(bs)
            except StopIteration:
                break
            self._check_finite(batch)
            for s in slots:
                s.sae.calibrate_batch(batch.acts[s.site].to(self.device, self.dtype))
            got += 1
        for s in slots:
            s.sae.end_calibration()
            s.sae.train()
            self.last_metrics.setdefault(s.name, {})["calibration_tokens"] = got * bs
        if got == 0:
            warnings.warn(
                "the source had no batch left for calibration: batch rules keep the"
                " inference thresholds tracked during training",
                stacklevel=2,
            )
        self.calibrated = True
        return True

    def save_final(self) -> None:
        for s in self.slots:
            extra = {
                "name": s.name,
                "site": s.site,
                "train": to_dict(self.cfg),
                "data": None if self.data_cfg is None else to_dict(self.data_cfg),
                "steps": self.step,
                "tokens": self.tokens,
                "final_metrics": self.last_metrics.get(s.name, {}),
            }
            save_sae(s.sae, s.run_dir, extra)

    def _result(self, completed: bool) -> TrainResult:
        return TrainResult(
            saes={s.name: s.sae for s in self.slots},
            run_dirs={s.name: s.run_dir for s in self.slots},
            out_dir=self.out_dir,
            steps=self.step,
            tokens=self.tokens,
            metrics=dict(self.last_metrics),
            completed=completed,
        )


def train(
    sae_cfgs: SAEConfig | dict[str, Any],
    train_cfg: TrainConfig,
    source: ActivationSource,
    data_cfg: DataConfig | None = None,
    saes: dict[str, SAE] | None = None,
) -> TrainResult:
    """Train SAE(s) on ``source``; see :class:`Trainer`. ``saes``: pre-built SAEs by name."""
    return Trainer(sae_cfgs, train_cfg, source, data_cfg, saes).run()


__all__ = [
    "TrainResult",
    "Trainer",
    "TrainingError",
    "default_lr",
    "lr_factor",
    "plan_saes",
    "train",
]


def _note(msg: str) -> None:
    print(f"saekit: note: {msg}", file=sys.stderr)


def _match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Give restored optimizer moments their parameter's strides.

    Checkpoints store tensors contiguous; a parameter kept in another layout (``W_enc`` is
    latent-major) would then disagree with its moments, which fused Adam reads as flat memory.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            for key, v in opt.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][key] = torch.empty_like(p, dtype=v.dtype).copy_(v)
