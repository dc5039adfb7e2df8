"""Strategies: how one training run is split over torch.distributed ranks.

The trainer calls a :class:`Strategy` at a few points and holds no strategy-specific code:
which SAEs this rank trains (:meth:`~Strategy.owns`), its part of the data
(:meth:`~Strategy.shard_source`), the SAE it trains (:meth:`~Strategy.prepare_sae`: sets
``sae.comm``, shards latents), gradient synchronisation and clipping, logged rows, and the
checkpoint / final-save exchange, in which only the writer (rank 0) touches the run
directory: every rank sends it its state (:meth:`~Strategy.collect`), it writes one whole
checkpoint, and on resume it sends each rank its part (:meth:`~Strategy.scatter`).

* :class:`Strategy`: one process (every method the plain behaviour).
* :class:`DataParallel` (``ddp``): every rank has every SAE and ``B / world`` tokens.
* :class:`LayerParallel` (``layers``): SAE ``i`` is trained by rank ``i % world``; every rank
  reads the whole stream (activations computed locally).
* :class:`LatentParallel` (``latents``): each SAE's latents are split over ``latent_shards``
  ranks; with ``latent_shards < world`` the rest is data parallel (data x latents).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from saekit.distributed.comm import LOCAL
from saekit.errors import ConfigError, DistributedError

if TYPE_CHECKING:
    from saekit.sae import SAE
    from saekit.sources.base import ActivationSource

#: (SAE state_dict, optimizer state_dict or None)
SlotState = tuple[dict[str, Tensor], dict | None]


class Strategy:
    """One process; also the interface the trainer calls."""

    name = "single"

    def __init__(self) -> None:
        self.rank, self.world = 0, 1

    @property
    def is_writer(self) -> bool:
        """This rank writes the run directory (rank 0)."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What a checkpoint and ``cfg.json`` record about the launch."""
        return {"strategy": self.name, "world_size": self.world}

    def validate(self, batch_size: int, n_saes: int) -> None:
        """Refuse a run this strategy cannot split (ConfigError)."""

    # ------------------------------------------------------------------ data and SAEs
    def shard_source(self, source: ActivationSource) -> ActivationSource:
        return source

    def owns(self, index: int) -> bool:
        """This rank trains SAE ``index`` (its position in the plan)."""
        return True

    def prepare_sae(self, index: int, sae: SAE) -> SAE:
        """The SAE this rank trains for the whole ``sae`` (set up for the strategy)."""
        return sae

    def release_sae(self, sae: SAE) -> None:
        """After training: the SAE works in one process again."""
        sae.comm = LOCAL

    # ------------------------------------------------------------------ one step
    def sync_grads(self, sae: SAE) -> None:
        """Make the gradients those of the global batch (after backward)."""

    def clip_grad_norm_(self, sae: SAE, max_norm: float) -> None:
        """Clip the gradients to ``max_norm``; RuntimeError when they are not finite."""
        torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm, error_if_nonfinite=True)

    def gather_rows(self, rows: list[dict]) -> list[dict]:
        """The writer's view of every rank's logged rows."""
        return rows

    # ------------------------------------------------------------------ state exchange
    def slot_state(
        self, index: int, sae: SAE, opt: torch.optim.Optimizer | None
    ) -> SlotState | None:
        """This rank's contribution to SAE ``index``'s state (None: not needed); the
        optimizer's only when ``opt`` is given."""
        return dict(sae.state_dict()), None if opt is None else opt.state_dict()

    def merge_slots(self, parts: list[dict[int, SlotState | None]]) -> dict[int, SlotState]:
        """Whole slot states from every rank's contributions (on the writer)."""
        return {i: st for i, st in parts[0].items() if st is not None}

    def split_slots(self, slots: dict[int, SlotState], rank: int) -> dict[int, SlotState]:
        """What rank ``rank`` loads of the whole slot states."""
        return slots

    def collect(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on the writer (rank order); None elsewhere."""
        return [obj]

    def scatter(self, objs: list[Any] | None) -> Any:
        """Rank ``r`` gets ``objs[r]`` from the writer (``objs`` is ignored elsewhere)."""
        assert objs is not None
        return objs[0]

    def root(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the writer; its failure is raised on every rank. Returns ``fn()`` on
        the writer, None elsewhere."""
        return fn()

    @contextlib.contextmanager
    def guard(self, last_good: Callable[[], str]) -> Iterator[None]:
        """Add the checkpoint state to a communication failure."""
        yield

    def close(self) -> None:
        """Leave the process group."""


def _cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class _Distributed(Strategy):
    """Common part of the torch.distributed strategies (process group already set up)."""

    def __init__(self, cpu_group: Any = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cpu = cpu_group  # gloo group for object collectives (None: the default group)

    def collect(self, obj: Any) -> list[Any] | None:
        from saekit.distributed.mesh import collective

        out = [None] * self.world if self.is_writer else None
        mine = None if self.is_writer else _cpu(obj)  # the writer's own part is not copied
        with collective("gathering state on rank 0"):
            self.dist.gather_object(mine, out, dst=0, group=self.cpu)
        if out is not None:
            out[0] = obj
        return out

    def scatter(self, objs: list[Any] | None) -> Any:
        from saekit.distributed.mesh import collective

        out: list[Any] = [None]
        with collective("receiving state from rank 0"):
            self.dist.scatter_object_list(
                out, objs if self.is_writer else None, src=0, group=self.cpu
            )
        return out[0]

    def _broadcast(self, obj: Any) -> Any:
        from saekit.distributed.mesh import collective

        box = [obj]
        with collective("waiting for rank 0"):
            self.dist.broadcast_object_list(box, src=0, group=self.cpu)
        return box[0]

    def root(self, fn: Callable[[], Any]) -> Any:
        if not self.is_writer:
            status = self._broadcast(None)
            if status is not None:
                raise DistributedError(f"rank {self.rank}: rank 0 stopped the run: {status}")
            return None
        try:
            result = fn()
        except BaseException as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            with contextlib.suppress(DistributedError):
                self._broadcast(f"{type(e).__name__}: {msg}")
            raise
        self._broadcast(None)
        return result

    @contextlib.contextmanager
    def guard(self, last_good: Callable[[], str]) -> Iterator[None]:
        try:
            yield
        except DistributedError as e:
            raise DistributedError(f"{e}; {last_good()}; relaunch to resume") from e

    def close(self) -> None:
        if self.dist.is_initialized():
            with contextlib.suppress(Exception):
                self.dist.destroy_process_group()


class DataParallel(_Distributed):
    """``ddp``: every rank trains every SAE on its ``B / world`` tokens of each batch."""

    name = "ddp"

    def validate(self, batch_size: int, n_saes: int) -> None:
        if batch_size % self.world:
            raise ConfigError(
                f"--batch-size {batch_size} is not divisible by the {self.world} data-parallel"
                f" ranks: use a multiple of {self.world} (it stays the global batch)"
            )

    def _mesh(self, d_sae: int) -> Any:
        from saekit.distributed.mesh import LOCAL_AXIS, Axis, MeshComm

        every = Axis(None, self.world, self.rank)
        return MeshComm(every, LOCAL_AXIS, every, [d_sae])

    def shard_source(self, source: ActivationSource) -> ActivationSource:
        return source.shard(self.rank, self.world)

    def prepare_sae(self, index: int, sae: SAE) -> SAE:
        sae.comm = self._mesh(sae.d_sae)
        return sae

    def sync_grads(self, sae: SAE) -> None:
        _average_grads(sae, sae.comm.batch)  # type: ignore[attr-defined]

    def slot_state(
        self, index: int, sae: SAE, opt: torch.optim.Optimizer | None
    ) -> SlotState | None:
        return super().slot_state(index, sae, opt) if self.is_writer else None


def _average_grads(sae: SAE, axis: Any) -> None:
    """All-reduce the gradients over ``axis`` (one flat buffer) and divide by its size."""
    if axis.size == 1:
        return
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    if not grads:
        return
    flat = axis.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
    flat /= axis.size
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off : off + n].view_as(g))
        off += n


