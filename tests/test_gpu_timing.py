"""GPU timing bookkeeping (CPU-testable with an injected event type), CPU degradation, CUDA memory.

The real-event path is checked by ``test_real_cuda_events`` (and tests/test_no_sync.py) on a GPU.
"""

from __future__ import annotations

import time

import pytest
import torch
from llmtop.agent.instruments.gpu_timing import EventPool, GpuStepClock, ScalarReader, cuda_ready
from llmtop.agent.instruments.memory import StepMemory, host_rss, read_step_memory


class Clock:
    """A fake device timeline: events complete when the test says the device got there."""

    def __init__(self) -> None:
        self.host = 0.0  # ms at which the host records
        self.done_upto = -1.0  # the device finished everything recorded up to this host time


class FakeEvent:
    """Stands in for ``torch.cuda.Event`` so the pool's bookkeeping runs without a GPU."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.at: float | None = None

    def record(self) -> None:
        self.at = self.clock.host

    def query(self) -> bool:
        return self.at is not None and self.at <= self.clock.done_upto

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.query() and end.query(), "elapsed_time before completion would block"
        return end.at - self.at


def fake_clock(pool_size: int = 8) -> tuple[Clock, GpuStepClock]:
    clock = Clock()
    pool = EventPool(lambda: FakeEvent(clock), size=pool_size)
    return clock, GpuStepClock(pool, enabled=lambda: True)


def test_step_times_resolve_in_order_once_complete() -> None:
    clock, gpu = fake_clock()
    gpu.restart()
    for k, t in enumerate([10.0, 25.0, 45.0]):
        clock.host = t
        gpu.end_step(k)
    assert gpu.resolve() == {}  # the device has not reached any step end yet
    clock.done_upto = 25.0
    assert gpu.resolve() == {0: 10.0, 1: 15.0}
    clock.done_upto = 100.0
    assert gpu.resolve() == {2: 20.0}
    assert gpu.pending == 0


def test_events_return_to_the_pool() -> None:
    clock, gpu = fake_clock(pool_size=4)
    gpu.restart()
    for k in range(200):  # far more steps than events: the pool is recycled
        clock.host = float(k + 1)
        gpu.end_step(k)
        clock.done_upto = clock.host
        assert gpu.resolve() == {k: 1.0}
    assert gpu.pool.created <= 4
    assert gpu.pool.in_use <= 2  # the current window start (+ one waiting to be handed back)


def test_window_restart_releases_the_old_start() -> None:
    clock, gpu = fake_clock(pool_size=4)
    for k in range(50):
        gpu.restart()  # evaluation in between: every step restarts its window
        clock.host += 3.0
        gpu.end_step(k)
        clock.done_upto = clock.host
        assert gpu.resolve() == {k: 3.0}
    assert gpu.pool.created <= 4


def test_a_stuck_device_bounds_the_pool_and_drops_measurements() -> None:
    clock, gpu = fake_clock(pool_size=4)
    gpu.restart()
    for k in range(20):  # the device never completes anything
        clock.host += 1.0
        gpu.end_step(k)
    assert gpu.pool.created == 4  # bounded, no allocation per step
    assert gpu.pending <= 3
    assert gpu.dropped > 0
    clock.done_upto = 1e9
    got = gpu.resolve()
    assert got and all(v > 0 for v in got.values())


def test_without_cuda_nothing_is_recorded() -> None:
    assert not cuda_ready()  # this machine: CPU only
    gpu = GpuStepClock(EventPool(lambda: pytest.fail("no event may be created without CUDA")))
    gpu.restart()
    gpu.end_step(0)
    assert gpu.resolve() == {}
    assert gpu.pool.created == 0


def test_scalar_reader_cpu_tensors_are_host_reads() -> None:
    reader = ScalarReader(slot_factory=lambda: pytest.fail("no pinned slot for CPU tensors"))
    loss = (torch.ones(3, requires_grad=True) * 2).mean()
    h = reader.capture(loss)
    assert reader.is_host(h)
    assert reader.read(h) == (True, 2.0)
    assert reader.capture(torch.ones(2)) is None  # not a scalar
    assert reader.read(None) == (True, None)
    one = reader.capture(torch.tensor([3.5]))  # a one-element tensor counts as a scalar
    assert reader.read(one) == (True, 3.5)


def test_cuda_scalars_wait_for_prepared_slots() -> None:
    reader = ScalarReader(slot_factory=lambda: (None, None), size=3)
    assert not reader.prepared
    reader.prepare()
    assert reader.prepared and reader.created == 3


def test_memory_is_absent_not_zero_without_cuda() -> None:
    assert read_step_memory() == (None, None, None)
    rss = host_rss()
    assert rss is not None and rss > 10 * 2**20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_real_cuda_events() -> None:
    a = torch.randn(2048, 2048, device="cuda")
    gpu = GpuStepClock()
    reader = ScalarReader()
    reader.prepare()
    gpu.restart()
    handles = []
    for k in range(5):
        b = a @ a
        handles.append((reader.capture(b.sum()), b.sum()))
        gpu.end_step(k)
    got: dict[int, float] = {}
    for _ in range(1000):
        got.update(gpu.resolve())
        if len(got) == 5:
            break
        time.sleep(0.001)
    assert sorted(got) == [0, 1, 2, 3, 4] and all(v > 0 for v in got.values())
    for h, ref in handles:
        ready, value = reader.read(h)
        while not ready:
            time.sleep(0.001)
            ready, value = reader.read(h)
        assert value == pytest.approx(ref.item(), rel=1e-3)
    alloc, reserved, peak = read_step_memory()
    assert alloc and reserved and peak and peak >= alloc


def test_step_memory_reads_every_step_when_cheap() -> None:
    ticks = iter(range(0, 10**9, 1000))  # each read costs 1 µs on this fake clock
    calls = []
    mem = StepMemory(reader=lambda: calls.append(1) or (1, 2, 3), clock=lambda: next(ticks))
    got = [mem.at_step_end(10_000_000) for _ in range(50)]  # 10 ms steps: 1 µs is 0.01 %
    assert got == [(1, 2, 3)] * 50 and len(calls) == 50 and mem.every == 1


def test_step_memory_samples_when_a_read_would_break_the_budget() -> None:
    ticks = iter(range(0, 10**9, 40_000))  # each read costs 40 µs
    calls = []
    mem = StepMemory(reader=lambda: calls.append(1) or (1, 2, 3), budget=0.005,
                     clock=lambda: next(ticks))
    got = [mem.at_step_end(2_000_000) for _ in range(100)]  # 2 ms steps: budget 10 µs a step
    assert mem.every == 4
    assert len(calls) == 25  # steps 0, 4, 8, … 96: one read in four
    assert sum(1 for g in got if g == (None, None, None)) == 100 - len(calls)
    assert got[0] == (1, 2, 3)  # absent (None) between reads, never 0
