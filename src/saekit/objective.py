"""Training objectives: what the trainer minimises for each SAE.

* ``local`` (the default): the SAE's own loss (:meth:`saekit.sae.SAE.loss`): the
  reconstruction of its target plus its rule's, architecture's and aux terms.
* ``kl`` / ``ce``: end to end (Braun et al. 2024; sparsify's ``--loss_fn kl|ce``): the SAE is
  spliced into the frozen model's forward in place of what it reconstructs (a transcoder in
  place of its target site) and the loss is the model's downstream loss: KL(clean ‖ spliced)
  of the next-token distributions, or the next-token cross-entropy. Gradients flow through the
  downstream layers into the SAE. The SAE's reconstruction terms (``recon``, Matryoshka's
  ``recon_m*``) are dropped, or kept times ``TrainConfig.local_coeff`` (Braun et al.'s
  local-MSE variant); its other terms (sparsity penalties, aux-k) stay [our choice: an L1
  rule needs its penalty; sparsify keeps only the downstream loss, its TopK needing none].
  Each SAE of a run is spliced alone (its own forward) [our choice: a run trains several
  SAEs at one site, a sweep, which must not be spliced together; sparsify splices all its
  hookpoints at once].

The downstream loss comes from the source (:class:`Downstream`, e.g.
:class:`saekit.sources.e2e.SplicedLM` from :meth:`saekit.sources.hf.HFSource.objective`):
the trainer knows nothing of language models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from torch import Tensor

from saekit.arch import arch_sites
from saekit.config import SAEConfig
from saekit.errors import ConfigError
from saekit.sae import SAE, SAEOutput
from saekit.sources.base import ActivationSource, Batch

OBJECTIVES = ("local", "kl", "ce")


class Downstream(Protocol):
    """A source's downstream loss with a function spliced in (see the module docstring)."""

    name: str

    def __call__(
        self, batch: Batch, reads: list[str], writes: list[str], fn: Callable[[Tensor], Tensor]
    ) -> Tensor: ...


def downstream(source: ActivationSource, name: str) -> Downstream | None:
    """The source's downstream loss ``name`` (None for ``local``); asked before any batch."""
    if name == "local":
        return None
    get = getattr(source, "objective", None)
    if get is None:
        raise ConfigError(
            f"TrainConfig.objective={name!r} (--objective) needs a source that runs a causal"
            f" LM (--source hf, one process); {type(source).__name__} has none: use"
            " --objective local"
        )
    return get(name)


def spliced_loss(
    obj: Downstream,
    sae: SAE,
    site: str,
    batch: Batch,
    inputs: Mapping[str, Tensor],
    step: int,
    local_coeff: float,
) -> tuple[Tensor, dict[str, Tensor], SAEOutput]:
    """``(total, terms, out)`` of ``sae`` (planned at ``site``) trained end to end on ``batch``;
    ``inputs``: its named inputs (``target`` included), rows as in ``batch.acts``."""
    reads, writes = arch_sites(sae.cfg, site)
    got: dict[str, Any] = {}

    def fn(rows: Tensor) -> Tensor:
        _, terms, out = sae.loss(rows.to(sae.W_enc.dtype), inputs=inputs, step=step)
        got["terms"], got["out"] = terms, out
        return out.x_hat

    down = obj(batch, reads, writes, fn)
    if "out" not in got:
        raise ConfigError(f"the {obj.name} objective never reached the sites {writes}")
    terms: dict[str, Tensor] = {}
    for k, v in got["terms"].items():
        if not k.startswith("recon"):
            terms[k] = v
        elif local_coeff > 0:
            terms[k] = local_coeff * v
    terms[obj.name] = down
    total = sum(terms.values(), down.new_zeros(()))
    return total, terms, got["out"]


def init_saes(
    spec: str, sites: list[str], device: Any = "cpu"
) -> tuple[dict[str, tuple[str, SAEConfig]], dict[str, SAE]]:
    """The plan and the SAE of a fine-tuning run (``TrainConfig.init_from``): the trained SAE
    at ``spec`` (anything :func:`saekit.io.native.load_sae` reads: a run directory, a peer
    format, a hub spec), planned at its recorded site, or at the one site the run's sites
    allow for it."""
    from saekit.arch import plan_sites
    from saekit.io.native import open_sae
    from saekit.sources.sites import canonical_site

    sae, meta = open_sae(spec, device=str(device), train=True)
    site = ""
    if meta.get("format") == "saekit":
        from saekit.io.native import read_run_info

        site = read_run_info(meta["path"]).site
    site = site or canonical_site(str(meta.get("hook_name") or ""))
    if site not in sites:
        options = plan_sites(sae.cfg, sites)
        if len(options) != 1:
            raise ConfigError(
                f"TrainConfig.init_from={spec!r}: its SAE was trained at {site or 'an unknown'}"
                f" site, not among the run's sites {sites}; give --sites with that site"
            )
        site = options[0]
    return {site: (site, sae.cfg)}, {site: sae}
