"""SAELens's synthetic models (SynthSAEBench, ``sae_lens.synthetic``) as a data source.

``--source saelens_synthetic --synthetic JSON`` (``DataConfig.synthetic``) with

- ``"model"``: ``"synthsaebench-16k"`` (default), a ``SyntheticModelConfig`` dict
  (``SyntheticModelConfig.to_dict()`` form), a saved model directory or a hub id
  (``"repo"`` / ``"repo:subdir"``, ``SyntheticModel.load_from_source``; the released
  SynthSAEBench-16k weights are ``decoderesearch/synth-sae-bench-16k-v1``);
- ``"overrides"``: fields replacing the preset's or the dict's, nested configs merged key
  by key (e.g. ``{"num_features": 1024, "hidden_dim": 128, "hierarchy":
  {"total_root_nodes": 8}}`` for a CPU-sized world of the same recipe);
- ``"block_size"`` (4096) and ``"seed"`` of the sample stream.

``synthsaebench-16k`` is built from the published configuration of SynthSAEBench-16k
(16,384 features in 768 dimensions; Zipfian firing, exponent 0.5, p in [5e-4, 0.4];
hierarchy of 128 roots, branching 4, depth 3, all children mutually exclusive; low-rank
correlations, rank 25, scale 0.1; orthogonalisation, 100 steps at lr 3e-4; mean magnitudes
linear 5.0 -> 4.0; std magnitudes folded normal, mean 0.5, std 0.5) with a fixed seed: the
same recipe as the released world, not its exact weights [our choice: offline].

Samples come in blocks of ``block_size`` drawn by ``SyntheticModel.sample_with_features``
under a per-block torch seed, so the stream is a function of ``(seed, block)`` and resume is
exact (the state is the position). Like :class:`~saekit.sources.synthetic.SyntheticSource`
it exposes ``dictionary`` ``[F, d]``, ``bias`` ``[d]``, ``parent`` (``-1``: root),
``expected_l0`` (measured on the first block) and ``sample_block``, so ``saekit eval`` and
``saekit bench`` measure recovery of the true features. Needs ``sae_lens`` (``pip install
sae-lens``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saekit.errors import ConfigError, EnvironmentProblem
from saekit.sources.base import ActivationSource, Batch

SITE = "synthetic"
PRESETS = ("synthsaebench-16k",)


def _synthetic() -> Any:
    try:
        import sae_lens.synthetic as syn
    except ImportError as e:
        raise EnvironmentProblem(
            "--source saelens_synthetic needs SAELens: pip install sae-lens (or use"
            " --source synthetic, saekit's own generator)"
        ) from e
    return syn


def synthsaebench_16k(seed: int = 42, **overrides: Any) -> Any:
    """The published SynthSAEBench-16k recipe as a ``SyntheticModelConfig``."""
    syn = _synthetic()
    from sae_lens.synthetic.firing_magnitudes import (
        FoldedNormalMagnitudeConfig,
        LinearMagnitudeConfig,
    )
    from sae_lens.synthetic.hierarchy import HierarchyConfig

    fields: dict[str, Any] = dict(
        num_features=16384,
        hidden_dim=768,
        firing_probability=syn.ZipfianFiringProbabilityConfig(
            exponent=0.5, max_prob=0.4, min_prob=5e-4
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=128, branching_factor=4, max_depth=3, mutually_exclusive_portion=1.0
        ),
        correlation=syn.LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        orthogonalization=syn.OrthogonalizationConfig(num_steps=100, lr=3e-4),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        seed=seed,
    )
    fields.update(overrides)
    return syn.SyntheticModelConfig(**fields)


def build_model(options: dict[str, Any]) -> Any:
    """The ``SyntheticModel`` described by ``options["model"]`` (see the module doc)."""
    syn = _synthetic()
    spec = options.get("model", "synthsaebench-16k")
    overrides = dict(options.get("overrides") or {})
    if spec == "synthsaebench-16k":
        spec = synthsaebench_16k().to_dict()
    if isinstance(spec, dict):
        cfg = syn.SyntheticModelConfig.from_dict(_merge(spec, overrides))
        return syn.SyntheticModel(cfg)
    if not isinstance(spec, str):
        raise ConfigError(
            f"synthetic.model must be a preset, a config dict or a path/hub id, got {spec!r}"
        )
    if overrides:
        raise ConfigError(
            "synthetic.overrides apply to a preset or a config dict, not a saved model"
        )
    return syn.SyntheticModel.load_from_source(spec)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s entries, nested dicts merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parents(model: Any, n: int) -> Tensor:
    parent = torch.full((n,), -1, dtype=torch.long)
    hierarchy = getattr(model, "hierarchy", None)

    def walk(node: Any, up: int | None) -> None:
        me = node.feature_index
        if me is not None and up is not None:
            parent[me] = up
        for child in node.children:
            walk(child, me if me is not None else up)

    for root in getattr(hierarchy, "roots", None) or []:
        walk(root, None)
    return parent


class SAELensSyntheticSource(ActivationSource):
    """Samples of a SAELens ``SyntheticModel`` (see the module doc)."""

    def __init__(self, options: dict[str, Any] | None = None, seed: int = 0) -> None:
        opts = dict(options or {})
        unknown = sorted(set(opts) - {"model", "overrides", "block_size", "seed"})
        if unknown:
            raise ConfigError(
                f"synthetic options {unknown} are not saelens_synthetic options (model,"
                " overrides, block_size, seed)"
            )
        self.options = opts
        self.block_size = int(opts.get("block_size", 4096))
        if self.block_size < 1:
            raise ConfigError(f"synthetic.block_size must be >= 1, got {self.block_size}")
        self.stream_seed = int(opts.get("seed", seed))
        self.model = build_model(opts)
        self.sites = [SITE]
        with torch.no_grad():
            fd = self.model.feature_dict
            self.dictionary = fd.feature_vectors.detach().float().clone()
            b = getattr(fd, "bias", None)
            self.bias = torch.zeros(self.dictionary.shape[1]) if b is None else b.detach().float()
        self.parent = _parents(self.model, self.dictionary.shape[0])
        self.pos = 0
        self._block: tuple[int, Tensor, Tensor] | None = None
        self.expected_l0 = float((self.sample_block(0)[1] != 0).sum(-1).float().mean())

    def d_in(self, site: str) -> int:
        if site != SITE:
            raise ConfigError(f"unknown site {site!r}: this source has only {SITE!r}")
        return int(self.dictionary.shape[1])

    def sample_block(self, block: int) -> tuple[Tensor, Tensor]:
        """``(x [block_size, d], codes [block_size, F])`` of stream block ``block``."""
        mix = (self.stream_seed * 0x9E3779B97F4A7C15 + block * 0xBF58476D1CE4E5B9 + 7) % (2**63)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(mix)
            x, codes = self.model.sample_with_features(self.block_size)
        codes = codes.to_dense() if codes.is_sparse else codes
        return x.float(), codes.float()

    def next_batch(self, batch_size: int) -> Batch:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        xs, cs, end = [], [], self.pos + batch_size
        while self.pos < end:
            block, off = divmod(self.pos, self.block_size)
            if self._block is None or self._block[0] != block:
                self._block = (block, *self.sample_block(block))
            take = min(end - self.pos, self.block_size - off)
            xs.append(self._block[1][off : off + take])
            cs.append(self._block[2][off : off + take])
            self.pos += take
        return Batch(acts={SITE: torch.cat(xs)}, meta={"codes": torch.cat(cs)})

    def data_config(self) -> Any:
        """The :class:`~saekit.config.DataConfig` that rebuilds this source."""
        from saekit.config import DataConfig

        return DataConfig(source="saelens_synthetic", sites=[SITE], synthetic=dict(self.options))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "saelens_synthetic", "pos": self.pos, "stream_seed": self.stream_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "saelens_synthetic" or state.get("stream_seed") != self.stream_seed:
            raise ConfigError(f"not the state of this saelens_synthetic source: {state}")
        self.pos = int(state["pos"])


__all__ = ["PRESETS", "SAELensSyntheticSource", "build_model", "synthsaebench_16k"]
