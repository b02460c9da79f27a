"""A recording as a viewer source, with a replay clock: play/pause, speed, seek.

``run(model)`` (a worker thread) applies the recording's events to the ``SessionModel`` as the
replay clock passes their times. Transport calls (``toggle``, ``seek_time``, ``next_step`` …) may
come from any thread; they post a request that the worker carries out between batches.

A seek resets the model, applies the nearest keyframe at or before the target and then the events
up to it, all under one hold of ``model.lock`` so that no frame shows a half-built state. A short
hop forward with no keyframe in between (next step, +5 s while playing) just applies the events
in between, exactly as playing would.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

from llmtop.protocol.events import Event, Step
from llmtop.protocol.frames import ProtocolError
from llmtop.protocol.recording import Position, RecordingReader
from llmtop.tui.session.model import LOST, SessionModel

SPEEDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
MIN_SPEED, MAX_SPEED = SPEEDS[0], SPEEDS[-1]
REPLAY = "replay"  # the connection state a replayed model shows
BATCH = 5000  # events applied per hold of the model lock while playing
TICK_S = 0.05


def clamp_speed(speed: float) -> float:
    return min(MAX_SPEED, max(MIN_SPEED, float(speed)))


def failure_text(exc: Exception) -> str:
    """Why a replay stopped, in one line: a RecordingError is the file's defect; anything else is llmtop's."""
    if isinstance(exc, ProtocolError):
        return str(exc)
    return f"internal error while replaying ({type(exc).__name__}: {exc}); please report it"


class RecordingSource:
    """Replays ``path``. Opening reads only the header and the index (``RecordingError`` if the file
    is unusable). ``start`` is "begin" or "end" (the final state at once); ``playing`` starts the
    clock at once."""

    def __init__(self, path: str | os.PathLike[str], *, speed: float = 1.0, start: str = "begin",
                 playing: bool = True) -> None:
        self.path = str(path)
        self.reader = RecordingReader(self.path)
        self._init_transport(speed, start, playing)

    def _init_transport(self, speed: float, start: str, playing: bool) -> None:
        """The clock, the cursor and the request the worker carries out (the job replay has them too)."""
        self.speed = clamp_speed(speed)
        self.playing = playing
        self.position = 0.0  # seconds from the recording's start
        self.step: int | None = None  # the latest step applied
        self.seeks = 0
        self._cond = threading.Condition()
        self._stop = False
        self._request: tuple[str, float] | None = ("end", 0.0) if start == "end" else ("time", 0.0)
        self._cursor = Position(0, 0)
        self._stream: Iterator[tuple[Position, Event, float]] | None = None
        self._next: tuple[Position, Event, float] | None = None
        self._last_tick = time.monotonic()
        self.done = threading.Event()  # set when the first request has been carried out
        self.error: str | None = None  # why the replay stopped, if a block of the file is bad
        self.on_error: Callable[[], None] | None = None  # called (worker thread) once error is set

    # -- what the UI shows

    @property
    def duration(self) -> float:
        return self.reader.duration

    @property
    def warning(self) -> str | None:
        return self.reader.warning

    @property
    def at_end(self) -> bool:
        return self._cursor.block >= len(self.reader.data)

    def now(self) -> float:
        """Wall-clock time at the replay position (the app's clock during a replay)."""
        return self.reader.start + self.position

    # -- transport (any thread)

    def _post(self, kind: str, value: float = 0.0) -> None:
        with self._cond:
            pending = self._request
            if pending is not None and pending[0] == kind and kind in ("rel", "step+"):
                value += pending[1]  # key repeats faster than the worker: add them up
            self._request = (kind, value)
            self._cond.notify_all()

    def play(self) -> None:
        with self._cond:
            if self.at_end and self._request is None:
                self._request = ("time", 0.0)  # play at the end starts over
            self.playing = True
            self._last_tick = time.monotonic()
            self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            self.playing = False
            self._cond.notify_all()

    def toggle(self) -> None:
        if self.playing:
            self.pause()
        else:
            self.play()

    def set_speed(self, speed: float) -> None:
        with self._cond:
            self.speed = clamp_speed(speed)
            self._cond.notify_all()

    def faster(self) -> None:
        self.set_speed(next((s for s in SPEEDS if s > self.speed), MAX_SPEED))

    def slower(self) -> None:
        self.set_speed(next((s for s in reversed(SPEEDS) if s < self.speed), MIN_SPEED))

    def seek_time(self, t: float) -> None:
        self._post("time", t)

    def seek_relative(self, dt: float) -> None:
        self._post("rel", dt)

    def seek_step(self, n: int) -> None:
        self._post("step", n)

    def next_step(self) -> None:
        self._post("step+", 1)

    def prev_step(self) -> None:
        self._post("step+", -1)

    def seek_start(self) -> None:
        self._post("time", 0.0)

    def seek_end(self) -> None:
        self._post("end")

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    # -- the worker

    def run(self, model: SessionModel) -> None:
        try:
            self._run(model)
        except Exception as exc:  # noqa: BLE001 - a bad block: say so, never raise out of the worker
            self.error = failure_text(exc)
            with model.lock:
                model.set_connection(LOST, self.error)
            if self.on_error is not None:
                self.on_error()
        finally:
            self.done.set()
            self.reader.close()

    def _run(self, model: SessionModel) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                request, self._request = self._request, None
            if request is not None:
                self._seek(model, *request)
                self.done.set()
            elif self.playing:
                self._play(model)
            with self._cond:
                if self._stop:
                    return
                if self._request is None:
                    self._cond.wait(TICK_S if self.playing else 1.0)

    def _target(self, kind: str, value: float) -> tuple[Position, float | None]:
        r = self.reader
        if kind == "end":
            return r.end_position(), r.duration
        if kind in ("time", "rel"):
            t = value if kind == "time" else self.position + value
            t = min(max(t, 0.0), r.duration)
            return r.position_of_time(t), t
        if kind == "step+":
            current = self.step if self.step is not None else (r.first_step or 0) - 1
            n = current + int(value)
            if r.first_step is not None and n < r.first_step:
                return Position(0, 0), 0.0
            return r.position_of_step(n), None
        return r.position_of_step(int(value)), None

    def _seek(self, model: SessionModel, kind: str, value: float) -> None:
        pos, t = self._target(kind, value)
        r = self.reader
        forward = (pos.block, pos.event) >= (self._cursor.block, self._cursor.event)
        if forward and self.seeks and not self._keyframe_between(self._cursor, pos):
            self._apply_until(model, pos)
        else:
            events = r.rebuild(pos)
            with model.lock:
                model.reset()
                model.set_connection(REPLAY)
                step = None
                for event in events:
                    model.apply(event)
                    if isinstance(event, Step):
                        step = event.step
                self.step = step
            self._cursor = pos
            self._stream = None
            self._next = None
        self.seeks += 1
        self.position = t if t is not None else r.time_at(pos)
        self._last_tick = time.monotonic()

    def _keyframe_between(self, a: Position, b: Position) -> bool:
        r = self.reader
        lo = r.data[a.block] if a.block < len(r.data) else len(r.blocks)
        hi = r.data[b.block] if b.block < len(r.data) else len(r.blocks)
        return any(lo < k < hi for k in r.keyframes)

    def _items(self) -> Iterator[tuple[Position, Event, float]]:
        if self._stream is None:
            self._stream = self.reader.timed_events(self._cursor)
        while True:
            if self._next is None:
                self._next = next(self._stream, None)
                if self._next is None:
                    return
            yield self._next
            self._next = None

    def _apply_until(self, model: SessionModel, pos: Position) -> None:
        """Apply events from the cursor up to (not including) ``pos``."""
        limit = (pos.block, pos.event)
        with model.lock:
            for at, event, _t in self._items():
                if (at.block, at.event) >= limit:
                    break
                model.apply(event)
                if isinstance(event, Step):
                    self.step = event.step
        self._cursor = pos

    def _play(self, model: SessionModel) -> None:
        now = time.monotonic()
        target = self.position + (now - self._last_tick) * self.speed
        self._last_tick = now
        more, last_t = self._advance(model, target)
        if more:
            self.position = last_t  # more is due: the clock waits for the data, never skips it
            return
        if self.at_end:
            self.position = self.duration
            self.playing = False
        else:
            self.position = min(target, self.duration)

    def _advance(self, model: SessionModel, target: float) -> tuple[bool, float]:
        """Apply the events up to time ``target`` (at most ``BATCH`` of them, under one hold of the
        model's lock): (more events are due, the time of the last one applied)."""
        applied = 0
        last_t = self.position
        with model.lock:
            for at, event, t in self._items():
                if t > target or applied >= BATCH:
                    self._cursor = at
                    break
                model.apply(event)
                applied += 1
                last_t = t
                if isinstance(event, Step):
                    self.step = event.step
            else:
                self._cursor = self.reader.end_position()
        return applied >= BATCH, last_t
