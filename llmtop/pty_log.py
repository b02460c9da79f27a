"""The script's output on its way to the dashboard: the *holder*, a tiny process that owns the pty's
reading end from the start and copies it into ``<socket dir>/<pid>.log`` (so the script outlives its
viewer), the creation of that log file, and ``_LineSplitter``, which turns the bytes read back from the
log into LogLines as a terminal would show them. ``child.py`` starts the holder and follows the log.
"""

from __future__ import annotations

import codecs
import re
import time
from collections import deque
from pathlib import Path

from llmtop.protocol.events import LogLine
from llmtop.protocol.paths import create_exclusive, private_socket_dir

MAX_LINE_CHARS = 8192


class _LineSplitter:
    """Turns a stream's text into LogLines as a terminal would show them.

    ``\\n`` ends a line. A ``\\r``-terminated segment (a progress bar update) and an unterminated
    line left quiet for a moment are provisional: the line that follows on the same stream is sent
    with ``replace=True``, meaning "overwrite the previous line of this stream" (as the viewer's
    ``SessionModel.add_log`` does).
    """

    def __init__(self, stream: str, out: deque[LogLine]) -> None:
        self.stream = stream
        self.out = out
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.partial = ""
        self.cr = False  # a chunk ended in \r: it may be the first half of \r\n
        self.shown = ""  # the partial text already shown provisionally
        self.provisional = False  # the last line sent on this stream will be overwritten

    def feed(self, data: bytes) -> None:
        text = self.decoder.decode(data)
        if self.cr:
            text = "\r" + text
            self.cr = False
        if text.endswith("\r"):
            self.cr = True
            text = text[:-1]
        text = text.replace("\r\n", "\n")
        parts = re.split(r"([\r\n])", text)
        for i in range(0, len(parts), 2):
            self.partial += parts[i]
            term = parts[i + 1] if i + 1 < len(parts) else ""
            if term == "\n":
                self._emit(provisional=False)
            elif term == "\r":
                if self.partial and self.partial == self.shown:
                    self.partial = self.shown = ""  # already on screen, provisionally
                elif self.partial.strip():
                    self._emit(provisional=True)
                else:  # "\r    \r" clears the line: the next text overwrites what was there
                    self.partial = ""
            if len(self.partial) > MAX_LINE_CHARS:
                self._emit(provisional=False)

    def idle(self) -> None:
        if self.cr:
            self.cr = False
            if self.partial.strip():
                self._emit(provisional=True)
            else:
                self.partial = ""
        elif self.partial and self.partial != self.shown:
            self.out.append(LogLine(t=time.time(), text=self.partial, stream=self.stream, replace=self.provisional))
            self.shown = self.partial
            self.provisional = True

    def close(self) -> None:
        self.partial += self.decoder.decode(b"", final=True)
        self.cr = False
        if self.partial:
            self._emit(provisional=False)

    def _emit(self, provisional: bool) -> None:
        self.out.append(LogLine(t=time.time(), text=self.partial, stream=self.stream, replace=self.provisional))
        self.provisional = provisional
        self.partial = ""
        self.shown = ""


# The holder: owns the pty's reading end from the start and copies it into the log, so the script
# never blocks on a full pty nor gets EIO/SIGHUP when llmtop goes (even by kill -9). It ends when
# every writer of the pty is gone. A failed write (disk full) drops output rather than block.
_HOLDER = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
log, master = int(sys.argv[1]), int(sys.argv[2])
while True:
    try:
        data = os.read(master, 65536)
    except OSError:
        break
    if not data:
        break
    try:
        while data:
            data = data[os.write(log, data):]
    except OSError:
        pass
"""


def _open_log(directory: Path, pid: int) -> tuple[Path, int]:
    """Create ``directory/<pid>.log`` afresh (``O_EXCL|O_NOFOLLOW``, relative to the directory);
    in a directory that will not have it (someone else's entry in a shared /tmp), a private one."""
    try:
        return directory / f"{pid}.log", create_exclusive(directory, f"{pid}.log")
    except OSError:
        fallback = private_socket_dir()
        return fallback / f"{pid}.log", create_exclusive(fallback, f"{pid}.log")
