"""Host sampler against psutil's own view of this process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
from llmtop.agent.instruments.host import HostSampler, RunQueueWait


def test_sample_fields_match_the_process_and_system() -> None:
    s = HostSampler()
    x = s.sample(now=5.0)
    assert x.t == 5.0
    rss = psutil.Process().memory_info().rss
    assert 0.5 * rss < x.rss < 2 * rss
    vm = psutil.virtual_memory()
    assert x.sys_total == vm.total and 0 < x.sys_used <= vm.total
    assert x.threads >= 1


def test_cpu_percent_covers_the_time_since_the_previous_sample() -> None:
    s = HostSampler()
    end = time.process_time() + 0.3
    while time.process_time() < end:  # burn CPU in this process
        pass
    busy = s.sample().cpu_pct
    assert busy > 0
    time.sleep(0.3)
    idle = s.sample().cpu_pct
    assert idle < busy


def test_threads_are_counted() -> None:
    s = HostSampler()
    before = s.sample().threads
    stop = threading.Event()
    workers = [threading.Thread(target=stop.wait) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        assert s.sample().threads >= before + 3
    finally:
        stop.set()
        for w in workers:
            w.join()


HOG = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/schedstat"), reason="needs Linux schedstat")
def test_run_queue_wait_of_a_process_sharing_its_cpu() -> None:
    """A busy process with two more busy processes on its CPU waits for a CPU about two thirds of the
    time (the scheduler shares the CPU three ways); never more than all of it."""
    cpu = max(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", HOG, str(cpu)])]
    try:
        sampler = HostSampler(procs[0].pid)
        time.sleep(0.5)
        sampler.sample()
        procs += [subprocess.Popen([sys.executable, "-c", HOG, str(cpu)]) for _ in range(2)]
        time.sleep(1.0)
        crowded = sampler.sample().runq_pct
        assert crowded is not None and 30.0 < crowded <= 100.0, crowded
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_run_queue_wait_without_schedstat_is_none() -> None:
    wait = RunQueueWait("/nonexistent/schedstat")
    assert wait.percent(1.0) is None and wait.percent(2.0) is None
    first = RunQueueWait(f"/proc/{os.getpid()}/schedstat")
    assert first.percent(1.0) is None  # nothing to compare with yet
