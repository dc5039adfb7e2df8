"""Streaming float64 input statistics of linear layers, shared between layers with one input.

For a group of layers hooked during a block's forward pass, :class:`GroupStats` accumulates
per *distinct input tensor* (q/k/v read the same normed hidden states, gate/up the same MLP
input, so each such set keeps one ``H``):

- ``H = Σ x xᵀ`` of the inputs on the compressed path (``student``) and/or the
  full-precision path (``teacher``), ``Σ |x|`` for ASVD;
- ``Δ = Σ (x_f − x) xᵀ`` pairing both paths token by token (SAES-SVD);
- per layer ``Σ ‖W x_f‖²`` from the teacher layer's output (the denominator of the error
  against the full-precision outputs).

Inputs arrive in the model's dtype (e.g. bf16) and are summed in float64 on their device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class InputStats:
    """``Σ x xᵀ``, ``Σ |x|`` and the token count of one input (float64)."""

    n: int
    H: Tensor | None = None
    abs_sum: Tensor | None = None
    count: int = 0

    def add(self, x: Tensor, want_abs: bool = False) -> Tensor:
        """Accumulate ``x`` (any leading shape, last dim ``n``); returns it as ``[N, n]`` f64."""
        x = x.reshape(-1, self.n).double()
        if self.H is None:
            self.H = torch.zeros(self.n, self.n, dtype=torch.float64, device=x.device)
        self.H.addmm_(x.T, x)
        if want_abs:
            if self.abs_sum is None:
                self.abs_sum = torch.zeros(self.n, dtype=torch.float64, device=x.device)
            self.abs_sum += x.abs().sum(0)
        self.count += x.shape[0]
        return x

    def mean_H(self) -> Tensor | None:
        return None if self.H is None else self.H / max(self.count, 1)

    def abs_mean(self) -> Tensor | None:
        return None if self.abs_sum is None else self.abs_sum / max(self.count, 1)


@dataclass
class LayerStatsView:
    """The means one layer's factorisation needs (``None`` where not collected)."""

    H: Tensor | None  # inputs the factorisation whitens by (its method's statistics path)
    delta: Tensor | None = None  # mean (x_f − x) xᵀ
    abs_mean: Tensor | None = None  # ASVD's mean |x_j|
    H_student: Tensor | None = None  # compressed-path inputs (SVD-LLM's U update, reports)
    fp_target: float | None = None  # mean ‖W x_f‖²


@dataclass
class GroupStats:
    """Statistics of one group of layers over the calibration batches.

    ``share`` maps a layer to the representative layer whose input it shares (fixed on the
    first batch from the input tensors' storage and layout, checked on every later batch).
    """

    sizes: dict[str, int]  # layer -> input features
    want_student: bool
    want_teacher: bool
    want_delta: bool
    want_abs: bool
    share: dict[str, str] = field(default_factory=dict)
    student: dict[str, InputStats] = field(default_factory=dict)
    teacher: dict[str, InputStats] = field(default_factory=dict)
    delta: dict[str, Tensor] = field(default_factory=dict)
    target: dict[str, float] = field(default_factory=dict)

    def _sharing(self, got: dict[str, Tensor]) -> dict[str, str]:
        rep: dict[tuple, str] = {}
        out = {}
        for name in self.sizes:
            t = got[name]  # one tensor (or views of one storage with one layout)
            key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)
            out[name] = rep.setdefault(key, name)
        return out

    def add_batch(
        self,
        xs: dict[str, Tensor] | None,
        xfs: dict[str, Tensor] | None,
        fp_out_sq: dict[str, float] | None = None,
    ) -> None:
        """One batch: student inputs ``xs``, teacher inputs ``xfs`` (per layer name)."""
        ref = xs if xs is not None else xfs
        share = self._sharing(ref)  # type: ignore[arg-type]
        if not self.share:
            self.share = share
        elif share != self.share:
            raise RuntimeError(f"layers changed which inputs they share between batches: {share}")
        if xs is not None and xfs is not None and self._sharing(xfs) != self.share:
            raise RuntimeError("student and teacher blocks share layer inputs differently")
        for key in dict.fromkeys(self.share.values()):
            n = self.sizes[key]
            x = xf = None
            if self.want_student and xs is not None:
                st = self.student.setdefault(key, InputStats(n))
                x = st.add(xs[key], self.want_abs)
            if self.want_teacher and xfs is not None:
                st = self.teacher.setdefault(key, InputStats(n))
                xf = st.add(xfs[key], self.want_abs)
            if self.want_delta:
                x = xs[key].reshape(-1, n).double() if x is None else x  # type: ignore[index]
                xf = xfs[key].reshape(-1, n).double() if xf is None else xf  # type: ignore[index]
                if key not in self.delta:
                    self.delta[key] = torch.zeros(n, n, dtype=torch.float64, device=x.device)
                self.delta[key].addmm_((xf - x).T, x)
        for name, v in (fp_out_sq or {}).items():
            self.target[name] = self.target.get(name, 0.0) + v

    def view(self, name: str, path: str) -> LayerStatsView:
        """The means for ``name``; ``path`` ("student" or "teacher") is whose H it whitens by."""
        key = self.share[name]
        stu, tea = self.student.get(key), self.teacher.get(key)
        main = stu if path == "student" else tea
        count = (stu or tea).count if (stu or tea) else 1  # type: ignore[union-attr]
        return LayerStatsView(
            H=None if main is None else main.mean_H(),
            delta=self.delta[key] / count if key in self.delta else None,
            abs_mean=None if main is None else main.abs_mean(),
            H_student=None if stu is None else stu.mean_H(),
            fp_target=self.target[name] / count if name in self.target else None,
        )

    def nbytes(self) -> int:
        """Bytes held by the float64 sums."""
        ts = [s.H for s in (*self.student.values(), *self.teacher.values())]
        ts += [s.abs_sum for s in (*self.student.values(), *self.teacher.values())]
        ts += list(self.delta.values())
        return sum(t.numel() * t.element_size() for t in ts if t is not None)
