"""A distributed job as the viewer holds it: one ``SessionModel`` per agent stream (one per rank).

Sources (local sockets, a remote host's ``llmtop bridge``) each feed the model of their stream,
keyed by a string unique in the viewer (``"host:pid"``); each model learns its rank from its Session
event. The views draw the selected rank's model, and the Ranks view all of them.

Reading rule: each model has its own lock and nothing here ever holds two at once (a source thread
only takes its own), so the viewer may hold the selected model's lock and still read the others
(``held`` arguments say which one the caller already holds).

Figures per rank (``RankRow``) and for the job (``JobSummary``):

- *busy* time of a step is its duration minus the time blocked in collectives (``comm_ms``): under
  DDP the all-reduce equalises step wall time, so the late rank is the one with the most busy time
  (the others wait for it). ``skew`` is a rank's median busy time over the median of all ranks'
  medians, minus one (+0.25: a quarter slower than the typical rank).
- job tokens/s is the sum over live ranks; the job's step rate is the slowest live rank's (a
  synchronous job advances one step when every rank has made it).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from llmtop.protocol.events import PHASES
from llmtop.protocol.formulas import percentile
from llmtop.tui.session.model import CONNECTING, ENDED, LIVE, LOST, SessionModel
from llmtop.tui.session.recording_source import REPLAY

RECENT_STEPS = 50  # steps per rank behind the p50 and the skew
SPARK_STEPS = 24  # step times per rank kept for the row's sparkline
UNKNOWN_RANK = "?"
SORT_STEP = 5  # percent of skew: rows within one step keep their rank order


@dataclass(frozen=True)
class Identity:
    rank: int | None
    world_size: int | None = None
    job: str = ""
    launcher: str = ""


@dataclass
class RankRow:
    """One stream of the job as the Ranks view shows it (plain values: no lock needed to read)."""

    key: str
    rank: int | None
    label: str  # "0", "1" … or "?" for a stream that has not said its rank
    pid: int | None
    host: str
    status: str  # "live", "connecting", "lost", "ended (exit 0)", "waiting in all_reduce 4.2s"
    state: str  # one of CONNECTING, LIVE, LOST, ENDED, "waiting"
    step: int | None = None
    last_ms: float | None = None
    p50_ms: float | None = None
    busy_ms: float | None = None  # median step time outside collectives
    comm_ms: float | None = None  # median time in collectives per step (None: not measured)
    phases: dict[str, float] = field(default_factory=dict)  # share of recent step time per phase
    tokens_s: float | None = None
    steps_s: float | None = None
    memory: int | None = None  # CUDA allocated, else host RSS
    loss: float | None = None
    skew: float | None = None
    spark: list[float] = field(default_factory=list)
    restarts: int = 0  # older streams of the same rank (elastic restarts)
    version: int = 0


@dataclass
class JobSummary:
    streams: int
    ranks_seen: int
    world_size: int | None
    live: int
    job: str
    launcher: str
    tokens_s: float | None
    steps_s: float | None
    waiting: list[RankRow]
    lost: list[RankRow]
    ended: list[RankRow]

    def ranks_text(self) -> str:
        """"ranks 2/4" (seen / world size) or "2 streams" when no world size is known."""
        if self.world_size:
            return f"ranks {self.ranks_seen}/{self.world_size}"
        return f"{self.streams} streams"


@dataclass
class LayerAcross:
    """One layer (by module path) compared across ranks."""

    path: str
    field: str  # "fwd" or "bwd"
    values: dict[str, float]  # rank label → EMA ms
    min_ms: float
    median_ms: float
    max_ms: float
    min_rank: str
    max_rank: str


class JobModel:
    """Every stream of one job. ``model_for`` may be called from any source's thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards ``models`` only; each model has its own lock
        self.models: dict[str, SessionModel] = {}
        self.hosts: dict[str, str] = {}  # stream key → host, as its source knows it
        # what a source learnt of a stream's rank before (or instead of) its Session saying so: a
        # local source reads the launcher's variables of the process (an agent too old to send them)
        self.hints: dict[str, Identity] = {}
        # the last row made of each stream, kept while its model's version and identity hold: at 64
        # ranks and 4 frames a second most streams have not changed since the last frame
        self._rows: dict[str, tuple[tuple[int, Identity, float], RankRow]] = {}
        self._light: dict[str, tuple[tuple[int, Identity, float], RankRow]] = {}

    def identity(self, key: str, model: SessionModel) -> Identity:
        """Rank, world size and job of a stream (call with its lock held): its Session's, else the hint."""
        s = model.session
        hint = self.hints.get(key)
        if s is not None and s.rank is not None:
            return Identity(s.rank, s.world_size, s.job, s.launcher)
        if hint is not None:
            return hint
        return Identity(None, s.world_size if s is not None else None, s.job if s is not None else "",
                        s.launcher if s is not None else "")

    def model_for(self, key: str) -> SessionModel:
        """The model fed by stream ``key``, created on first use and kept after the stream ends
        (a reconnecting source feeds the same model again)."""
        with self.lock:
            model = self.models.get(key)
            if model is None:
                model = self.models[key] = SessionModel()
            return model

    def items(self) -> list[tuple[str, SessionModel]]:
        with self.lock:
            return list(self.models.items())

    def __len__(self) -> int:
        with self.lock:
            return len(self.models)

    def version(self) -> int:
        """Changes whenever any stream changed (reads without locks: a racy read only delays a frame)."""
        return sum(m.version for _, m in self.items()) + len(self)

    def is_job(self) -> bool:
        """A stream says it belongs to a job of several ranks, or two streams know their ranks.
        Other Python processes of a command (helpers with an agent but no rank) make no job."""
        ranked = 0
        for key, model in self.items():
            with model.lock:
                ident = self.identity(key, model)
            if (ident.world_size or 0) > 1:
                return True
            ranked += ident.rank is not None
        return ranked > 1

    # --- rows ------------------------------------------------------------------------------------

    def rows(self, held: SessionModel | None = None, window_s: float = 10.0, light: bool = False) -> list[RankRow]:
        """One row per rank (the newest stream of each rank; a rank's older streams count as its
        restarts), sorted by skew, worst first; then streams whose rank is unknown. ``light``: only
        what the header needs (status, tokens/s, steps/s), for frames of the other views."""
        rows = []
        for key, model in self.items():
            with _locked(model, held):
                ident = self.identity(key, model)
                stamp = (model.version, ident, window_s)
                cached = self._rows.get(key)
                if cached is None or cached[0] != stamp:
                    cached = self._light.get(key) if light else None
                if cached is not None and cached[0] == stamp:
                    row = cached[1]
                else:
                    row = rank_row(key, model, self.hosts.get(key, ""), window_s, ident, light)
                    (self._light if light else self._rows)[key] = (stamp, row)
            rows.append(row)
        return sort_by_skew(fill_skew(newest_per_rank(rows)))

    def summary(self, held: SessionModel | None = None, rows: list[RankRow] | None = None) -> JobSummary:
        rows = self.rows(held) if rows is None else rows
        items = self.items()
        world = None
        job = launcher = ""
        for key, m in items:
            with _locked(m, held):
                ident = self.identity(key, m)
                world = max(world or 0, ident.world_size or 0) or world
                job = job or ident.job
                launcher = launcher or ident.launcher
        running = [r for r in rows if r.state in (LIVE, "waiting")]
        tokens = [r.tokens_s for r in running if r.tokens_s]
        rates = [r.steps_s for r in running if r.steps_s]
        return JobSummary(
            streams=len(items), ranks_seen=len({r.rank for r in rows if r.rank is not None}),
            world_size=world, live=len(running), job=job, launcher=launcher,
            tokens_s=sum(tokens) if tokens else None, steps_s=min(rates) if rates else None,
            waiting=[r for r in rows if r.state == "waiting"], lost=[r for r in rows if r.state == LOST],
            ended=[r for r in rows if r.state == ENDED])

    def ordered_keys(self, held: SessionModel | None = None) -> list[str]:
        """Stream keys by rank (unknown ranks last): the order the rank-cycling key walks."""
        keyed = []
        for key, model in self.items():
            with _locked(model, held):
                rank = self.identity(key, model).rank
            keyed.append((rank is None, rank or 0, key))
        return [k for *_, k in sorted(keyed)]

    def default_key(self, held: SessionModel | None = None) -> str | None:
        keys = self.ordered_keys(held)
        return keys[0] if keys else None

    def steps_by_rank(self, held: SessionModel | None = None, last: int = 100) -> dict[int, list[Any]]:
        """Recent step records per rank (newest stream of each): the input of the straggler diagnosis."""
        out: dict[int, tuple[float, list[Any]]] = {}
        for key, model in self.items():
            with _locked(model, held):
                rank = self.identity(key, model).rank
                if model.session is None or rank is None:
                    continue
                started = model.session.started or 0.0
                if rank in out and out[rank][0] > started:
                    continue
                out[rank] = (started, list(model.steps)[-last:])
        return {rank: steps for rank, (_, steps) in sorted(out.items())}

    def layer_across(self, path: str, held: SessionModel | None = None, which: str = "fwd") -> LayerAcross | None:
        """One layer's EMA time (forward or backward) on every rank that timed it, with min, median,
        max and the ranks at each end. Layers are matched by module path (ids are per process)."""
        values: dict[str, float] = {}
        for key, model in self.items():
            with _locked(model, held):
                label = _label(self.identity(key, model))
                for layer in model.layers.values():
                    if layer.path == path:
                        ms = layer.fwd_ema if which == "fwd" else layer.bwd_ema
                        if ms is not None:
                            values[label if label not in values else f"{label}:{key}"] = ms
                        break
        if len(values) < 2:
            return None
        ordered = sorted(values.items(), key=lambda kv: kv[1])
        med = percentile([v for _, v in ordered], 50) or 0.0
        return LayerAcross(path, which, values, ordered[0][1], med, ordered[-1][1], ordered[0][0], ordered[-1][0])


