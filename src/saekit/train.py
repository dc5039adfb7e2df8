"""The trainer: one activation stream feeds one or many SAEs, with exact resume.

Recipe (Gao et al. 2024 defaults, all in :class:`~saekit.config.TrainConfig`): Adam,
``lr = 2e-4 / sqrt(d_sae / 16384)`` when ``lr`` is 0 (per SAE), linear warm-up over
``warmup_frac`` of the steps, linear decay to 0 from ``decay_start_frac``, gradient-norm
clipping per SAE, decoder gradient projected (``remove_parallel_grad``) before and rows
renormalised (``normalize_decoder``) after each step; ``init_from_data`` on the first
batch (the encoder scaled so reconstructions start at ``SAEConfig.init_scale`` of the
targets' norm). ``W_dec`` is its own Adam group with ``lr * decoder_lr_scale``
[our choice, default 10: Adam's step is absolute, and SAELens's decoder, initialised at
norm 0.1 with codes rescaled by it, turns its directions 10x faster at the same lr; measured
in ``benchmarks/bench_recipe.py``]. Steps = ``total_tokens // batch_size``. After the last
step, rules that calibrate (``Rule.calibrates``: the batch rules' inference thresholds) see
``calibration_tokens`` of held-back batches drawn from the source (:meth:`Trainer.calibrate`).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saekit import arch, tracking
from saekit.config import DataConfig, SAEConfig, TrainConfig, to_dict
from saekit.device import autocast, autocast_dtype, resolve_device
from saekit.distributed.strategy import SlotState, Strategy, resume_ranks
from saekit.errors import ConfigError, DistributedError, TrainingError
from saekit.evaluate.core import fve
from saekit.io import checkpoint as ckpt
from saekit.io import metrics_log, rundir
from saekit.io.lock import run_lock
from saekit.io.native import save_sae
from saekit.io.paths import check_writable_dir, user_path
from saekit.losses import auto_dead_tokens
from saekit.objective import downstream, init_saes, spliced_loss
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
    #: this process wrote the run directory (False on the other ranks of a torchrun launch,
    #: whose ``saes`` hold only what they trained whole)
    writer: bool = True

    @property
    def sae(self) -> SAE:
        """The SAE, when only one was trained."""
        if len(self.saes) != 1:
            raise ConfigError(f"{len(self.saes)} SAEs were trained; use .saes[name]")
        return next(iter(self.saes.values()))


@dataclass
class _Slot:
    """One SAE being trained and everything that belongs to it."""

    index: int  # position in the plan (checkpoint files, logged order)
    name: str
    site: str
    cfg: SAEConfig  # the whole SAE's config (``sae`` may hold a shard of its latents)
    sae: SAE
    opt: torch.optim.Adam
    base_lr: float
    #: initialise from the first batch (``SAE.init_from_data``): not for a trained SAE
    init_data: bool = True


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

    One SAEConfig: one SAE per source site, named after the site (an architecture may plan
    fewer: a transcoder none at its target sites, a crosscoder one over all,
    :func:`saekit.arch.plan_sites`). A dict maps a name to ``(site, SAEConfig)`` or to a
    SAEConfig (then the name is the site). Every site an SAE reads must be a source site.
    """
    if isinstance(sae_cfgs, SAEConfig):
        plan = {s: (s, sae_cfgs) for s in arch.plan_sites(sae_cfgs, sites)}
        _check_sites(plan, sites)
        return plan
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
    _check_sites(plan, sites)
    return plan


