"""Training on several processes with torch.distributed: ddp, layers, latents.

* :mod:`saekit.distributed.comm`: the communicator rules and losses use (:data:`LOCAL` in
  one process); importing it costs nothing.
* :mod:`saekit.distributed.mesh`: its torch.distributed implementation.
* :mod:`saekit.distributed.strategy`: the strategies the trainer calls.
* :mod:`saekit.distributed.launch`: process-group set-up from torchrun's environment.
"""

from saekit.distributed.comm import LOCAL, Comm

__all__ = ["LOCAL", "Comm"]
