"""Synthetic activations with a known dictionary (SynthSAEBench-style ground truth).

Data-generating process (Chanin & Garriga-Alonso's SynthSAEBench, scaled down by default):

- **Dictionary** ``[n_features, d]``: unit Gaussian directions, then ``ortho_steps``
  gradient steps ``W -= ortho_lr · C_off W`` (C_off: off-diagonal cosines; the gradient of
  the summed squared overlaps up to a constant), rows re-normalised after each step. At the
  default size this lowers the mean max |cos| only from 0.300 to 0.282 (random directions
  are already near the Welch bound), so the default is a cheap 25 steps.
- **Firing probabilities**: ``p_i ∝ (i + 1) ** -zipf_exponent`` (feature 0 most frequent),
  min-max rescaled to ``[p_min, p_max]``.
- **Correlation**: Gaussian copula. ``z = F u + sqrt(1 - |F_i|^2) e`` with ``F`` of rank
  ``corr_rank`` and entries ``N(0, corr_scale^2)`` (rows clipped to norm 0.95), so each
  ``z_i`` is exactly standard normal; feature i fires when ``z_i > Φ⁻¹(1 - p_i)``. This
  applies to hierarchy roots and to features outside the hierarchy.
- **Hierarchy**: ``n_roots`` trees of ``branching`` children per node and ``depth`` levels
  (roots included), on a seeded random subset of features assigned in breadth-first order
  to ascending indices (parents are more frequent than their children). A child fires only
  when its parent fires; with ``mutually_exclusive`` at most one sibling fires (one uniform
  draw per parent picks a child or none), else siblings are independent. Compensation:
  the conditional probability is ``q_c = min(1, p_c / p_parent)``, scaled down so that
  sibling ``q`` sum to at most 1 when exclusive; the resulting exact marginals are
  ``p_marginal`` (the expected L0 is their sum).
- **Magnitudes**: mean falls linearly with index from ``mag_mean_max`` to ``mag_mean_min``;
  per-feature std ``|N(mag_std_mean, mag_std_std)|``; value ``ReLU(mean + std · n)``. With
  ``scale_children_by_parent`` a child's value is multiplied by ``|parent value| / parent
  mean`` (level by level). ``signed_frac`` of the features (seeded choice, ``signed``) get a
  random ± sign per sample (bidirectional features, e.g. for AbsTopK).
- **Output**: ``x = codes @ dictionary + bias``, ``bias`` a random direction of norm ``bias``.

The structure (dictionary, probabilities, hierarchy) depends only on ``SyntheticConfig.seed``;
the sample stream on ``stream_seed`` (default: the config seed). Samples are generated in
fixed blocks of ``block_size``, each from its own generator seeded by ``(stream_seed,
block)``, so sample ``t`` of the stream is the same whatever the batch sizes were.
``meta["codes"]`` holds the dense true coefficients ``[B, n_features]`` (``return_codes``).

Named input ``grad`` (on request, :meth:`SyntheticSource.request_inputs`; e.g. for gtopk):
``dL/dx`` of a synthetic downstream loss ``L(x) = 1/2 sum_i w_i (d_i . (x - bias))^2``, ``d_i``
the true features and ``w_i`` log-normal importances fixed by the config seed, i.e.
``(x - bias) M`` with ``M = D^T diag(w) D`` (:attr:`SyntheticSource.downstream_metric`), a
stand-in for a language model's loss gradient whose metric is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saekit.errors import ConfigError
from saekit.options import Options, fail, from_dict, option, validate
from saekit.sources.base import ActivationSource, Batch

SITE = "synthetic"
#: the downstream loss's importances are seeded by the config seed plus this
DOWNSTREAM_SEED_OFFSET = 7919


@dataclass
class SyntheticConfig(Options):
    """Ground-truth generator options (defaults: 1024 features in d=128, fast on CPU)."""

    n_features: int = option(1024, "number of true features (dictionary rows)", ge=1)
    d: int = option(128, "activation width", ge=1)
    zipf_exponent: float = option(0.5, "firing probabilities ∝ (i + 1) ** -zipf_exponent", ge=0)
    p_min: float = option(5e-4, "smallest firing probability", gt=0, le=1)
    p_max: float = option(0.4, "largest firing probability", gt=0, le=1)
    corr_rank: int = option(25, "rank of the Gaussian-copula correlation factor", ge=0)
    corr_scale: float = option(0.1, "std of the correlation factor's entries", ge=0)
    n_roots: int = option(16, "hierarchy trees (0: no hierarchy)", ge=0)
    branching: int = option(4, "children per hierarchy node", ge=1)
    depth: int = option(3, "hierarchy levels, roots included", ge=0)
    mutually_exclusive: bool = option(True, "at most one sibling fires")
    scale_children_by_parent: bool = option(
        True, "a child's value is scaled by |parent value| / parent mean"
    )
    mag_mean_max: float = option(5.0, "mean magnitude of feature 0")
    mag_mean_min: float = option(4.0, "mean magnitude of the last feature")
    mag_std_mean: float = option(0.5, "mean of the per-feature magnitude std")
    mag_std_std: float = option(0.5, "std of the per-feature magnitude std", ge=0)
    bias: float = option(0.5, "norm of the constant bias added to every sample", ge=0)
    ortho_steps: int = option(25, "decorrelation steps on the dictionary", ge=0)
    ortho_lr: float = option(0.03, "step size of the decorrelation", ge=0)
    signed_frac: float = option(0.0, "fraction of features with a random ± sign", ge=0, le=1)
    seed: int = option(0, "structure seed (dictionary, probabilities, hierarchy)", ge=0)
    block_size: int = option(4096, "samples per generator block", ge=1)
    return_codes: bool = option(True, "put the true codes in batch.meta['codes']")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyntheticConfig:
        return from_dict(cls, data, where="synthetic options")

    def n_hierarchy(self) -> int:
        """Features in the hierarchy."""
        if self.n_roots <= 0 or self.depth <= 0:
            return 0
        return self.n_roots * sum(self.branching**level for level in range(self.depth))

    def check(self) -> None:
        if self.p_min > self.p_max:
            fail(
                "SyntheticConfig",
                "p_min",
                self.p_min,
                f"exceeds p_max = {self.p_max}",
                "set p_min <= p_max",
            )
        if self.n_hierarchy() > self.n_features:
            per_root = self.n_hierarchy() // self.n_roots
            fail(
                "SyntheticConfig",
                "n_roots",
                self.n_roots,
                f"needs {self.n_hierarchy()} features in the hierarchy but n_features ="
                f" {self.n_features}",
                f"set n_roots <= {self.n_features // per_root} (each root brings {per_root}"
                " features), or n_roots=0 for no hierarchy",
            )


def _normal_icdf(p: Tensor) -> Tensor:
    return torch.special.ndtri(p)


class SyntheticSource(ActivationSource):
    """Endless synthetic activations at site ``"synthetic"`` (see the module doc)."""

    def __init__(self, cfg: SyntheticConfig | None = None, stream_seed: int | None = None) -> None:
        self.cfg = cfg = cfg or SyntheticConfig()
        validate(cfg)
        self.sites = [SITE]
        self.stream_seed = cfg.seed if stream_seed is None else stream_seed
        n, d = cfg.n_features, cfg.d
        # mixed, so that the dictionary never equals an SAE initialised with torch.manual_seed(seed)
        g = torch.Generator().manual_seed((cfg.seed * 0x9E3779B97F4A7C15 + 0x5AE5EED) % (2**63))
        self.dictionary = self._make_dictionary(g)
        rank = torch.arange(1, n + 1, dtype=torch.float64)
        raw = rank ** (-cfg.zipf_exponent)
        span = raw.max() - raw.min()
        unit = (raw - raw.min()) / span if span > 0 else torch.ones(n, dtype=torch.float64)
        self.p_target = (cfg.p_min + (cfg.p_max - cfg.p_min) * unit).float()
        self.mag_mean = torch.linspace(cfg.mag_mean_max, cfg.mag_mean_min, n)
        self.mag_std = (cfg.mag_std_mean + cfg.mag_std_std * torch.randn(n, generator=g)).abs()
        self.signed = torch.zeros(n, dtype=torch.bool)
        n_signed = round(cfg.signed_frac * n)
        if n_signed:
            self.signed[torch.randperm(n, generator=g)[:n_signed]] = True
        direction = torch.randn(d, generator=g)
        self.bias = direction / direction.norm() * cfg.bias
        if cfg.corr_rank > 0:
            f = torch.randn(n, cfg.corr_rank, generator=g) * cfg.corr_scale
            norms = f.norm(dim=1, keepdim=True)
            self.corr_factor = f * (0.95 / norms).clamp(max=1.0)
        else:
            self.corr_factor = torch.zeros(n, 0)
        self._build_hierarchy(g)
        self.pos = 0
        self._block: tuple[int, Tensor, Tensor] | None = None
        self._with_grad = False
        gw = torch.Generator().manual_seed(cfg.seed + DOWNSTREAM_SEED_OFFSET)
        #: importances ``w_i`` of the downstream loss (see the module doc)
        self.downstream_weights = torch.exp(torch.randn(n, generator=gw))
        #: ``M = D^T diag(w) D`` [d, d]: the downstream loss's metric on errors
        self.downstream_metric = self.dictionary.T @ (
            self.downstream_weights[:, None] * self.dictionary
        )

    def downstream_grad(self, x: Tensor) -> Tensor:
        """``dL/dx = (x - bias) M`` of the downstream loss, ``[B, d]``."""
        return (x - self.bias) @ self.downstream_metric

    def request_inputs(self, names) -> set[str]:
        """Supply the named input ``"grad"`` with every batch when asked."""
        if "grad" in names:
            self._with_grad = True
        return set(names) & {"grad"}

    # ------------------------------------------------------------ structure
    def _make_dictionary(self, g: torch.Generator) -> Tensor:
        cfg = self.cfg
        w = torch.randn(cfg.n_features, cfg.d, generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        for _ in range(cfg.ortho_steps if cfg.n_features > 1 else 0):
            cos = w @ w.T
            cos.fill_diagonal_(0)
            w = w - cfg.ortho_lr * (cos @ w)
            w = w / w.norm(dim=1, keepdim=True)
        return (w / w.norm(dim=1, keepdim=True)).contiguous()

    def _build_hierarchy(self, g: torch.Generator) -> None:
        cfg, n = self.cfg, self.cfg.n_features
        self.parent = torch.full((n,), -1, dtype=torch.long)
        self.level = torch.full((n,), -1, dtype=torch.long)  # -1: not in the hierarchy
        self.p_marginal = self.p_target.clone()
        # per level >= 1: (parents [n_p], children [n_p, branching], q [n_p, branching])
        self._levels: list[tuple[Tensor, Tensor, Tensor]] = []
        m = cfg.n_hierarchy()
        if m == 0:
            return
        nodes = torch.randperm(n, generator=g)[:m].sort().values
        start, width = 0, cfg.n_roots
        prev = nodes[:width]
        self.level[prev] = 0
        for lev in range(1, cfg.depth):
            start += width
            width *= cfg.branching
            kids = nodes[start : start + width].view(-1, cfg.branching)
            self.parent[kids] = prev[:, None].expand_as(kids)
            self.level[kids] = lev
            q = (self.p_target[kids] / self.p_marginal[prev][:, None]).clamp(max=1.0)
            if cfg.mutually_exclusive:
                q = q / q.sum(dim=1, keepdim=True).clamp(min=1.0)
            self.p_marginal[kids] = self.p_marginal[prev][:, None] * q
            self._levels.append((prev, kids, q))
            prev = kids.reshape(-1)
        self.is_child = self.parent >= 0

    @property
    def expected_l0(self) -> float:
        """Expected number of non-zero true coefficients per sample."""
        return float(self.p_marginal.sum())

    def d_in(self, site: str) -> int:
        if site != SITE:
            raise ConfigError(f"unknown site {site!r}: the synthetic source has only {SITE!r}")
        return self.cfg.d

    # ------------------------------------------------------------- sampling
    def _block_gen(self, block: int) -> torch.Generator:
        mix = (self.stream_seed * 0x9E3779B97F4A7C15 + block * 0xBF58476D1CE4E5B9 + 1) % (2**63)
        return torch.Generator().manual_seed(mix)

    def sample_block(self, block: int) -> tuple[Tensor, Tensor]:
        """``(x [block_size, d], codes [block_size, n_features])`` of stream block ``block``."""
        cfg = self.cfg
        g = self._block_gen(block)
        m, n = cfg.block_size, cfg.n_features
        f = self.corr_factor
        diag = (1 - f.pow(2).sum(dim=1)).sqrt()
        z = torch.randn(m, n, generator=g) * diag
        if f.shape[1]:
            z += torch.randn(m, f.shape[1], generator=g) @ f.T
        thr = _normal_icdf(1 - self.p_target.double()).float()
        fire = z > thr
        u_levels = [
            torch.rand(m, kids.shape[0], kids.shape[1], generator=g) for _, kids, _ in self._levels
        ]
        mag = (self.mag_mean + self.mag_std * torch.randn(m, n, generator=g)).clamp_min(0)
        n_signed = int(self.signed.sum())
        sign = torch.where(torch.rand(m, n_signed, generator=g) < 0.5, -1.0, 1.0)
        if self._levels:
            fire[:, self.is_child] = False
        for (par, kids, q), u in zip(self._levels, u_levels):
            if cfg.mutually_exclusive:
                hi = q.cumsum(dim=1)
                lo = hi - q
                uu = u[:, :, :1]
                pick = (uu >= lo) & (uu < hi)
            else:
                pick = u < q
            fire[:, kids] = pick & fire[:, par][:, :, None]
        codes = fire * mag
        if cfg.scale_children_by_parent:
            for par, kids, _ in self._levels:
                scale = codes[:, par] / self.mag_mean[par]
                codes[:, kids] = codes[:, kids] * scale[:, :, None]
        if n_signed:
            codes[:, self.signed] = codes[:, self.signed] * sign
        x = codes @ self.dictionary + self.bias
        return x, codes

    def next_batch(self, batch_size: int) -> Batch:
        return self.next_batch_part(batch_size, 0, batch_size)

    def next_batch_part(self, batch_size: int, lo: int, hi: int) -> Batch:
        """Samples ``[lo, hi)`` of the next batch: only the blocks they fall in are generated."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        bs = self.cfg.block_size
        xs, cs = [], []
        pos, end = self.pos + lo, self.pos + hi
        while pos < end:
            block, off = divmod(pos, bs)
            if self._block is None or self._block[0] != block:
                self._block = (block, *self.sample_block(block))
            take = min(end - pos, bs - off)
            xs.append(self._block[1][off : off + take])
            cs.append(self._block[2][off : off + take])
            pos += take
        self.pos += batch_size
        meta: dict[str, Any] = {}
        if self.cfg.return_codes:
            meta["codes"] = torch.cat(cs)
        x = torch.cat(xs)
        inputs = {"grad": {SITE: self.downstream_grad(x)}} if self._with_grad else {}
        return Batch(acts={SITE: x}, inputs=inputs, meta=meta)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "synthetic", "pos": self.pos, "stream_seed": self.stream_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "synthetic":
            raise ConfigError(f"not a SyntheticSource state (kind={state.get('kind')!r})")
        if int(state["stream_seed"]) != self.stream_seed:
            raise ConfigError(
                f"state has stream_seed {state['stream_seed']}, this source {self.stream_seed}"
            )
        self.pos = int(state["pos"])
