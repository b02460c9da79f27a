"""Follow a detached script's log file (``llmtop attach`` → `q` → keep running) for `llmtop watch`.

The launcher writes a detached child's pty output to ``<socket dir>/<pid>.log``; a watcher that
finds that file shows it in the Logs view. Reads are non-blocking and bounded: on open only the
last ``tail_bytes`` are read, then whatever was appended since the previous read.
"""

from __future__ import annotations

import os
from pathlib import Path

TAIL_BYTES = 256 * 1024
READ_MAX = 1024 * 1024  # at most this much per call, so one frame never stalls on a huge burst


def detached_log_path(socket_path: Path, pid: int) -> Path:
    """Where ``Child.detach()`` puts the output of script ``pid`` whose agent listens on ``socket_path``."""
    return socket_path.parent / f"{pid}.log"


class LogTail:
    """Complete lines appended to a file since the last ``read()``; a partial last line waits."""

    def __init__(self, path: Path, tail_bytes: int = TAIL_BYTES) -> None:
        self.path = path
        self.tail_bytes = tail_bytes
        self._pos: int | None = None
        self._partial = b""

    def read(self) -> list[str]:
        try:
            size = os.stat(self.path).st_size
        except OSError:
            return []
        if self._pos is None or size < self._pos:  # first read, or the file was truncated/replaced
            self._pos = max(0, size - self.tail_bytes)
            self._partial = b""
            skip_first = self._pos > 0  # starting mid-file: the first line is cut, drop it
        else:
            skip_first = False
        if size == self._pos:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read(min(size - self._pos, READ_MAX))
        except OSError:
            return []
        self._pos += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        if skip_first and lines:
            lines = lines[1:]
        return [line.decode("utf-8", "replace") for line in lines]