def _check_sites(plan: dict[str, tuple[str, SAEConfig]], sites: list[str]) -> None:
    for name, (site, cfg) in plan.items():
        ins, outs = arch.arch_sites(cfg, site)
        missing = [t for t in (*ins, *outs) if t not in sites]
        if missing:
            raise ConfigError(
                f"SAE {name!r} reads site(s) {missing}, which the source does not produce"
                f" ({sites}); add them to the data's sites (--sites)"
            )


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
        strategy: Strategy | None = None,
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
        self.tracker = tracking.Tracker()  # --log: opened by run()
        self.calibrated = False  # held-back calibration done (after the last step)
        self.cur_factor = 1.0
        self.finished = False  # out_dir held this run, finished: nothing to do
        if train_cfg.threads > 0:
            torch.set_num_threads(train_cfg.threads)
        self._seed(train_cfg.seed)
        self.device = resolve_device(train_cfg.device)
        self.autocast_dtype = autocast_dtype(train_cfg.autocast, self.device)
        self.dtype = getattr(torch, train_cfg.dtype)  # a DTYPES name (validated)
        if train_cfg.init_from:  # fine-tuning: the trained SAE and its config
            sae_cfgs, saes = init_saes(train_cfg.init_from, list(source.sites), self.device)
        self.plan = plan_saes(sae_cfgs, list(source.sites))
        self.strategy = st = strategy or Strategy()
        st.validate(train_cfg.batch_size, len(self.plan))
        if getattr(source, "shard_of", None) is None:
            self.source = st.shard_source(source)
        given = saes or {}
        # every rank builds every SAE in plan order (the same initialisations as one
        # process), then keeps the ones it trains
        built = [self._make_slot(i, n, s, c, given.get(n)) for i, (n, (s, c)) in
                 enumerate(self.plan.items())]  # fmt: skip
        self.sae_cfgs = {b.name: (b.site, b.cfg) for b in built}
        self.slots = [self._own(b) for b in built if st.owns(b.index)]
        del built
        # the named inputs the rules read (e.g. gtopk's "grad"), asked of the source once
        wanted = {name for s in self.slots for name in s.sae.requires}
        self.inputs = self.source.request_inputs(wanted) if wanted else set()
        #: the source's end-to-end loss (TrainConfig.objective kl/ce); None: local losses
        self.objective = downstream(self.source, train_cfg.objective)
        self.source.plan_tokens(self.planned_tokens())

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _seed(seed: int) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def _make_slot(
        self, index: int, name: str, site: str, cfg: SAEConfig, sae: SAE | None
    ) -> _Slot:
        d_in, d_out = arch.widths(cfg, site, self.source.d_in)
        if sae is None:
            sae = SAE(cfg.resolved(d_in, d_out))
        elif (sae.d_in, sae.d_out) != (d_in, d_out):
            raise ConfigError(
                f"SAE {name!r} has d_in={sae.d_in}, d_out={sae.d_out} but its site(s) at"
                f" {site!r} have {d_in}, {d_out}"
            )
        sae = sae.to(device=self.device, dtype=self.dtype).train()
        c = self.cfg
        if sae.cfg.dead_tokens == 0:  # automatic: scaled to this run
            sae.cfg.dead_tokens = auto_dead_tokens(c.total_tokens, c.batch_size)
        base_lr = c.lr if c.lr > 0 else default_lr(sae.d_sae)
        fresh = int(sae.tokens_seen) == 0 and not c.init_from  # a trained SAE keeps its init
        return _Slot(index, name, site, sae.cfg, sae, None, base_lr, fresh)  # type: ignore[arg-type]

    def _own(self, slot: _Slot) -> _Slot:
        """Set up a slot this rank trains: its strategy's SAE and an optimizer."""
        sae = slot.sae = self.strategy.prepare_sae(slot.index, slot.sae)
        c = self.cfg
        # fused Adam (one kernel over all tensors) is ~5x cheaper than the default on CPU
        fused = sae.W_enc.device.type in ("cpu", "cuda")
        slot.opt = torch.optim.Adam(
            sae.param_groups(c.decoder_lr_scale),
            lr=slot.base_lr,
            betas=(c.beta1, c.beta2),
            eps=c.eps,
            fused=fused,
        )
        # the loop drops each step's output, so the [B, d_sae] pre-activation buffer is reused
        sae.reuse_buffers = True
        sae.rule.setup_training(self.total_steps)
        return slot

    def configs(self, form: Callable[[Any], dict] = to_dict) -> dict:
        """The configs a checkpoint must match to be resumed (``form``: see run_configs)."""
        return run_configs(self.cfg, self.data_cfg, self.sae_cfgs, form)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Write ``out_dir/checkpoint`` (one whole checkpoint, by the writer rank)."""
        st = self.strategy
        local = {
            "slots": {s.index: st.slot_state(s.index, s.sae, s.opt) for s in self.slots},
            "rank": {"rng": ckpt.rng_state(self.device), "source": self.source.state_dict()},
        }
        parts = st.collect(local)
        st.root(lambda: self._write_checkpoint(parts))
        self.last_ckpt_step = self.step

    def _write_checkpoint(self, parts: list[dict] | None) -> None:
        assert parts is not None
        slots = self.strategy.merge_slots([p["slots"] for p in parts])
        files: dict[str, dict[str, Tensor]] = {}
        misc: dict[str, Tensor] = {}
        optim = {}
        names = list(self.plan)
        for i, name in enumerate(names):
            sd, osd = slots[i]
            files[f"sae-{i}"] = dict(sd)
            t: dict[str, Tensor] = {}
            optim[name] = ckpt.encode(osd, t, "o")
            files[f"optim-{i}"] = t
        ranks = [p["rank"] for p in parts]
        meta = {
            "step": self.step,
            "tokens": self.tokens,
            "total_steps": self.total_steps,
            "calibrated": self.calibrated,
            "configs": self.configs(),
            "names": names,
            "optim": optim,
            "rng": ckpt.encode(ranks[0]["rng"], misc, "rng"),
            "source": ckpt.encode(ranks[0]["source"], misc, "src"),
            "dist": self.strategy.describe(),
            "last_metrics": self.last_metrics,
        }
        if len(ranks) > 1:  # the other ranks' RNG and data positions
            meta["ranks"] = [ckpt.encode(r, misc, f"rank{q}") for q, r in enumerate(ranks[1:], 1)]
        files["misc"] = misc
        ckpt.write_checkpoint(self.ckpt_dir, files, meta)

    def maybe_resume(self) -> bool:
        """Load ``out_dir/checkpoint`` when resuming and it exists; True if loaded.

        A checkpoint at the last step loads only the SAEs (there is nothing left to train);
        when the final files are there too the run is ``finished``. The writer reads the
        checkpoint and sends every rank its part (``strategy.split_slots``).
        """
        st = self.strategy
        loaded = st.root(self._read_checkpoint)
        packages = None
        if st.is_writer:
            packages = [None if loaded is None else self._package(loaded, q) for q in
                        range(st.world)]  # fmt: skip
        pkg = st.scatter(packages)
        if pkg is None:
            return False
        self.step, self.tokens = pkg["step"], pkg["tokens"]
        self.last_metrics = pkg["last_metrics"]
        self.last_ckpt_step = self.step
        self.finished = pkg["finished"]
        self.calibrated = pkg["calibrated"]
        more = self.step < self.total_steps or self.calibration_pending()
        for s in self.slots:
            sd, osd = pkg["slots"][s.index]
            s.sae.load_state_dict(sd)
            if more:
                s.opt.load_state_dict(ckpt.regroup_optim(osd, s.opt))
                ckpt.match_state_layout(s.opt)
        if more:
            self.source.load_state_dict(pkg["source"])
            ckpt.set_rng_state(pkg["rng"], self.device)
        return True

    def _read_checkpoint(self) -> tuple | None:
        """On the writer: ``(meta, slots, ranks, finished)`` of the checkpoint, or None."""
        for note in rundir.prepare(self.ckpt_dir, self.cfg.resume):
            _note(note)
        if not (self.cfg.resume and ckpt.checkpoint_exists(self.ckpt_dir)):
            moved = metrics_log.set_aside(self.out_dir)
            if moved is not None:
                _note(f"starting afresh: the earlier metrics log is kept as {moved}")
            return None
        meta, files = ckpt.read_checkpoint(self.ckpt_dir)
        now, dflt = json.loads(json.dumps(self.configs())), self.configs(ckpt.field_defaults)
        diff = ckpt.describe_diff(meta.get("configs"), now, defaults=dflt)
        if diff:
            raise ckpt.CheckpointError(
                f"checkpoint {self.ckpt_dir} is from a run with other configs; use another"
                f" out_dir or resume=false. Differences: {'; '.join(diff)}"
            )
        with rundir.checkpoint_fields(self.ckpt_dir):
            saved = list(meta["names"])
            slots: dict[int, SlotState] = {}
            for i, name in enumerate(self.plan):
                j = saved.index(name)
                optim = ckpt.decode(meta["optim"][name], files[f"optim-{j}"])
                slots[i] = (files[f"sae-{j}"], optim)
            misc = files["misc"]
            ranks = [ckpt.decode({"rng": meta["rng"], "source": meta["source"]}, misc)]
            ranks += [ckpt.decode(r, misc) for r in meta.get("ranks", [])]
            step = int(meta["step"])
            self.calibrated = bool(meta.get("calibrated", False))  # sent to every rank
        if step >= self.total_steps and not self.calibration_pending():
            run_dirs = [self._run_dir(n) for n in self.plan]
            return meta, slots, ranks[:1] * self.strategy.world, rundir.is_finished(run_dirs, step)
        order = resume_ranks(meta.get("dist"), self.strategy.describe(), ranks, self.ckpt_dir)
        bad = metrics_log.truncate(self.out_dir / metrics_log.FILE, step)
        if bad:
            _note(f"{self.out_dir / metrics_log.FILE}: skipped unreadable line(s) {bad[:5]}")
        return meta, slots, [ranks[q] for q in order], False

    def _package(self, loaded: tuple, q: int) -> dict:
        """What rank ``q`` loads of a read checkpoint."""
        meta, slots, ranks, finished = loaded
        return {
            "slots": self.strategy.split_slots(slots, q),
            "rng": ranks[q]["rng"],
            "source": ranks[q]["source"],
            "step": int(meta["step"]),
            "tokens": int(meta["tokens"]),
            "last_metrics": dict(meta.get("last_metrics") or {}),
            "finished": finished,
            "calibrated": bool(meta.get("calibrated", False)),
        }

    # ------------------------------------------------------------------ one step
    def _check_finite(self, batch: Batch) -> None:
        read = {t for s in self.slots for t in sum(arch.arch_sites(s.cfg, s.site), [])}
        for site in sorted(read):
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

    def _update(
        self, s: _Slot, x: Tensor, inputs: dict[str, Tensor], lr: float, batch: Batch
    ) -> SAEOutput:
        with self._autocast():
            if self.objective is None:
                loss, terms, out = s.sae.loss(x, inputs=inputs, step=self.step)
            else:  # end to end: spliced into the source's model (saekit.objective)
                loss, terms, out = spliced_loss(
                    self.objective, s.sae, s.site, batch, inputs, self.step, self.cfg.local_coeff
                )
        if not torch.isfinite(loss):
            vals = {k: float(v) for k, v in terms.items()}
            raise TrainingError(
                f"step {self.step}: SAE {s.name!r} (site {s.site!r}) has a non-finite loss"
                f" {vals}; {self._last_good()}"
            )
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.strategy.sync_grads(s.sae)
        s.sae.remove_parallel_grad()
        if self.cfg.grad_clip > 0:
            try:
                self.strategy.clip_grad_norm_(s.sae, self.cfg.grad_clip)
            except DistributedError:
                raise
            except RuntimeError as e:
                raise TrainingError(
                    f"step {self.step}: SAE {s.name!r} has non-finite gradients; "
                    f"{self._last_good()}"
                ) from e
        for group in s.opt.param_groups:
            group["lr"] = lr * s.base_lr * group.get("lr_scale", 1.0)
        s.opt.step()
        s.sae.normalize_decoder()
        s.sae.observe(out.codes, x.shape[0])
        out.extras["loss"] = loss.detach()
        out.extras["terms"] = {k: v.detach() for k, v in terms.items()}
        return out

    def slot_inputs(self, s: _Slot, batch: Batch) -> dict[str, Tensor]:
        """The named inputs one SAE reads from ``batch``: ``batch.inputs[name][s.site]`` for
        each name it requires (on the trainer's device and dtype). The one place an input
        could come from elsewhere in the batch (another site, for a transcoder's target)."""
        got = arch.site_inputs_of(s.cfg, s.site, batch.inputs, s.sae.requires)
        return {n: t.to(self.device, self.dtype) for n, t in got.items()}

    def slot_data(self, s: _Slot, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """What one SAE reads from ``batch``, on the trainer's device and dtype: ``x`` (its
        input sites, :func:`saekit.arch.views`) and its named inputs (:meth:`slot_inputs`,
        and ``"target"`` when it predicts other sites than it reads)."""
        x, target = arch.views(s.cfg, s.site, batch.acts)
        inputs = self.slot_inputs(s, batch)
        if target is not None:
            inputs["target"] = target.to(self.device, self.dtype)
        return x.to(self.device, self.dtype), inputs

    def train_step(self, batch: Batch) -> dict[str, SAEOutput]:
        """One optimisation step of every SAE on ``batch``."""
        self._check_finite(batch)
        factor = lr_factor(
            self.step, self.total_steps, self.cfg.warmup_frac, self.cfg.decay_start_frac
        )
        outs = {}
        for s in self.slots:
            x, inputs = self.slot_data(s, batch)
            if self.step == 0 and s.init_data:
                s.sae.init_from_data(x, inputs.get("target"))
            outs[s.name] = self._update(s, x, inputs, factor, batch)
        self.step += 1
        self.tokens += self.cfg.batch_size
        self.cur_factor = factor
        return outs

    # ------------------------------------------------------------------ logging
    def metrics(self, outs: dict[str, SAEOutput], batch: Batch, rate: float) -> list[dict]:
        """Rows of the global batch for every SAE (in plan order, on the writer)."""
        rows = []
        for s in self.slots:
            out, comm = outs[s.name], s.sae.comm
            x, target = arch.views(s.cfg, s.site, batch.acts)
            x = (x if target is None else target).to(out.x_hat.device)
            dead = comm.latent_sum(s.sae.dead_latents().sum())  # what the aux loss uses
            l0 = comm.batch_sum(comm.latent_sum(out.codes.l0().sum()))
            terms = out.extras["terms"]
            # mean over the batch axis of each rank's values (global when already reduced)
            vals = comm.batch_sum(torch.stack([out.extras["loss"], *terms.values()]).float())
            vals = (vals / comm.batch_world).tolist()
            row: dict[str, Any] = {
                "step": self.step,
                "tokens": self.tokens,
                "sae": s.name,
                "site": s.site,
                "lr": self.cur_factor * s.base_lr,
                "loss": vals[0],
                **dict(zip(terms, vals[1:])),
                "l0": float(l0) / comm.n_tokens(x.shape[0]),
                "fve": fve(x, out.x_hat.detach(), comm),
                "dead_frac": float(dead) / s.cfg.d_sae,
                "tokens_per_s": rate,
            }
            rows.append(row)
        order = {n: i for i, n in enumerate(self.plan)}
        rows_all = sorted(self.strategy.gather_rows(rows), key=lambda r: order[r["sae"]])
        for row in rows_all:
            self.last_metrics[row["sae"]] = {
                k: v for k, v in row.items() if k not in ("sae", "site")
            }
        return rows_all

    def _write_metrics(self, rows: list[dict]) -> None:
        if not self.strategy.is_writer:
            return
        path = self.out_dir / metrics_log.FILE
        with user_path(path), open(path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        self.tracker.log(rows)

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train to the end (or ``stop_after_steps``) and save the final SAE(s).

        Holds ``out_dir``'s lock throughout (a second writer gets a LockedError). A run
        found finished in ``out_dir`` returns its final metrics at once, rewriting nothing.
        """
        with self.strategy.guard(self._last_good), contextlib.ExitStack() as held:

            def lock() -> None:  # on the writer, which alone touches out_dir
                check_writable_dir(self.out_dir, "out_dir")
                held.enter_context(run_lock(self.out_dir))

            self.strategy.root(lock)
            return self._run()

    def _run(self) -> TrainResult:
        from tqdm.auto import tqdm

        self.maybe_resume()
        if self.finished:
            return rundir.finished_result(self._result(self.whole_saes(), completed=True))
        c = self.cfg
        completed = True
        t0, tok0 = time.perf_counter(), self.tokens
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (c.progress and self.strategy.is_writer),
            unit="step",
            dynamic_ncols=True,
            desc="train",
        )
        config = {**self.configs(), "train": to_dict(c)}
        log = c.log if self.strategy.is_writer else "none"  # rank 0 alone tracks
        track = tracking.open_tracker(log, self.out_dir, config, self.step, c.log_project)
        with bar, track as self.tracker:
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
                    if rows:
                        r = rows[0]
                        bar.set_postfix(
                            loss=f"{r['loss']:.4g}", L0=f"{r['l0']:.1f}", FVE=f"{r['fve']:.3f}"
                        )
                if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint()
                if c.stop_after_steps and self.step >= c.stop_after_steps:
                    if self.last_ckpt_step != self.step:
                        self.save_checkpoint()
                    # like a kill after a checkpoint
                    return self._result(self.whole_saes(), completed=False)
        calibrated_now = completed and self.calibrate()
        self.strategy.root(self._warn_if_worse)
        if self.last_ckpt_step != self.step or calibrated_now:
            self.save_checkpoint()
        saes = self.whole_saes()
        self.strategy.root(lambda: self.save_final(saes))
        return self._result(saes, completed=completed)

    def planned_tokens(self) -> int:
        """Tokens the run draws from its source: the steps' and the held-back batches'."""
        bs = self.cfg.batch_size
        return bs * (self.total_steps + (self.calibration_batches() if self._calibrates() else 0))

    def calibration_batches(self) -> int:
        """Held-back batches drawn after training for the rules that calibrate."""
        n = self.cfg.calibration_tokens
        if n < 0:
            n = min(DEFAULT_CALIBRATION_TOKENS, self.cfg.total_tokens // 4)
            n = max(4 * self.cfg.batch_size, n)
        return -(-n // self.cfg.batch_size)

    def _warn_if_worse(self, drop: float = 0.05) -> None:
        metrics_log.warn_if_worse(self.out_dir / metrics_log.FILE, drop)

    def calibration_pending(self) -> bool:
        """Some rule of the plan calibrates and has not yet been calibrated in this run.

        Decided over the whole plan, so that every rank (each holding some of the SAEs
        under ``layers``) draws the same held-back batches and writes the same checkpoints.
        """
        return self._calibrates() and not self.calibrated and self.calibration_batches() > 0

    def _calibrates(self) -> bool:
        from saekit.rules import get_rule_class

        return any(get_rule_class(c.rule).calibrates for _, c in self.sae_cfgs.values())

    @torch.no_grad()
    def calibrate(self) -> bool:
        """After the last step: rules with ``calibrates`` set their inference state on
        held-back batches drawn from the source (never trained on). True if it ran.

        Nothing else changes, so a run killed here resumes from its last checkpoint and
        draws the same batches again: the result equals an uninterrupted run.
        """
        from saekit.rules import get_rule_class

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
                s.sae.calibrate_batch(self.slot_data(s, batch)[0])
            got += 1
        for s in slots:
            s.sae.end_calibration()
            s.sae.train()
        for name, (_, cfg) in self.sae_cfgs.items():
            if get_rule_class(cfg.rule).calibrates:
                self.last_metrics.setdefault(name, {})["calibration_tokens"] = got * bs
        if got == 0:
            warnings.warn(
                "the source had no batch left for calibration: batch rules keep the"
                " inference thresholds tracked during training",
                stacklevel=2,
            )
        self.calibrated = True
        return True

    def _run_dir(self, name: str) -> Path:
        return self.out_dir if len(self.plan) == 1 else self.out_dir / _dir_name(name)

    def whole_saes(self) -> dict[str, SAE]:
        """The trained SAEs, whole and for one process: every SAE on the writer (gathered
        from the ranks that train it), the ones a rank holds whole elsewhere."""
        st = self.strategy
        whole = {s.index: s.sae for s in self.slots if s.sae.d_sae == s.cfg.d_sae}
        for s in self.slots:
            st.release_sae(s.sae)
        send = {s.index: st.slot_state(s.index, s.sae, None) for s in self.slots
                if s.index not in whole or not st.is_writer}  # fmt: skip
        parts = st.collect(send)
        if parts is not None and st.world > 1:
            for i, (sd, _) in st.merge_slots(parts).items():
                if i not in whole:
                    whole[i] = self._rebuild(i, sd)
        names = list(self.plan)
        return {names[i]: whole[i] for i in sorted(whole)}

    def _rebuild(self, index: int, state: dict[str, Tensor]) -> SAE:
        """SAE ``index`` whole from its gathered state, on the CPU (it may not fit a device)."""
        with torch.random.fork_rng(devices=[]):
            sae = SAE(self.sae_cfgs[list(self.plan)[index]][1])
        sae = sae.to(dtype=self.dtype)
        sae.load_state_dict(state)
        return sae

    def save_final(self, saes: dict[str, SAE] | None = None) -> None:
        """Write every SAE's run directory (``saes``: from :meth:`whole_saes`)."""
        saes = self.whole_saes() if saes is None else saes
        for name, (site, _) in self.sae_cfgs.items():
            extra = {
                "name": name,
                "site": site,
                "train": to_dict(self.cfg),
                "data": None if self.data_cfg is None else to_dict(self.data_cfg),
                "steps": self.step,
                "tokens": self.tokens,
                "final_metrics": self.last_metrics.get(name, {}),
            }
            if self.strategy.world > 1:
                extra["dist"] = self.strategy.describe()
            save_sae(saes[name], self._run_dir(name), extra)

    def _result(self, saes: dict[str, SAE], completed: bool) -> TrainResult:
        return TrainResult(
            saes=saes,
            run_dirs={n: self._run_dir(n) for n in self.plan},
            out_dir=self.out_dir,
            steps=self.step,
            tokens=self.tokens,
            metrics=dict(self.last_metrics),
            completed=completed,
            writer=self.strategy.is_writer,
        )


def run_configs(
    train_cfg: TrainConfig,
    data_cfg: DataConfig | None,
    saes: dict[str, tuple[str, SAEConfig]],
    form: Callable[[Any], dict] = to_dict,
) -> dict:
    """The configs a checkpoint records and must match to be resumed (resolved SAE configs);
    ``form=checkpoint.field_defaults`` gives the same tree of the fields' defaults."""
    train = {k: v for k, v in form(train_cfg).items() if k not in RESUMABLE_TRAIN_FIELDS}
    data = None
    if data_cfg is not None:
        data = {k: v for k, v in form(data_cfg).items() if k not in RESUMABLE_DATA_FIELDS}
    slots = {n: {"site": site, "sae": form(c)} for n, (site, c) in saes.items()}
    return {"saes": slots, "train": train, "data": data}


def train(
    sae_cfgs: SAEConfig | dict[str, Any],
    train_cfg: TrainConfig,
    source: ActivationSource,
    data_cfg: DataConfig | None = None,
    saes: dict[str, SAE] | None = None,
    strategy: Strategy | None = None,
) -> TrainResult:
    """Train SAE(s) on ``source``; see :class:`Trainer`. ``saes``: pre-built SAEs by name;
    ``strategy``: how to split the run over ranks (saekit.distributed.launch.from_env)."""
    return Trainer(sae_cfgs, train_cfg, source, data_cfg, saes, strategy).run()


__all__ = [
    "TrainResult",
    "run_configs",
    "Trainer",
    "TrainingError",
    "default_lr",
    "lr_factor",
    "plan_saes",
    "train",
]


def _note(msg: str) -> None:
    print(f"saekit: note: {msg}", file=sys.stderr)
