"""Host sampler: this process's CPU and memory and the system's memory, via psutil."""

from __future__ import annotations

import time

import psutil
from llmtop.protocol.events import HostSample


class HostSampler:
    """One ``HostSample`` per call. CPU % is over the time since the previous call, like top."""

    def __init__(self, pid: int | None = None) -> None:
        self.proc = psutil.Process(pid)
        self.proc.cpu_percent(None)  # primes the counter: the first real sample covers one tick

    def sample(self, now: float | None = None) -> HostSample:
        proc = self.proc
        with proc.oneshot():
            cpu = proc.cpu_percent(None)
            rss = proc.memory_info().rss
            threads = proc.num_threads()
        vm = psutil.virtual_memory()
        return HostSample(
            t=time.time() if now is None else now,
            cpu_pct=float(cpu),
            rss=int(rss),
            sys_used=int(vm.total - vm.available),
            sys_total=int(vm.total),
            threads=int(threads),
        )
