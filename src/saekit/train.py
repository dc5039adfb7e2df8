"""The trainer: one activation stream feeds one or many SAEs, with exact resume.

Recipe (Gao et al. 2024 defaults, all in :class:`~saekit.config.TrainConfig`): Adam,
``lr = 2e-4 / sqrt(d_sae / 16384)`` when ``lr`` is 0 (per SAE), linear warm-up over
``warmup_frac`` of the steps, linear decay to 0 from ``decay_start_frac``, gradient-norm
clipping per SAE, decoder gradient projected (``remove_parallel_grad``) before and rows
renormalised (``normalize_decoder``) after each step; ``init_from_data`` on the first
batch. Steps = ``total_tokens // batch_size``.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saekit.config import DataConfig, SAEConfig, TrainConfig, to_dict
from saekit.errors import ConfigError, TrainingError
from saekit.io import checkpoint as ckpt
from saekit.io.atomic import write_bytes
from saekit.io.native import save_sae
from saekit.io.paths import check_writable_dir, user_path
from saekit.options import fields_where, validate
from saekit.sae import SAE, SAEOutput
from saekit.sources.base import ActivationSource, Batch

#: config fields that may change between a checkpoint and its resumption (declared on the
#: fields as ``resumable=True``)
RESUMABLE_TRAIN_FIELDS = fields_where(TrainConfig, "resumable")
RESUMABLE_DATA_FIELDS = fields_where(DataConfig, "resumable")


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


def fve(x: Tensor, x_hat: Tensor) -> float:
    """``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the batch."""
    x, x_hat = x.float(), x_hat.float()
    num = (x - x_hat).pow(2).sum()
    den = (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return float(1 - num / den)


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
        self.cur_factor = 1.0
        if train_cfg.threads > 0:
            torch.set_num_threads(train_cfg.threads)
        self._seed(train_cfg.seed)
        self.device = torch.device(train_cfg.device)
        self.dtype = getattr(torch, train_cfg.dtype)  # a DTYPES name (validated)
        self.plan = plan_saes(sae_cfgs, list(source.sites))
        given = saes or {}
        self.slots = [self._make_slot(n, s, c, given.get(n)) for n, (s, c) in self.plan.items()]

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
        base_lr = c.lr if c.lr > 0 else default_lr(sae.d_sae)
        # fused Adam (one kernel over all tensors) is ~5x cheaper than the default on CPU
        fused = sae.W_enc.device.type in ("cpu", "cuda")
        opt = torch.optim.Adam(
            sae.parameters(), lr=base_lr, betas=(c.beta1, c.beta2), eps=c.eps, fused=fused
        )
        # the loop drops each step's output, so the [B, d_sae] pre-activation buffer is reused
        sae.reuse_buffers = True
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
            "configs": self.configs(),
            "names": [s.name for s in self.slots],
            "optim": optim,
            "rng": ckpt.encode(rng, misc, "rng"),
            "source": ckpt.encode(self.source.state_dict(), misc, "src"),
        }
        files["misc"] = misc
        ckpt.write_checkpoint(self.ckpt_dir, files, meta)
        self.last_ckpt_step = self.step

    def maybe_resume(self) -> bool:
        """Load ``out_dir/checkpoint`` when resuming and it exists; True if loaded."""
        if not (self.cfg.resume and ckpt.checkpoint_exists(self.ckpt_dir)):
            return False
        meta, files = ckpt.read_checkpoint(self.ckpt_dir)
        diff = ckpt.describe_diff(meta.get("configs"), json.loads(json.dumps(self.configs())))
        if diff:
            raise ckpt.CheckpointError(
                f"checkpoint {self.ckpt_dir} is from a run with other configs; use another"
                f" out_dir or resume=false. Differences: {'; '.join(diff)}"
            )
        for i, s in enumerate(self.slots):
            s.sae.load_state_dict(files[f"sae-{i}"])
            s.opt.load_state_dict(ckpt.decode(meta["optim"][s.name], files[f"optim-{i}"]))
            _match_state_layout(s.opt)
        self.source.load_state_dict(ckpt.decode(meta["source"], files["misc"]))
        rng = ckpt.decode(meta["rng"], files["misc"])
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step, self.tokens = int(meta["step"]), int(meta["tokens"])
        self.last_ckpt_step = self.step
        self._truncate_metrics()
        return True

    def _truncate_metrics(self) -> None:
        """Drop metrics lines written after the checkpoint we resume from."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    keep.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by the kill
        write_bytes(path, "".join(keep).encode())

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
        if self.cfg.autocast == "bfloat16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _update(self, s: _Slot, x: Tensor, g: Tensor | None, lr: float) -> SAEOutput:
        with self._autocast():
            loss, terms, out = s.sae.loss(x, grad=g, step=self.step)
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
            g = batch.grads.get(s.site)
            g = None if g is None else g.to(self.device, self.dtype)
            if self.step == 0:
                s.sae.init_from_data(x)
            outs[s.name] = self._update(s, x, g, factor)
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
            # dead: silent for dead_tokens, or for the whole run while it is shorter
            window = min(s.sae.cfg.dead_tokens, int(s.sae.tokens_seen))
            dead = s.sae.tokens_since_fired >= window
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
        path = self.out_dir / "metrics.jsonl"
        with user_path(path), open(path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train to the end (or ``stop_after_steps``) and save the final SAE(s)."""
        from tqdm.auto import tqdm

        check_writable_dir(self.out_dir, "out_dir")
        self.maybe_resume()
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
        if self.last_ckpt_step != self.step:
            self.save_checkpoint()
        self.save_final()
        return self._result(completed=completed)

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
    "fve",
    "lr_factor",
    "plan_saes",
    "train",
]


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
