"""llmtop's in-process agent. Importing this is cheap: torch and friends load only when it starts.

Public API::

    import llmtop.agent
    llmtop.agent.start()                      # or run under `llmtop attach`, or LLMTOP=1
    with llmtop.agent.span("tokenize", category="text_preprocessing"): ...
    llmtop.agent.step()                       # a step boundary the hooks cannot see
    llmtop.agent.metric("reward", 0.7)
"""

from __future__ import annotations

from typing import Any

from llmtop.agent.runtime.api import CATEGORIES, is_running, metric, span, step


def start(**options: Any) -> Any:
    """Start the agent in this process (idempotent). Returns the running agent."""
    from llmtop.agent.runtime.process import start_agent

    return start_agent(**options)


def stop() -> None:
    """Stop the agent: final flush, close the socket and the recording."""
    from llmtop.agent.runtime.process import stop_agent

    stop_agent()


__all__ = ["CATEGORIES", "is_running", "metric", "span", "start", "step", "stop"]
