"""The instruments a running agent installs, in order. torch loads only when they install."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from llmtop.agent.runtime.core import Instrument, Options

# (module, class) of every instrument, in install order: the layers instrument first (it owns the
# module-call replacement the others listen to through the bus).
INSTRUMENTS: tuple[tuple[str, str], ...] = (
    ("llmtop.agent.instruments.layers", "LayersInstrument"),
    ("llmtop.agent.instruments.steps", "StepInstrument"),
    ("llmtop.agent.instruments.flops_live", "FlopsInstrument"),
    ("llmtop.agent.instruments.ops", "OpsInstrument"),
    ("llmtop.agent.instruments.collectives", "CollectivesInstrument"),
    ("llmtop.agent.hf.instrument", "TransformersInstrument"),
)


def default_instruments(options: Options,
                        on_error: Callable[[str, str], None] | None = None) -> list[Instrument]:
    """One of each instrument. One that fails to import or to be made is left out, and
    ``on_error(source, message)`` is told (the runtime reports it on stderr and as an
    ``AgentWarning``): a bug in one instrument must not stop the agent, nor go unnoticed."""
    out: list[Any] = []
    for module_name, class_name in INSTRUMENTS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
            out.append(cls(options))
        except Exception as exc:
            if on_error is not None:
                source = module_name.rpartition(".")[2]
                on_error(source, f"instrument {class_name} not loaded: {type(exc).__name__}: {exc}")
    return out
