"""CUDA memory per step, read from the caching allocator's host-side counters (no device sync).

``torch.cuda.memory_stats_as_nested_dict`` and ``reset_peak_memory_stats`` only touch the
allocator's bookkeeping on the host; neither launches work nor waits for the GPU. When CUDA is not
initialised in this process the readings are None (absent), never 0.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from llmtop.agent.instruments.gpu_timing import cuda_ready

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


class StepMemory:
    """Reads CUDA memory at step ends within a cost budget.

    The allocator's stats come back as a nested dict built on every call, which costs tens of µs:
    a lot for a 2 ms step. The read's own cost is measured; when it would exceed ``budget`` of the
    step time, only every Nth step is read (N chosen to keep the average within budget) and the
    steps in between report None. The peak of a read step then covers every step since the
    previous read, since the peak counter is reset only when read.
    """

    def __init__(self, reader: Callable[[], tuple[int | None, int | None, int | None]] = read_step_memory,
                 budget: float = 0.005, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self._reader = reader
        self.budget = budget
        self._clock = clock
        self.cost_ns = 0.0  # running estimate of one read's cost
        self.every = 1
        self._skipped = 0

    def at_step_end(self, step_ns: int) -> tuple[int | None, int | None, int | None]:
        if self._skipped + 1 < self.every:
            self._skipped += 1
            return NONE3
        self._skipped = 0
        t0 = self._clock()
        out = self._reader()
        cost = self._clock() - t0
        self.cost_ns = cost if not self.cost_ns else 0.8 * self.cost_ns + 0.2 * cost
        allowed = max(1.0, self.budget * step_ns)
        self.every = max(1, min(1000, math.ceil(self.cost_ns / allowed)))
        return out


_PROC: list[Any] = [None, 0]  # (psutil.Process, pid): recreated after a fork


def host_rss() -> int | None:
    """This process's resident set size in bytes (agent thread only: it is a /proc read)."""
    try:
        import psutil

        pid = os.getpid()
        if _PROC[0] is None or _PROC[1] != pid:
            _PROC[0], _PROC[1] = psutil.Process(pid), pid
        return int(_PROC[0].memory_info().rss)
    except Exception:
        return None
