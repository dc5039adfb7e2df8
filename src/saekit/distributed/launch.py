"""Process-group set-up from torchrun's environment.

``torchrun`` (single node ``--standalone --nproc_per_node N``, or several nodes with
``--nnodes``, ``--node_rank`` and ``--rdzv_endpoint`` / ``--master_addr``) sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`from_env` reads
them. Without them (or with ``WORLD_SIZE=1``) it returns the one-process
:class:`~saekit.distributed.strategy.Strategy` and touches nothing.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from saekit.config import DistConfig
from saekit.distributed.strategy import STRATEGIES, Strategy
from saekit.errors import ConfigError, EnvironmentProblem


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def rank_device(device: str) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK``; others unchanged."""
    dev = torch.device(device)
    if dev.type != "cuda" or dev.index is not None or world_size_from_env() <= 1:
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def from_env(cfg: DistConfig, device: str = "cpu") -> Strategy:
    """Join the process group torchrun described and build ``cfg.strategy`` on it.

    Backend: ``cfg.dist_backend`` (``auto``: nccl when ``device`` is CUDA, else gloo).
    Object collectives (checkpoints, logged rows) use a gloo group beside NCCL. A collective
    that waits longer than ``cfg.dist_timeout`` seconds fails with DistributedError.
    """
    if world_size_from_env() <= 1:
        return Strategy()
    import torch.distributed as dist

    if not dist.is_available():
        raise EnvironmentProblem("this torch build has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not (cuda and dist.is_nccl_available()):
        raise EnvironmentProblem(
            "--dist-backend nccl needs CUDA devices and a torch with NCCL: use --device cuda,"
            " or --dist-backend gloo"
        )
    if cuda:
        torch.cuda.set_device(torch.device(rank_device(device)))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.dist_timeout))
    cpu = None
    if backend != "gloo":
        cpu = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.dist_timeout))
    if cfg.strategy == "latents":
        return STRATEGIES["latents"](cfg.latent_shards, cpu_group=cpu)
    return STRATEGIES[cfg.strategy](cpu_group=cpu)
