"""The instruments a running agent installs, in order. torch loads only when they install."""

from __future__ import annotations

import importlib
from typing import Any

from llmtop.agent.runtime.core import Instrument, Options

# (module, class) of the instruments other than layers; each may not exist yet in a checkout,
# and one that fails to import is skipped rather than stopping the agent.
_OPTIONAL = (
    ("llmtop.agent.instruments.steps", "StepInstrument"),
    ("llmtop.agent.instruments.flops_live", "FlopsInstrument"),
    ("llmtop.agent.instruments.ops", "OpsInstrument"),
    ("llmtop.agent.hf.instrument", "TransformersInstrument"),
)


def default_instruments(options: Options) -> list[Instrument]:
    from llmtop.agent.instruments.layers import LayersInstrument

    out: list[Any] = [LayersInstrument(options)]
    for module_name, class_name in _OPTIONAL:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
            out.append(cls(options))
        except Exception:
            continue
    return out
