"""The agent's options from the environment, and the socket this process claims.

``options_from_env`` builds ``core.Options`` from the ``LLMTOP_*`` variables (``ENV``), then keyword
overrides; a bad value is ignored with a one-line note, never an error (the agent must not stop the
script over a typo). ``resolve_socket`` decides which process of a launch owns ``LLMTOP_SOCKET``
and gives every other one a pid path beside it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from llmtop.agent.runtime.core import Options
from llmtop.agent.runtime.ranks import identity, launcher_of
from llmtop.protocol.paths import socket_path_for

# Every option with an environment variable (the others are set by keyword: tests, benchmarks).
ENV: dict[str, tuple[str, type]] = {
    "LLMTOP_TICK": ("tick_s", float),
    "LLMTOP_BUDGET": ("budget_pct", float),
    "LLMTOP_LAYER_EVERY": ("layer_every", int),
    "LLMTOP_OPS_EVERY": ("ops_every", int),
    "LLMTOP_FLOPS": ("flops", bool),
    "LLMTOP_HISTORY": ("history", int),
    "LLMTOP_CLIENT_BUFFER": ("client_buffer", int),
    "LLMTOP_RECORD": ("record", str),
    "LLMTOP_MAX_CLIENTS": ("max_clients", int),
    "LLMTOP_MAX_PENDING": ("max_pending", int),
    "LLMTOP_HANDSHAKE_S": ("handshake_s", float),
    "LLMTOP_SOCKET": ("socket", str),
    "LLMTOP_STALL_S": ("stall_s", float),
    "LLMTOP_HANG_S": ("hang_s", float),
}


def _parse(kind: type, raw: str) -> Any:
    if kind is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(raw)
    value = kind(raw)
    if kind in (int, float) and value < 0:
        raise ValueError(raw)
    return value


def options_from_env(env: dict[str, str] | None = None, **overrides: Any) -> Options:
    """``Options`` from ``LLMTOP_*`` variables, then keyword overrides. A bad value or an unknown
    option is ignored with a one-line note on stderr (the agent must not stop the script over a typo)."""
    env = os.environ if env is None else env
    opts = Options()
    for var, (name, kind) in ENV.items():
        raw = env.get(var)
        if raw is None or (kind is str and raw == ""):
            continue
        try:
            value = _parse(kind, raw)
        except ValueError:
            print(f"llmtop: ignoring {var}={raw!r} (expected {kind.__name__} >= 0)", file=sys.stderr)
            continue
        setattr(opts, name, value)
    if opts.tick_s <= 0:
        opts.tick_s = Options.tick_s
    opts.history = max(1, opts.history)
    known = {f.name for f in dataclasses.fields(Options)}
    for key, value in overrides.items():
        if key in known:
            setattr(opts, key, value)
        else:
            print(f"llmtop: ignoring unknown option {key}={value!r}", file=sys.stderr)
    return opts


def resolve_socket(opts: Options, env: dict[str, str] | None = None, pid: int | None = None) -> Path:
    """Which socket this process listens on.

    ``LLMTOP_SOCKET`` (or ``socket=``) is claimed by one process only: under ``llmtop attach
    script.py`` the direct child of the attach process (``LLMTOP_PARENT_PID``); otherwise the first
    process to bind it, except launcher processes and non-zero ranks. Everyone else gets a pid path
    beside it, so Python processes started with the same environment never collide.
    """
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    chosen = opts.socket
    if not chosen:
        return socket_path_for(pid)
    path = Path(str(chosen))
    beside = path.parent / f"{pid}.sock"
    parent = env.get("LLMTOP_PARENT_PID", "")
    if parent:
        return path if parent.isdigit() and int(parent) == os.getppid() else beside
    # Launchers start no agent (autostart.py); should one be started in code, it keeps a pid socket.
    nonzero_rank = env.get("RANK", "0") not in ("", "0") or identity(env).rank not in (None, 0)
    if launcher_of(list(getattr(sys, "orig_argv", sys.argv))) or nonzero_rank:
        return beside
    return path
