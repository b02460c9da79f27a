"""Start the agent at interpreter start-up when the environment asks for it.

Called from ``agent/bootstrap/sitecustomize.py`` (put on ``PYTHONPATH`` by ``llmtop attach``) and
from the ``llmtop-autostart.pth`` start-up hook (``LLMTOP=1 python train.py``). It never raises
and never prints unless the user's own settings are wrong.
"""

from __future__ import annotations

import os
import sys

TRUTHY = ("1", "true", "yes", "on")

# Helper processes that must not carry an agent: multiprocessing's spawn/forkserver children
# (DataLoader workers with the spawn start method) and its resource tracker, and llmtop itself.
_SKIP_MARKERS = ("--multiprocessing-fork", "multiprocessing.resource_tracker", "multiprocessing.forkserver",
                 "from multiprocessing.", "llmtop.cli")


def wanted(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    flag = env.get("LLMTOP", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    return flag in TRUTHY or bool(env.get("LLMTOP_SOCKET")) or bool(env.get("LLMTOP_RECORD"))


def skipped_process(argv: list[str] | None = None) -> bool:
    argv = list(getattr(sys, "orig_argv", sys.argv) if argv is None else argv)
    cmdline = " ".join(argv)
    if any(marker in cmdline for marker in _SKIP_MARKERS):
        return True
    return len(argv) > 1 and os.path.basename(argv[1]) == "llmtop"


def descendant_of_attached_script(env: dict[str, str] | None = None) -> bool:
    """Under ``llmtop attach script.py`` only the script's own process is watched: Python processes
    it starts (pip, tokenizer helpers, tools) would pay for an agent nobody looks at. ``attach -- CMD``
    leaves ``LLMTOP_PARENT_PID`` unset, so every Python process of a launcher gets an agent."""
    env = os.environ if env is None else env
    parent = env.get("LLMTOP_PARENT_PID", "")
    if not parent or env.get("LLMTOP", "").strip().lower() in TRUTHY:
        return False
    return not (parent.isdigit() and int(parent) == os.getppid())


def autostart() -> None:
    if not wanted() or skipped_process() or descendant_of_attached_script():
        return
    try:
        from llmtop.agent.runtime.process import start_agent

        start_agent()
    except Exception as exc:  # fail open: the script runs without an agent
        try:
            print(f"llmtop: agent not started: {type(exc).__name__}: {exc}", file=sys.stderr)
        except Exception:
            pass
