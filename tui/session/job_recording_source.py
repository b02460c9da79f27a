"""A recorded job replayed in time: every rank's recording into one ``JobModel``, on one clock.

Each rank's file is a ``RankReplay``: a ``RecordingSource`` that feeds its own model of the job
(``job.model_for("host:pid")``) and is moved by the job's clock rather than its own.
``JobRecordingSource`` is what the replay app drives: it inherits ``RecordingSource``'s control
surface (play/pause, speed, seeks posted from any thread and carried out by the worker between
batches, the ``done``/``error``/``on_error`` contract) and moves every rank to the same moment.

The clock: the recordings' own timestamps. The job's time 0 is the earliest rank's first event; a
rank whose recording starts ``offset`` seconds later is at ``t - offset`` in its own recording, so
ranks that started at different wall times stay aligned as they ran (before its start a rank shows
only its Session). Every seek is a seek by time on every rank, done by each rank's own
``RecordingSource._seek`` (a keyframe and the events after it when going back): seeking back gives
exactly the state a fresh replay to that time gives. Step seeks (``,``/``.``/go to step) follow the
reference rank, the lowest one recorded: the job goes to the time it finished that step.

Bad files: a rank file that cannot be opened is left out with a one-line note (``notes``); a block
found bad while replaying stops that rank there (its model lost, with the reason, a note) and the
other ranks go on; a later seek tries it again. Only when no rank can be read is it an error: the
constructor raises ``RecordingError``, or the worker sets ``error`` and calls ``on_error``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from llmtop.protocol.recording import Position, RecordingError
from llmtop.protocol.recording.job import rank_of
from llmtop.tui.session.job import JobModel
from llmtop.tui.session.model import LOST, SessionModel
from llmtop.tui.session.recording_source import RecordingSource, failure_text


class RankReplay(RecordingSource):
    """One rank's recording, moved by the job's clock: ``offset`` is its start after the job's."""

    key = ""
    offset = 0.0
    model: SessionModel
    failed: str | None = None  # why it stopped (a bad block), until a seek tries again

    @property
    def rank(self) -> int | None:
        rank = self.reader.session.rank
        return rank if rank is not None else rank_of(self.path)

    def _target(self, kind: str, value: float) -> tuple[Position, float | None]:
        if kind == "time" and value < 0:
            return Position(0, 0), 0.0  # the job's clock is before this rank started: its Session only
        return super()._target(kind, value)

    def advance_to(self, t: float) -> float | None:
        """Play on to ``t`` (seconds into this recording); the time reached when a batch cut it short."""
        more, last_t = self._advance(self.model, t)
        self.position = last_t if more else min(max(t, 0.0), self.duration)
        return last_t if more else None


