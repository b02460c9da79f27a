"""Sources feed a SessionModel from somewhere: a live agent's socket, a list of events, a recording.

Every source follows one interface: ``run(model)`` blocks (it is called in a worker thread) and
applies events under ``model.lock``; ``stop()`` makes ``run`` return soon, from any thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from llmtop.protocol.events import Event
from llmtop.protocol.frames import ProtocolError
from llmtop.protocol.stream import Connection
from llmtop.tui.session.model import CONNECTING, ENDED, LIVE, LOST, SessionModel

NOTE_MAX = 200  # characters of a status note: it is one line of the status bar


def one_line(text: str) -> str:
    """A message from the wire as one bounded line (it may hold newlines or megabytes)."""
    text = " ".join(text.split())
    return text if len(text) <= NOTE_MAX else text[: NOTE_MAX - 1] + "…"


class Source(Protocol):
    def run(self, model: SessionModel) -> None: ...

    def stop(self) -> None: ...


class SocketSource:
    """A live agent. Reconnects every ``retry_s`` after a loss, keeping the last state on screen.

    ``give_up`` (optional) is asked between attempts; when it returns True (the attached child has
    ended) the source stops retrying. A reconnect resets the model and re-ingests the snapshot.
    """

    def __init__(self, path: str | os.PathLike[str], *, retry_s: float = 1.0,
                 first_retry_s: float = 0.1, give_up: Callable[[], bool] | None = None) -> None:
        self.path = Path(path)
        self.retry_s = retry_s
        self.first_retry_s = first_retry_s  # quick while the agent is starting up
        self.give_up = give_up
        self._stop = threading.Event()
        self._conn: Connection | None = None
        self.connections = 0
        self.last_error = ""

    def run(self, model: SessionModel) -> None:
        while not self._stop.is_set():
            try:
                conn = Connection(self.path, role="viewer")
            except (ConnectionError, ProtocolError, OSError) as exc:
                self.last_error = one_line(str(exc))
                with model.lock:
                    if model.ended:
                        return
                    # say why on the status line; a refused version stays "lost" until fixed
                    state = LOST if isinstance(exc, ProtocolError) or model.connection == LOST else CONNECTING
                    model.set_connection(state, self.last_error)
                if self._should_give_up(model):
                    return
                self._stop.wait(self.retry_s if self.connections else self.first_retry_s)
                continue
            self._conn = conn
            self.connections += 1
            with model.lock:
                if self.connections > 1 or model.session is not None:
                    model.reset()  # the snapshot that follows rebuilds the state
                model.set_connection(LIVE)
            try:
                self._ingest(conn, model)
            except ProtocolError as exc:  # a frame or event that cannot be accepted: the stream is out of step
                with model.lock:
                    model.set_connection(LOST, one_line(str(exc)))
            except Exception as exc:  # noqa: BLE001 - hostile input must never end the reader thread
                with model.lock:
                    model.set_connection(LOST, one_line(f"bad event from the agent ({type(exc).__name__}: {exc})"))
            finally:
                conn.close()
                self._conn = None
            with model.lock:
                model.skipped += conn.decoder.skipped
                if model.ended:
                    model.set_connection(ENDED)
                    return
                if model.connection != LOST:
                    model.set_connection(LOST, "connection lost")
            if self._should_give_up(model):
                return
            self._stop.wait(self.retry_s)

    def _ingest(self, conn: Connection, model: SessionModel) -> None:
        lock = model.lock
        apply = model.apply
        for event in conn.events():
            if self._stop.is_set():
                return
            with lock:
                apply(event)

    def _should_give_up(self, model: SessionModel) -> bool:
        if self._stop.is_set():
            return True
        if self.give_up is not None and self.give_up():
            return True
        return False

    def stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            conn.interrupt()


class EventsSource:
    """A fixed list of events (tests, benchmarks, canned demos). Applies them all, then returns."""

    def __init__(self, events: Iterable[Event], *, connection: str = LIVE) -> None:
        self.events = list(events)
        self.connection = connection
        self.done = threading.Event()
        self._stop = threading.Event()

    def run(self, model: SessionModel) -> None:
        with model.lock:
            model.set_connection(CONNECTING)
            for event in self.events:
                if self._stop.is_set():
                    break
                model.apply(event)
            if not model.ended:
                model.set_connection(self.connection)
        self.done.set()

    def stop(self) -> None:
        self._stop.set()