@contextmanager
def _locked(model: SessionModel, held: SessionModel | None) -> Iterator[None]:
    with nullcontext() if model is held else model.lock:
        yield


def _label(ident: Identity) -> str:
    return UNKNOWN_RANK if ident.rank is None else str(ident.rank)


def rank_row(key: str, model: SessionModel, host: str = "", window_s: float = 10.0,
             ident: Identity | None = None, light: bool = False) -> RankRow:
    """The row of one stream (call with its lock held); ``light``: identity, status and rates only."""
    s = model.session
    if ident is None:
        ident = Identity(s.rank if s is not None else None)
    if light:
        state, status = rank_status(model)
        return RankRow(key=key, rank=ident.rank, label=_label(ident), pid=s.pid if s is not None else None,
                       host=host, status=status, state=state, tokens_s=model.tokens_per_s(window_s),
                       steps_s=model.steps_per_s(window_s), version=model.version)
    steps = list(islice(reversed(model.steps), RECENT_STEPS))  # never a copy of the whole history
    steps.reverse()
    durs = [st.dur_ms / max(1, st.merged) for st in steps]
    comms = [st.comm_ms / max(1, st.merged) for st in steps if st.comm_ms is not None]
    busy = [(st.dur_ms - (st.comm_ms or 0.0)) / max(1, st.merged) for st in steps]
    totals: dict[str, float] = {}
    for st in steps:
        for name, ms in st.phases.items():
            if name in PHASES and ms:
                totals[name] = totals.get(name, 0.0) + ms
    whole = sum(totals.values())
    last = model.last_step
    memory = None
    if last is not None and last.cuda_allocated is not None:
        memory = last.cuda_allocated
    elif model.host:
        memory = model.host[-1].rss
    state, status = rank_status(model)
    return RankRow(
        key=key, rank=ident.rank, label=_label(ident),
        pid=s.pid if s is not None else None, host=host or (s.hostname if s is not None else ""),
        status=status, state=state, step=last.step if last is not None else None,
        last_ms=durs[-1] if durs else None, p50_ms=percentile(durs, 50), busy_ms=percentile(busy, 50),
        comm_ms=percentile(comms, 50) if comms else None,
        phases={k: v / whole for k, v in totals.items()} if whole else {},
        tokens_s=model.tokens_per_s(window_s), steps_s=model.steps_per_s(window_s), memory=memory,
        loss=last.loss if last is not None else None, spark=durs[-SPARK_STEPS:], version=model.version)


