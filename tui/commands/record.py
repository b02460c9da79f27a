"""`llmtop record PID|SOCKET -o FILE`: a headless recorder client, and the same recorder run in the
background for the dashboard's record key (``start_tui_recording``).

The recorder connects as ``role="recorder"``, receives the agent's snapshot and then live events,
and writes them with ``RecordingWriter``: the same file as ``LLMTOP_RECORD`` / ``attach --record``.
It stops cleanly on SIGINT/SIGTERM (appending an ``End`` marked ``detached``) or when the agent ends
(its own ``End`` is the last event).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from llmtop.protocol.events import End, Event, Session, encode
from llmtop.protocol.frames import ProtocolError
from llmtop.protocol.paths import resolve_target
from llmtop.protocol.recording import KeyframeBuilder, RecordingWriter
from llmtop.protocol.stream import Connection
from llmtop.tui.commands.common import fail

HELP = "Record a running agent's session to a file, without a dashboard (replay it with `llmtop replay`)."
FLUSH_TICK_S = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="the agent: a PID (see `llmtop ls`) or a socket path")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the recording to write")
    parser.add_argument("--wait", type=float, default=0.0, metavar="S",
                        help="keep trying to connect for S seconds (an agent that is still starting)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")


class Recorder:
    """One recorder connection. ``run()`` blocks until the agent ends, the connection is lost or
    ``stop()`` is called (from any thread or a signal handler); it always leaves a closed, indexed
    file behind once the session header has arrived."""

    def __init__(self, sock: str | os.PathLike[str], path: str, *, wait_s: float = 0.0,
                 flush_s: float | None = None, keyframe_s: float | None = None) -> None:
        self.sock = Path(sock)
        self.path = str(path)
        self.wait_s = wait_s
        self.writer_options: dict[str, float] = {}
        if flush_s is not None:
            self.writer_options["flush_s"] = flush_s
        if keyframe_s is not None:
            self.writer_options["keyframe_s"] = keyframe_s
        self.writer: RecordingWriter | None = None
        self.builder = KeyframeBuilder()
        self.events = 0
        self.end: End | None = None
        self.error: str | None = None
        self.user_stopped = False
        self.started = threading.Event()  # the file exists and is being written
        self._stop = threading.Event()
        self._conn: Connection | None = None
        self._pending: list[tuple[bytes, Event]] = []

    # -- control

    def stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            conn.interrupt()

    @property
    def steps(self) -> int:
        return self.writer.steps if self.writer is not None else 0

    @property
    def bytes_written(self) -> int:
        return self.writer.bytes_written if self.writer is not None else 0

    # -- work

    def _connect(self) -> Connection | None:
        deadline = time.monotonic() + self.wait_s
        while not self._stop.is_set():
            try:
                return Connection(self.sock, role="recorder")
            except (ConnectionError, OSError) as exc:
                if time.monotonic() >= deadline:
                    self.error = str(exc)
                    return None
                self._stop.wait(0.1)
        return None

    def run(self) -> int:
        try:
            conn = self._connect()
        except ProtocolError as exc:
            self.error = str(exc)
            return 1
        if conn is None:
            return 1 if self.error else 0
        self._conn = conn
        if self._stop.is_set():  # stopped while connecting: the shutdown above missed this socket
            conn.close()
            return 0
        ticker = threading.Thread(target=self._tick, name="llmtop-record-flush", daemon=True)
        ticker.start()
        status = 0
        try:
            for event in conn.events():
                self._add(event)
                if self._stop.is_set():
                    break
        except ProtocolError as exc:
            self.error = str(exc)
            status = 1
        except OSError as exc:
            self.error = f"cannot write {self.path}: {exc.strerror or exc}"
            status = 1
        finally:
            conn.close()
            self._conn = None
            self._stop.set()
            ticker.join()
            self._close()
        if self.writer is None and status == 0 and self.error is None:
            self.error = "the agent closed the connection before sending its session"
            status = 1
        return status

    def _add(self, event: Event) -> None:
        if event.KIND in ("hello", "stats"):
            return  # per-connection transport state, not part of the session
        frame = encode(event)
        if self.writer is None:
            if not isinstance(event, Session):
                self._pending.append((frame, event))  # keep order until the header can be written
                return
            self.writer = RecordingWriter(self.path, event, **self.writer_options)  # type: ignore[arg-type]
            self.started.set()
            for f, e in self._pending:
                self._append(f, e)
            self._pending.clear()
        self._append(frame, event)
        if isinstance(event, End):
            self.end = event

    def _append(self, frame: bytes, event: Event) -> None:
        writer = self.writer
        assert writer is not None
        writer.append(frame, event)
        self.builder.add(frame, event)
        self.events += 1
        now = time.monotonic()
        if writer.wants_keyframe(now):
            writer.keyframe(self.builder.frames())

    def _tick(self) -> None:
        """Writes pending frames at least every flush interval even when no event arrives."""
        while not self._stop.wait(FLUSH_TICK_S):
            writer = self.writer
            if writer is not None:
                try:
                    writer.maybe_flush()
                except OSError as exc:
                    self.error = f"cannot write {self.path}: {exc.strerror or exc}"
                    self.stop()

    def _close(self) -> None:
        writer = self.writer
        if writer is None:
            return
        end = None
        if self.end is None:
            # Stopped by the user: "detached"; the agent vanished without its End: "lost".
            end = End(t=time.time(), reason="detached" if self.user_stopped else "lost")
        try:
            writer.close(end)
        except OSError as exc:
            self.error = f"cannot write {self.path}: {exc.strerror or exc}"

    def request_stop(self) -> None:
        """Stop on the user's behalf (Ctrl-C, the record key): the End is marked ``detached``."""
        self.user_stopped = True
        self.stop()


