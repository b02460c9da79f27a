"""Process-wide start and stop of the agent: one per process, its ``End`` at exit, fork safety.

``start_agent`` (idempotent) starts the process's agent and installs the process hooks once: an
``atexit`` stop, ``sys.excepthook`` and ``threading.excepthook`` (the script's traceback goes into
``End``, a thread's uncaught exception becomes an ``Anomaly``; both chain to the previous hooks), and
fork handlers (a fork waits for the agent's tick, at most FORK_WAIT_S; a forked child drops its
copy of the agent).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback
from typing import Any

from llmtop.agent.runtime import core
from llmtop.agent.runtime.agent import Agent
from llmtop.agent.runtime.options import options_from_env
from llmtop.protocol.events import Anomaly

_start_lock = threading.Lock()
_hooks_installed = False
_orig_excepthook: Any = None
_orig_thread_excepthook: Any = None


def start_agent(**options: Any) -> Agent:
    """Start the agent in this process (idempotent); returns the running agent."""
    with _start_lock:
        agent = core.ACTIVE
        if agent is not None and getattr(agent, "pid", None) == os.getpid():
            return agent
        instruments = options.pop("instruments", None)
        agent = Agent(options_from_env(**options), instruments=instruments)
        _install_process_hooks()
        core.ACTIVE = agent  # before start(): instruments may check it while installing
        try:
            agent.start()
        except Exception as exc:
            core.ACTIVE = None
            print(f"llmtop: agent could not start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return agent


def stop_agent() -> None:
    agent = core.ACTIVE
    if agent is None or getattr(agent, "pid", None) != os.getpid():
        return
    core.ACTIVE = None
    agent.stop(reason="stopped", traceback_text=agent.exc_text)


def _at_exit() -> None:
    agent = core.ACTIVE
    if agent is None or agent.pid != os.getpid():
        return
    core.ACTIVE = None
    try:
        agent.stop(reason="exit", traceback_text=agent.exc_text)
    except Exception:
        pass


def _excepthook(tp: type[BaseException], value: BaseException, tb: Any) -> None:
    agent = core.ACTIVE
    if agent is not None and getattr(agent, "pid", None) == os.getpid():
        try:
            agent.exc_text = "".join(traceback.format_exception(tp, value, tb))
        except Exception:
            pass
    (_orig_excepthook or sys.__excepthook__)(tp, value, tb)


def _thread_excepthook(args: Any) -> None:
    agent = core.ACTIVE
    if agent is not None and getattr(agent, "pid", None) == os.getpid() and args.exc_type is not SystemExit:
        try:
            name = getattr(args.thread, "name", "?")
            last = traceback.format_exception_only(args.exc_type, args.exc_value)[-1].strip()
            agent.emit(Anomaly(t=time.time(), what="thread_exception", severity="error",
                               message=f"uncaught exception in thread {name}: {last}", step=agent.current_step))
        except Exception:
            pass
    (_orig_thread_excepthook or threading.__excepthook__)(args)


FORK_WAIT_S = 2.0
_fork_held: Any = None


def _before_fork() -> None:
    global _fork_held
    agent = core.ACTIVE
    if agent is not None and getattr(agent, "pid", None) == os.getpid():
        lock = agent._tick_lock
        if lock.acquire(timeout=FORK_WAIT_S):
            _fork_held = lock


def _after_fork_in_parent() -> None:
    global _fork_held
    lock, _fork_held = _fork_held, None
    if lock is not None:
        lock.release()


def _after_fork_in_child() -> None:
    global _fork_held
    _fork_held = None  # the child's copy of the lock dies with its agent
    agent = core.ACTIVE
    core.ACTIVE = None
    if agent is not None:
        try:
            agent.abandon()
        except Exception:
            pass


def _install_process_hooks() -> None:
    global _hooks_installed, _orig_excepthook, _orig_thread_excepthook
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_at_exit)
    _orig_excepthook = sys.excepthook
    sys.excepthook = _excepthook
    _orig_thread_excepthook = threading.excepthook
    threading.excepthook = _thread_excepthook
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
