"""Host sampler against psutil's own view of this process."""

from __future__ import annotations

import threading
import time

import psutil
from llmtop.agent.instruments.host import HostSampler


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
