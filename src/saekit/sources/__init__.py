"""Activation sources: HF model hooks, on-disk cache, synthetic ground truth, memory."""

from saekit.sources.base import ActivationSource, Batch, MemorySource

__all__ = ["ActivationSource", "Batch", "MemorySource"]
