"""CUDA memory per step, read from the caching allocator's host-side counters (no device sync).

``torch.cuda.memory_stats_as_nested_dict`` and ``reset_peak_memory_stats`` only touch the
allocator's bookkeeping on the host; neither launches work nor waits for the GPU. When CUDA is not
initialised in this process the readings are None (absent), never 0.
"""

from __future__ import annotations

import sys

from .gpu_timing import cuda_ready

NONE3: tuple[None, None, None] = (None, None, None)


def read_step_memory(reset_peak: bool = True) -> tuple[int | None, int | None, int | None]:
    """(allocated, reserved, peak allocated since the last reset) in bytes, for the current device.

    With ``reset_peak`` the peak counter restarts, so the next call reports the next step's peak.
    """
    if not cuda_ready():
        return NONE3
    torch = sys.modules["torch"]
    try:
        dev = torch.cuda.current_device()
        stats = torch.cuda.memory_stats_as_nested_dict(dev)
        alloc = stats["allocated_bytes"]["all"]
        reserved = int(stats["reserved_bytes"]["all"]["current"])
        out = (int(alloc["current"]), reserved, int(alloc["peak"]))
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(dev)
        return out
    except Exception:
        return NONE3


def host_rss() -> int | None:
    """This process's resident set size in bytes (agent thread only: it is a /proc read)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return None
