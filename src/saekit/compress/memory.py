"""Peak memory over a span of work: the CUDA allocator's peak on a CUDA device, otherwise
the process's peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch


def rss_bytes(field: str = "VmRSS") -> int | None:
    """Current (``VmRSS``) or peak (``VmHWM``) resident bytes of this process (Linux only)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def reset_rss_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel does not allow it."""
    try:  # a write to a procfs control file, not a file saekit produces
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
        try:
            os.write(fd, b"5")
        finally:
            os.close(fd)
        return True
    except OSError:
        return False


class PeakMemory:
    """``reset()`` then ``peak()``: bytes at the high-water mark since the reset.

    ``kind`` says what is measured: ``"cuda"`` (allocated tensors on the device), ``"rss"``
    (the whole process's resident memory, model included) or ``"none"``.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.kind = "cuda"
        elif rss_bytes("VmHWM") is not None and reset_rss_peak():
            self.kind = "rss"
        else:
            self.kind = "none"

    def reset(self) -> None:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "rss":
            reset_rss_peak()

    def peak(self) -> int | None:
        if self.kind == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "rss":
            return rss_bytes("VmHWM")
        return None