def rank_status(model: SessionModel) -> tuple[str, str]:
    """(state, text): ended with its exit, lost, waiting in a collective since …, live, connecting."""
    if model.end is not None:
        return ENDED, f"ended ({model.exit_text()})" if not model.exit_ok else "done"
    waiting = getattr(model, "waiting", None)
    if waiting is not None and model.connection != LOST:
        return "waiting", f"in {waiting.op} {max(0.0, waiting.t - waiting.since):.0f}s"
    if model.connection == LOST:
        return LOST, "lost"
    if model.connection in (LIVE, REPLAY):  # a replayed rank runs as it did
        return LIVE, model.connection
    return CONNECTING, "connecting"


def newest_per_rank(rows: list[RankRow]) -> list[RankRow]:
    """Keep the newest stream of each known rank (an elastic restart brings a new pid for the same
    rank); the ones it replaced are counted in its ``restarts``. Unknown ranks are all kept."""
    by_rank: dict[int, list[RankRow]] = {}
    out = []
    for row in rows:
        if row.rank is None:
            out.append(row)
        else:
            by_rank.setdefault(row.rank, []).append(row)
    for group in by_rank.values():
        # a live stream beats an ended one; among equals, the later pid (a restart) wins
        group.sort(key=lambda r: (r.state in (LIVE, "waiting", CONNECTING), r.pid or 0))
        newest = group[-1]
        newest.restarts = len(group) - 1
        out.append(newest)
    return out


def fill_skew(rows: list[RankRow]) -> list[RankRow]:
    busy = [r.busy_ms for r in rows if r.busy_ms is not None]
    median = percentile(busy, 50) if len(busy) >= 2 else None
    for r in rows:
        r.skew = (r.busy_ms / median - 1.0) if median and r.busy_ms is not None else None
    return rows


def sort_by_skew(rows: list[RankRow]) -> list[RankRow]:
    """Worst skew first; rows without a skew after, by rank; unknown ranks last."""
    def key(r: RankRow) -> tuple[bool, float, int, str]:
        # by steps of SORT_STEP: rows do not swap places on noise from one frame to the next
        skew = -round(r.skew * 100 / SORT_STEP) if r.skew is not None and math.isfinite(r.skew) else math.inf
        return (r.rank is None, skew, r.rank if r.rank is not None else 0, r.key)
    return sorted(rows, key=key)