class LayerParallel(_Distributed):
    """``layers``: SAE ``i`` is trained by rank ``i % world`` (sites of one forward, sweeps)."""

    name = "layers"

    def validate(self, batch_size: int, n_saes: int) -> None:
        if n_saes < self.world:
            raise ConfigError(
                f"--strategy layers splits the SAEs over the ranks, but {n_saes} SAE(s) for"
                f" {self.world} ranks leave ranks idle: launch at most {n_saes} processes, or"
                " use --strategy ddp"
            )

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank

    def gather_rows(self, rows: list[dict]) -> list[dict]:
        parts = self.collect(rows)
        return [r for p in parts for r in p] if parts is not None else []

    def merge_slots(self, parts: list[dict[int, SlotState | None]]) -> dict[int, SlotState]:
        return {i: st for p in parts for i, st in p.items() if st is not None}

    def split_slots(self, slots: dict[int, SlotState], rank: int) -> dict[int, SlotState]:
        return {i: st for i, st in slots.items() if i % self.world == rank}


class LatentParallel(_Distributed):
    """``latents``: latents of every SAE split over ``latent_shards`` ranks (0: all).

    Ranks ``d * L .. d * L + L - 1`` share data part ``d`` and split the latents; ranks with
    the same ``rank % L`` hold the same latents and are data parallel. Only rules with
    ``latent_shardable`` (their selections go through ``ctx.comm``) and the aux-k loss are
    exact; others are refused.
    """

    name = "latents"

    def __init__(self, latent_shards: int = 0, cpu_group: Any = None) -> None:
        super().__init__(cpu_group)
        from saekit.distributed.mesh import LOCAL_AXIS, Axis

        L = latent_shards or self.world
        if L < 1 or self.world % L:
            raise ConfigError(
                f"--latent-shards {latent_shards} must divide the world size {self.world}"
            )
        self.L, self.D = L, self.world // L
        self.l_rank, self.d_rank = self.rank % L, self.rank // L
        self.latent_axis = self._axis([[d * L + i for i in range(L)] for d in range(self.D)])
        self.batch_axis = self._axis([[d * L + i for d in range(self.D)] for i in range(L)])
        self.every = Axis(None, self.world, self.rank)
        self.local_axis = LOCAL_AXIS
        self.dims: dict[int, dict[str, int]] = {}
        self.names: dict[int, list[str]] = {}
        self.d_sae: dict[int, int] = {}

    def _axis(self, groups: list[list[int]]) -> Any:
        from saekit.distributed.mesh import LOCAL_AXIS, Axis

        if len(groups[0]) == 1:
            return LOCAL_AXIS
        if len(groups) == 1:
            return Axis(None, self.world, self.rank)
        mine = None
        for ranks in groups:  # every rank creates every group, in the same order
            g = self.dist.new_group(ranks)
            if self.rank in ranks:
                mine = Axis(g, len(ranks), ranks.index(self.rank))
        return mine

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "latent_shards": self.L}

    def validate(self, batch_size: int, n_saes: int) -> None:
        if batch_size % self.D:
            raise ConfigError(
                f"--batch-size {batch_size} is not divisible by the {self.D} data-parallel"
                f" groups: use a multiple of {self.D}"
            )

    def shard_source(self, source: ActivationSource) -> ActivationSource:
        return source.shard(self.d_rank, self.D)

    def prepare_sae(self, index: int, sae: SAE) -> SAE:
        from saekit.distributed.mesh import MeshComm
        from saekit.distributed.state import latent_dims, shard_range, shard_sizes, slice_state

        _check_shardable(sae, self.L)
        F = sae.d_sae
        lo, hi = shard_range(F, self.L, self.l_rank)
        whole = dict(sae.state_dict())
        with torch.random.fork_rng(devices=[]):
            shard = type(sae)(_replace_d_sae(sae.cfg, hi - lo))
        shard = shard.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype).train(sae.training)
        dims = latent_dims(whole, dict(shard.state_dict()))
        shard.load_state_dict(slice_state(whole, dims, lo, hi))
        self.dims[index] = dims
        self.names[index] = [n for n, _ in shard.named_parameters()]
        self.d_sae[index] = F
        shard.comm = MeshComm(self.batch_axis, self.latent_axis, self.every, shard_sizes(F, self.L))
        return shard

    def sync_grads(self, sae: SAE) -> None:
        _average_grads(sae, self.batch_axis)

    def clip_grad_norm_(self, sae: SAE, max_norm: float) -> None:
        """Global norm: sharded parameters summed over the latent axis, replicated once."""
        sharded = {n for dims in self.dims.values() for n in dims}
        sq_sh = sq_rep = torch.zeros((), dtype=torch.float32, device=sae.W_enc.device)
        grads = []
        for n, p in sae.named_parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            sq = p.grad.detach().float().pow(2).sum()
            if n in sharded:
                sq_sh = sq_sh + sq
            else:
                sq_rep = sq_rep + sq
        total = (sae.comm.latent_sum(sq_sh) + sq_rep).sqrt()
        if not bool(torch.isfinite(total)):
            raise RuntimeError(f"the total norm of the gradients is non-finite ({float(total)})")
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))

    def slot_state(
        self, index: int, sae: SAE, opt: torch.optim.Optimizer | None
    ) -> SlotState | None:
        return super().slot_state(index, sae, opt) if self.d_rank == 0 else None

    def merge_slots(self, parts: list[dict[int, SlotState | None]]) -> dict[int, SlotState]:
        from saekit.distributed.state import cat_optim, cat_state, param_dims

        out = {}
        for i in parts[0]:
            shards = [parts[r][i] for r in range(self.L)]  # data group 0, latent order
            dims = self.dims[i]
            pd = param_dims(self.names[i], dims)
            opts = [s[1] for s in shards]  # type: ignore[index]
            out[i] = (
                cat_state([s[0] for s in shards], dims),  # type: ignore[index]
                None if opts[0] is None else cat_optim(opts, pd),
            )
        return out

    def split_slots(self, slots: dict[int, SlotState], rank: int) -> dict[int, SlotState]:
        from saekit.distributed.state import param_dims, shard_range, slice_optim, slice_state

        out = {}
        for i, (sd, osd) in slots.items():
            lo, hi = shard_range(self.d_sae[i], self.L, rank % self.L)
            dims = self.dims[i]
            pd = param_dims(self.names[i], dims)
            out[i] = (
                slice_state(sd, dims, lo, hi),
                None if osd is None else slice_optim(osd, pd, lo, hi),
            )
        return out