class BackgroundRecording:
    """A ``Recorder`` in a daemon thread: what the dashboard's record key starts and stops."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.status: int | None = None
        self.thread = threading.Thread(target=self._run, name="llmtop-record", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.status = self.recorder.run()

    @property
    def path(self) -> str:
        return self.recorder.path

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 5.0) -> int | None:
        self.recorder.request_stop()
        self.thread.join(timeout)
        return self.status


def default_recording_path(pid: int | None = None, directory: str | None = None) -> str:
    """``llmtop-<pid>-<YYYYmmdd-HHMMSS>.lrec`` in the current directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"llmtop-{pid}-{stamp}.lrec" if pid else f"llmtop-{stamp}.lrec"
    return os.path.join(directory or os.getcwd(), name)


def start_tui_recording(sock: str | os.PathLike[str], path: str | None = None,
                        pid: int | None = None) -> BackgroundRecording:
    """Start recording the agent at ``sock`` to ``path`` (default: a timestamped file in the current
    directory) from a second, recorder connection, so the file gets the agent's full snapshot and
    every event, independent of what the dashboard is showing. ``.stop()`` ends it."""
    return BackgroundRecording(Recorder(sock, path or default_recording_path(pid)))


def run(args: argparse.Namespace) -> int:
    try:
        sock = resolve_target(str(args.target))
    except ValueError as exc:
        return fail("record", str(exc), 1)
    out = Path(args.output)
    if out.is_dir():
        return fail("record", f"{out} is a directory; give a file name with -o", 1)
    recorder = Recorder(sock, str(out), wait_s=args.wait)

    def on_signal(signum: int, frame: Any) -> None:
        recorder.request_stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    if not args.quiet:
        print(f"llmtop: recording {sock} to {out} (Ctrl-C to stop)", file=sys.stderr)
    try:
        status = recorder.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if recorder.error:
        print(f"llmtop record: {recorder.error}", file=sys.stderr)
    if recorder.writer is not None and not args.quiet:
        how = "the script ended" if recorder.end is not None else (
            "stopped" if recorder.user_stopped else "connection lost")
        print(f"llmtop: {how}; wrote {recorder.events} events, {recorder.steps} steps, "
              f"{recorder.bytes_written / 1024:.0f} KiB to {out}", file=sys.stderr)
    return status
