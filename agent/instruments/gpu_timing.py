"""GPU-side timing and scalar reads that never synchronize the device.

The hot path only *records* CUDA events (and enqueues tiny device-to-host copies into pinned
buffers); the agent thread later asks ``event.query()`` and reads what is ready. Nothing here calls
``torch.cuda.synchronize()``, ``Event.synchronize()``, ``.item()`` or ``.cpu()`` on a CUDA tensor.

Without CUDA every class degrades to nothing: ``GpuStepClock`` records no events (``gpu_ms`` stays
None) and ``ScalarReader`` reads CPU tensors with ``float()`` (a host read, not a device sync).

The event factory is injectable so the pool and bookkeeping logic is testable on a CPU machine.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from typing import Any

_CUDA_ON = [False]  # once CUDA is initialised it stays so (a forked child runs no agent)


def cuda_ready() -> bool:
    """CUDA is in use by this process (initialised); never initialises it ourselves. Hot-path cheap."""
    if _CUDA_ON[0]:
        return True
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        on = bool(torch.cuda.is_initialized())
    except Exception:
        return False
    _CUDA_ON[0] = on
    return on


def _cuda_timing_event() -> Any:
    import torch

    return torch.cuda.Event(enable_timing=True)


class EventPool:
    """A bounded free list of events. ``acquire`` returns None when the pool is spent.

    A spent pool means the GPU is far behind the host (or events never complete); we then skip
    measuring rather than allocate without bound.
    """

    def __init__(self, factory: Callable[[], Any] | None = None, size: int = 128) -> None:
        self._factory = factory or _cuda_timing_event
        self.size = size
        self.created = 0
        self._free: list[Any] = []

    def acquire(self) -> Any:
        if self._free:
            return self._free.pop()
        if self.created >= self.size:
            return None
        self.created += 1
        return self._factory()

    def release(self, event: Any) -> None:
        self._free.append(event)

    @property
    def in_use(self) -> int:
        return self.created - len(self._free)


class GpuStepClock:
    """Marks step boundaries with CUDA events; ``resolve()`` (agent thread) yields gpu_ms per step.

    One event serves as the end of step k and the start of step k+1, so a steady run records one
    event per step. Events are reference-counted and go back to the pool when no step needs them.
    """

    def __init__(self, pool: EventPool | None = None, enabled: Callable[[], bool] = cuda_ready,
                 max_pending: int = 64) -> None:
        self.pool = pool or EventPool()
        self._enabled = enabled
        self._start: Any = None
        self._refs: dict[int, int] = {}
        self._pending: deque[tuple[int, Any, Any]] = deque()
        # resolved (start, end) pairs handed back by the agent thread; only the hot path touches
        # the reference counts and the pool, so no lock is needed
        self._resolved: deque[tuple[Any, Any]] = deque()
        self.max_pending = max_pending
        self.dropped = 0

    def _record(self) -> Any:
        if not self._enabled():
            return None
        while self._resolved:
            start, end = self._resolved.popleft()
            self._unref(start)
            self._unref(end)
        ev = self.pool.acquire()
        if ev is None:
            return None
        ev.record()
        self._refs[id(ev)] = 1
        return ev

    def _unref(self, ev: Any) -> None:
        if ev is None:
            return
        n = self._refs.get(id(ev), 0) - 1
        if n <= 0:
            self._refs.pop(id(ev), None)
            self.pool.release(ev)
        else:
            self._refs[id(ev)] = n

    def restart(self) -> None:
        """Hot path: a step window (re)starts now."""
        old, self._start = self._start, self._record()
        self._unref(old)

    def end_step(self, step: int) -> None:
        """Hot path: step ``step`` ended now; its end event starts the next step."""
        end = self._record()
        start = self._start
        if start is not None and end is not None and len(self._pending) < self.max_pending:
            # the pending entry takes over the window's reference to ``start``
            self._refs[id(end)] = 2  # this entry's end + the next window's start
            self._pending.append((step, start, end))
        else:
            if start is not None or end is not None:
                self.dropped += 1
            self._unref(start)
            if end is not None:
                self._refs[id(end)] = 1
        self._start = end

    def resolve(self) -> dict[int, float]:
        """Agent thread: gpu_ms of every finished step whose events completed, in order."""
        done: dict[int, float] = {}
        while self._pending:
            step, start, end = self._pending[0]
            if not end.query():
                break  # later steps are queued behind this one on the same stream
            self._pending.popleft()
            try:
                done[step] = float(start.elapsed_time(end))
            except Exception:
                pass
            self._resolved.append((start, end))
        return done

    @property
    def pending(self) -> int:
        return len(self._pending)


class _CpuValue:
    __slots__ = ("tensor",)

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor


def _pinned_slot() -> tuple[Any, Any]:
    import torch

    buf = torch.empty((), dtype=torch.float32, pin_memory=True)
    return buf, torch.cuda.Event()


class ScalarReader:
    """Captures scalar tensors (loss, gradient norm) on the hot path and reads them when ready.

    CPU tensor: kept detached, read with ``float()``. CUDA tensor: one async copy into a pinned
    float32 buffer on the current stream, then an event; ``read`` returns the value once the event
    has completed, so reading is a host memory read.
    """

    def __init__(self, slot_factory: Callable[[], tuple[Any, Any]] | None = None, size: int = 128) -> None:
        self._factory = slot_factory or _pinned_slot
        self.size = size
        self.created = 0
        self._free: list[tuple[Any, Any]] = []

    def prepare(self) -> None:
        """Agent thread: allocate the pinned slots once CUDA is in use.

        Pinned host allocation (``cudaHostAlloc``) can stall the device, so it never happens on
        the hot path; until the slots exist, CUDA scalars are simply not captured.
        """
        while self.created < self.size:
            self.created += 1
            self._free.append(self._factory())

    @property
    def prepared(self) -> bool:
        return self.created >= self.size

    def capture(self, tensor: Any) -> Any:
        """Hot path. Returns a handle for ``read`` or None (not a scalar, or the pool is spent)."""
        t = tensor.detach()
        if t.numel() != 1:
            return None
        if not t.is_cuda:
            return _CpuValue(t)
        if not self._free:
            return None  # not prepared yet (see ``prepare``) or every slot is in flight
        buf, ev = slot = self._free.pop()
        buf.copy_(t.reshape(()), non_blocking=True)
        ev.record()
        return slot

    def read(self, handle: Any) -> tuple[bool, float | None]:
        """(ready, value). A ready CUDA slot goes back to the pool."""
        if handle is None:
            return True, None
        if isinstance(handle, _CpuValue):
            return True, float(handle.tensor)
        buf, ev = handle
        if not ev.query():
            return False, None
        value = float(buf)  # pinned host memory, written by the completed copy
        self._free.append(handle)
        return True, value

    @staticmethod
    def is_host(handle: Any) -> bool:
        return isinstance(handle, _CpuValue)

    def drop(self, handle: Any) -> None:
        """Give up on a handle (too old); a CUDA slot is not reused since its copy may be pending."""
