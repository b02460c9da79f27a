"""``llmtop.agent.span``: nesting and timing as a context manager and a decorator; a no-op without an agent."""

from __future__ import annotations

import threading
import time
from typing import Any

import llmtop.agent
import pytest
from llmtop.agent.runtime import core
from llmtop.protocol.events import Span

from .harness import Collect


def recorder() -> Collect:
    """The part of the running agent that spans use: ``emit`` and ``current_step``."""
    rec = Collect()
    rec.current_step = 7
    return rec


@pytest.fixture
def agent():
    rec = recorder()
    core.ACTIVE = rec
    try:
        yield rec
    finally:
        core.ACTIVE = None


def spans(rec: Collect) -> dict[str, Span]:
    return {e.name: e for e in rec.events if isinstance(e, Span)}


def test_nested_context_managers(agent) -> None:
    t0 = time.perf_counter()
    with llmtop.agent.span("epoch", category="training_loop", epoch=1):
        with llmtop.agent.span("tokenize", category="text_preprocessing"):
            time.sleep(0.02)
        with llmtop.agent.span("forward", category="forward_pass"):
            time.sleep(0.01)
    wall_ms = (time.perf_counter() - t0) * 1e3
    got = spans(agent)
    assert [e.name for e in agent.events] == ["tokenize", "forward", "epoch"]  # sent when they close
    assert got["epoch"].depth == 0 and got["tokenize"].depth == 1 and got["forward"].depth == 1
    assert got["tokenize"].dur_ms >= 20.0 and got["forward"].dur_ms >= 10.0
    assert got["epoch"].dur_ms >= got["tokenize"].dur_ms + got["forward"].dur_ms
    assert got["epoch"].dur_ms <= wall_ms
    assert got["tokenize"].start >= got["epoch"].start
    assert got["forward"].start >= got["tokenize"].start + got["tokenize"].dur_ms / 1e3 - 1e-3
    assert got["epoch"].category == "training_loop" and got["epoch"].attrs == {"epoch": 1}
    assert all(e.step == 7 for e in agent.events)


def test_decorator_times_each_call_and_keeps_the_function(agent) -> None:
    @llmtop.agent.span("load", category="model_loading", source="disk")
    def load(x: int, *, scale: int = 1) -> int:
        """Load something."""
        time.sleep(0.005)
        return x * scale

    assert load.__name__ == "load" and load.__doc__ == "Load something."
    assert load(3, scale=2) == 6
    assert load(4) == 4
    got = [e for e in agent.events if isinstance(e, Span)]
    assert len(got) == 2
    assert all(e.name == "load" and e.category == "model_loading" and e.attrs == {"source": "disk"}
               for e in got)
    assert all(e.dur_ms >= 5.0 for e in got)


def test_decorated_function_inside_a_span_nests(agent) -> None:
    @llmtop.agent.span("inner")
    def inner() -> None:
        pass

    with llmtop.agent.span("outer"):
        inner()
    got = spans(agent)
    assert got["outer"].depth == 0 and got["inner"].depth == 1
    assert got["inner"].category == "other"


def test_exceptions_pass_through_and_the_span_still_closes(agent) -> None:
    with pytest.raises(ValueError, match="boom"):
        with llmtop.agent.span("failing"):
            raise ValueError("boom")
    with llmtop.agent.span("after"):
        pass
    got = spans(agent)
    assert set(got) == {"failing", "after"}
    assert got["after"].depth == 0  # the depth was restored after the exception


def test_depth_is_per_thread(agent) -> None:
    seen: dict[str, int] = {}
    ready = threading.Event()
    release = threading.Event()

    def other() -> None:
        with llmtop.agent.span("thread-outer"):
            ready.set()
            release.wait(5)

    th = threading.Thread(target=other)
    th.start()
    ready.wait(5)
    with llmtop.agent.span("main"):
        pass
    release.set()
    th.join()
    for e in agent.events:
        seen[e.name] = e.depth
    assert seen == {"main": 0, "thread-outer": 0}


def test_no_op_without_an_agent() -> None:
    assert core.ACTIVE is None
    calls = []

    @llmtop.agent.span("f")
    def f(x: int) -> int:
        calls.append(x)
        return x + 1

    with llmtop.agent.span("block", category="data_loading") as s:
        assert f(1) == 2
    assert calls == [1]
    assert s._on is False  # nothing was started
    llmtop.agent.metric("reward", 0.5)  # also nothing
    assert not llmtop.agent.is_running()


def test_span_started_without_agent_ignores_one_appearing_midway() -> None:
    rec = recorder()
    with llmtop.agent.span("before") as s:
        core.ACTIVE = rec
    core.ACTIVE = None
    assert rec.events == [] and s._on is False


def test_emit_failure_never_reaches_user_code(agent) -> None:
    def broken(event: Any) -> None:
        raise RuntimeError("viewer gone")

    agent.emit = broken
    with llmtop.agent.span("x"):
        pass  # no exception
