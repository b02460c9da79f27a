"""Host sampler: this process's CPU and memory and the system's memory, via psutil; and how long its
main thread waited for a CPU, from Linux's schedstat (the sign of a host shared too thinly)."""

from __future__ import annotations

import time

import psutil
from llmtop.protocol.events import HostSample


class HostSampler:
    """One ``HostSample`` per call. CPU % is over the time since the previous call, like top."""

    def __init__(self, pid: int | None = None) -> None:
        self.proc = psutil.Process(pid)
        self.proc.cpu_percent(None)  # primes the counter: the first real sample covers one tick
        # the main thread, the one that runs the script (its steps): /proc/PID/schedstat
        self.runq = RunQueueWait(f"/proc/{self.proc.pid}/schedstat")
        self.runq.percent(time.monotonic())  # primes it as well

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
            runq_pct=self.runq.percent(time.monotonic()),
        )


class RunQueueWait:
    """How long a thread was ready to run but waited for a CPU between two calls, as % of the time
    between them (at most 100). ``schedstat`` holds the thread's CPU time, that wait and its time
    slices, in ns since it started. None when the kernel gives no schedstat (not Linux, or built
    without it), never an error."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.waited: int | None = None
        self.at: float | None = None
        self.broken = False

    def percent(self, now: float) -> float | None:
        if self.broken:
            return None
        try:
            with open(self.path, "rb") as f:
                waited = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            self.broken = True
            return None
        before, then = self.waited, self.at
        self.waited, self.at = waited, now
        if before is None or then is None or now <= then:
            return None
        return min(100.0, max(0.0, (waited - before) / 1e9 / (now - then) * 100.0))
