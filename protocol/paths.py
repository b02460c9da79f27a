"""Where agents listen. Shared by the agent (to bind) and the viewer (to find and list)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


def socket_dir() -> Path:
    """``$XDG_RUNTIME_DIR/llmtop``, else ``/tmp/llmtop-<uid>``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "llmtop"
    return Path(f"/tmp/llmtop-{os.getuid()}")


def socket_path_for(pid: int) -> Path:
    """The socket an agent in process ``pid`` listens on, unless ``$LLMTOP_SOCKET`` chose another."""
    return socket_dir() / f"{pid}.sock"


def info_path(sock: Path) -> Path:
    """A small JSON file beside each socket so ``llmtop ls`` can describe an agent without connecting."""
    return sock.with_suffix(".json")


@dataclass
class AgentInfo:
    pid: int
    socket: str
    argv: list[str]
    started: float

    @property
    def script(self) -> str:
        return " ".join(self.argv) if self.argv else "?"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_agents(directory: Path | None = None) -> list[AgentInfo]:
    """Live agents whose info files are in ``directory``; stale files of dead processes are ignored."""
    directory = directory or socket_dir()
    found: list[AgentInfo] = []
    if not directory.is_dir():
        return found
    for meta in sorted(directory.glob("*.json")):
        try:
            data = json.loads(meta.read_text())
            info = AgentInfo(int(data["pid"]), str(data["socket"]), list(data["argv"]), float(data["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(info.pid) and os.path.exists(info.socket):
            found.append(info)
    return found


def resolve_target(target: str) -> Path:
    """``PID`` or a socket path → the socket path. Raises ValueError with a one-line message."""
    if target.isdigit():
        pid = int(target)
        for info in list_agents():
            if info.pid == pid:
                return Path(info.socket)
        candidate = socket_path_for(pid)
        if candidate.exists():
            return candidate
        raise ValueError(f"no llmtop agent found for pid {pid} (try `llmtop ls`)")
    path = Path(target)
    if not path.exists():
        raise ValueError(f"no such socket: {target}")
    return path
