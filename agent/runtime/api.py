"""The public, in-code API: spans, manual steps, custom metrics, start/stop.

Each call costs well under a microsecond when no agent runs: one global read and a branch.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from llmtop.agent.runtime import core
from llmtop.protocol.events import Metric
from llmtop.protocol.events import Span as SpanEvent

F = TypeVar("F", bound=Callable[..., Any])

CATEGORIES = (
    "model_loading",
    "text_preprocessing",
    "data_loading",
    "model_inference",
    "forward_pass",
    "backward_pass",
    "optimizer_step",
    "mixed_precision",
    "model_compilation",
    "memory_usage",
    "training_loop",
)

_depth = threading.local()


class span:  # noqa: N801 - used like a function: ``with span(...)`` and ``@span(...)``
    """Time a block or a function: ``with llmtop.agent.span("tokenize", category="text_preprocessing"):``.

    Nestable (depth is tracked per thread). ``category`` is one of CATEGORIES or any string.
    Keyword ``attrs`` are sent with the span (keep them small: numbers and short strings).
    """

    __slots__ = ("name", "category", "attrs", "_t0", "_wall0", "_on")

    def __init__(self, name: str, category: str = "other", **attrs: Any) -> None:
        self.name = name
        self.category = category
        self.attrs = attrs
        self._on = False

    def __enter__(self) -> span:
        if core.ACTIVE is None:
            return self
        self._on = True
        self._wall0 = time.time()
        self._t0 = time.perf_counter_ns()
        _depth.n = getattr(_depth, "n", 0) + 1
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._on:
            return
        dur_ns = time.perf_counter_ns() - self._t0
        self._on = False
        depth = _depth.n = _depth.n - 1
        agent = core.ACTIVE
        if agent is None:
            return
        try:
            agent.emit(
                SpanEvent(
                    name=self.name,
                    category=self.category,
                    start=self._wall0,
                    dur_ms=dur_ns / 1e6,
                    depth=depth,
                    step=agent.current_step,
                    attrs=self.attrs,
                )
            )
        except Exception:  # fail open: a span never raises into user code
            pass

    def __call__(self, fn: F) -> F:
        name, category, attrs = self.name, self.category, self.attrs

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if core.ACTIVE is None:
                return fn(*args, **kwargs)
            with span(name, category, **attrs):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


def step() -> None:
    """Mark a step boundary for loops the optimizer and forward hooks cannot see."""
    agent = core.ACTIVE
    if agent is not None:
        try:
            agent.manual_step()
        except Exception:
            pass


def metric(name: str, value: float, step: int | None = None) -> None:
    """Record a point of a custom series (shown beside loss and throughput)."""
    agent = core.ACTIVE
    if agent is None:
        return
    try:
        agent.emit(Metric(name=name, value=float(value), t=time.time(),
                          step=agent.current_step if step is None else step))
    except Exception:
        pass


def is_running() -> bool:
    return core.ACTIVE is not None
