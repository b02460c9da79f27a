"""What instrument tests share: a real ``core.Context`` that keeps what instruments emit, and a
fixture that gives each test an empty hot bus."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from llmtop.agent.runtime import core
from llmtop.protocol.events import Event, ModelTree, Span


class Collect:
    """The instrument contract of ``agent/runtime/core.py`` (and the running agent's part that
    ``llmtop.agent`` uses), keeping what is emitted and warned. The one fake context of the tests."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("layer_call_ns", 3000)  # skip the layers' calibration unless asked
        self.options = core.Options(**options)
        self.events: list[Event] = []
        self.warnings: list[tuple[str, str]] = []
        self.current_step = 0
        self.stopping = False  # the runtime's Agent.stopping: set once the agent shuts down
        self._manual: Any = None

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def warn(self, source: str, message: str) -> None:
        self.warnings.append((source, message))

    def set_manual_step(self, fn: Any) -> None:
        self._manual = fn

    def manual_step(self) -> None:
        """What ``llmtop.agent.step()`` calls on the running agent (set ``core.ACTIVE`` to this)."""
        self._manual()

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def trees(self) -> list[ModelTree]:
        return self.of(ModelTree)

    def spans(self, name: str | None = None, category: str | None = None) -> list[Span]:
        return [e for e in self.of(Span)
                if (name is None or e.name == name) and (category is None or e.category == category)]


@pytest.fixture
def clean_bus() -> Iterator[None]:
    """An empty hot bus for the test (instruments installed by other tests stay out of it)."""
    bus = core.BUS
    saved = dict(vars(bus))
    for name, value in saved.items():
        if isinstance(value, list):
            setattr(bus, name, [])
    bus.detail = True
    bus.costs = core.StepCosts()
    bus.generation_phase = core.no_generation
    try:
        yield
    finally:
        vars(bus).update(saved)