class JobRecordingSource(RecordingSource):
    """Replays the rank files ``files`` (one per rank, any order) into ``job``. ``path`` names the
    replay (the title); ``primary`` is the file whose rank is shown first (default: the lowest)."""

    def __init__(self, files: Sequence[str | os.PathLike[str]], *, path: str | None = None,
                 primary: str | os.PathLike[str] | None = None, speed: float = 1.0, start: str = "begin",
                 playing: bool = True, job: JobModel | None = None) -> None:
        self.path = path if path is not None else str(files[0])
        self.job = job if job is not None else JobModel()
        self.notes: list[str] = []  # one line each: files left out, ranks stopped at a bad block
        lanes: list[RankReplay] = []
        for file in files:
            try:
                lanes.append(RankReplay(file, playing=False))
            except RecordingError as exc:
                self.notes.append(f"{exc}: this rank is left out")
        if not lanes:
            raise RecordingError(f"no rank of the job can be read: {'; '.join(self.notes)}")
        self.notes += [lane.warning for lane in lanes if lane.warning]
        lanes.sort(key=lambda lane: (lane.rank is None, lane.rank or 0, lane.path))
        self._start_t = min(lane.reader.start for lane in lanes)
        self._end_t = max(lane.reader.end_t for lane in lanes)
        self.primary_key: str | None = None
        for lane in lanes:
            session = lane.reader.session
            host = session.hostname or "?"
            key = f"{host}:{session.pid}"
            while key in self.job.models:  # the same process twice (a copied file): keep both
                key += "'"
            lane.key, lane.offset = key, lane.reader.start - self._start_t
            lane.model = self.job.model_for(key)
            self.job.hosts[key] = host
            if primary is not None and os.path.abspath(lane.path) == os.path.abspath(primary):
                self.primary_key = key
        self.lanes = lanes
        self.reference = lanes[0]
        self.reader = self.reference.reader  # the transport bar counts the reference rank's steps
        self._init_transport(speed, start, playing)

    # -- what the UI shows

    @property
    def duration(self) -> float:
        return max(0.0, self._end_t - self._start_t)

    @property
    def warning(self) -> str | None:
        return "; ".join(self.notes) if self.notes else None

    @property
    def at_end(self) -> bool:
        return all(lane.at_end or lane.failed for lane in self.lanes)

    def now(self) -> float:
        return self._start_t + self.position

    # -- the worker

    def run(self, model: SessionModel | None = None) -> None:
        """Replay until stopped (``model`` is unused: each rank has its own in ``job``)."""
        try:
            self._run(model)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - never raise out of the worker
            self._fail_all(failure_text(exc))
        finally:
            self.done.set()
            for lane in self.lanes:
                lane.reader.close()

    def _job_time(self, kind: str, value: float) -> float:
        """Seconds into the job that a request asks for (a step: when the reference rank finished it)."""
        if kind == "end":
            return self.duration
        if kind in ("time", "rel"):
            t = value if kind == "time" else self.position + value
            return min(max(t, 0.0), self.duration)
        ref = self.reference
        n = int(value)
        if kind == "step+":
            n += ref.step if ref.step is not None else (ref.reader.first_step or 0) - 1
            if ref.reader.first_step is not None and n < ref.reader.first_step:
                return 0.0
        return min(self.duration, ref.offset + ref.reader.time_at(ref.reader.position_of_step(n)))

    def _seek(self, model: Any, kind: str, value: float) -> None:
        t = self._job_time(kind, value)
        for lane in self.lanes:
            lane.failed = None  # a seek tries a rank that stopped at a bad block again
        for lane in self.lanes:
            self._guarded(lane, lambda lane=lane: lane._seek(lane.model, "time", t - lane.offset))
        self.seeks += 1
        self.position = t
        self.step = self.reference.step
        self._last_tick = time.monotonic()

    def _play(self, model: Any) -> None:
        now = time.monotonic()
        target = self.position + (now - self._last_tick) * self.speed
        self._last_tick = now
        behind: float | None = None  # the earliest time a rank's batch stopped at
        for lane in self.lanes:
            if lane.failed or lane.at_end:
                continue
            reached = self._guarded(lane, lambda lane=lane: lane.advance_to(target - lane.offset))
            if reached is not None:
                at = reached + lane.offset
                behind = at if behind is None else min(behind, at)
        self.step = self.reference.step
        if behind is not None:  # more is due: the clock waits for the data, never skips it
            self.position = max(self.position, behind)
        elif self.at_end:
            self.position = self.duration
            self.playing = False
        else:
            self.position = min(target, self.duration)

    def _guarded(self, lane: RankReplay, body: Callable[[], Any]) -> Any:
        """``body()`` for one rank: a bad block stops that rank (a note, its model lost), never the job."""
        try:
            return body()
        except Exception as exc:  # noqa: BLE001 - one rank's broken file must not end the others
            lane.failed = failure_text(exc)
            lane.seeks = 0  # its event stream broke off mid-block: the next seek rebuilds it whole
            note = f"rank {lane.rank if lane.rank is not None else '?'} stopped: {lane.failed}"
            if note not in self.notes:
                self.notes.append(note)
            with lane.model.lock:
                lane.model.set_connection(LOST, lane.failed)
            if all(other.failed for other in self.lanes):
                self._fail_all("; ".join(str(other.failed) for other in self.lanes))
            return None

    def _fail_all(self, error: str) -> None:
        """No rank can go on: the replay ends, as a one-rank replay does at a bad block."""
        self.error = error
        self.stop()
        if self.on_error is not None:
            self.on_error()