def _replace_d_sae(cfg: Any, d_sae: int) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, d_sae=d_sae, rule_options=dict(cfg.rule_options))


def _check_shardable(sae: SAE, L: int) -> None:
    if not type(sae.rule).latent_shardable:
        raise ConfigError(
            f"rule {sae.cfg.rule!r} cannot have its latents sharded (its selection or loss"
            " needs every latent on one rank): use --strategy ddp or layers"
        )
    if sae.cfg.arch:
        raise ConfigError(
            f"arch {list(sae.cfg.arch)} needs every latent on one rank (prefixes, gates,"
            " skip paths): use --strategy ddp or layers"
        )
    if sae.cfg.aux not in ("auxk", "none"):
        raise ConfigError(
            f"--aux {sae.cfg.aux} ranks every latent and cannot be latent-sharded: use --aux"
            " auxk or none with --strategy latents, or --strategy ddp"
        )
    if sae.d_sae < L:
        raise ConfigError(f"d_sae={sae.d_sae} is smaller than the {L} latent shards")


def resume_ranks(
    saved: dict | None, now: dict[str, Any], ranks: list[dict], where: Any
) -> list[int]:
    """Which saved rank's RNG and data state each rank of this launch resumes from.

    The same strategy and world size: each rank its own (the run continues to the bit).
    Otherwise allowed when every saved rank read the same global stream (equal source
    states; memory, cache and synthetic sources, and layers / latents without data
    parallelism), continuing the run but not to the bit; refused with a ConfigError
    naming the launch to use when the ranks had data parts of their own (ddp on an HF
    model: documents dealt by rank).
    """
    saved = saved or {"strategy": "single", "world_size": 1}
    world = int(now["world_size"])
    if {k: saved.get(k) for k in now} == now:
        return list(range(world))
    key = [json.dumps(r.get("source"), sort_keys=True, default=repr) for r in ranks]
    if len(set(key)) > 1:
        raise ConfigError(
            f"checkpoint {where} was written by {saved['world_size']} rank(s) with --strategy"
            f" {saved['strategy']} whose data positions differ by rank: relaunch with"
            f" --nproc_per_node {saved['world_size']} and --strategy {saved['strategy']}, or"
            " start a new run (another --out-dir, or --resume false)"
        )
    return [q if q < len(ranks) else 0 for q in range(world)]


STRATEGIES = {"ddp": DataParallel, "layers": LayerParallel, "latents": LatentParallel}

__all__ = [
    "STRATEGIES",
    "resume_ranks",
    "DataParallel",
    "LatentParallel",
    "LayerParallel",
    "Strategy",
]
