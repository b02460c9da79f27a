"""Diagnoses across the ranks of a job: which rank is late and why, and who hangs in which collective.

Pure functions of plain data (per-rank ``Step`` records, per-layer times, ``HostSample``s,
``CollectiveWait`` events); ``straggler_from_models`` adapts a job's ``SessionModel``s (call it with
their locks held, or on models no thread feeds). Each result is a plain dataclass with a one-line
``text``. The cost grows with ranks × steps (about 0.1 s for 64 ranks × 100 steps on a loaded 2-core
machine): a live view should ask once a second or so, not every frame.

Which rank is late, step by step. Under DDP the gradient all-reduce equalises backward wall time: the
rank that arrives last waits least, and every other rank waits for it. So when each rank measured its
time in collectives (``Step.comm_ms``), the late rank of a step is the one whose wait is shortest,
by how much less than the median of the others. Without ``comm_ms`` its lateness is its work before
the collective: every phase but backward (which includes the wait), against the median of the
others. A rank is late at a step only beyond ``LATE_MIN_MS`` and ``LATE_MIN_SHARE`` of the median step,
so that two ranks with the same work do not take turns at being called late; it is *the* straggler
when it is late in at least ``PERSISTENT`` of the compared steps.

Why. The phase whose excess over the other ranks' median is largest (data wait, h2d, forward,
backward compute, optimizer). For forward and backward, the smallest module whose excess explains
most of it (``LAYER_SHARE``) names the layer, unless that module is the whole model (the slowdown is
spread over every layer). Host contention comes before both: the late rank's main thread waited for a CPU
for at least ``RUNQ_SHARE`` of its lateness (``HostSample.runq_pct``, Linux schedstat), in any phase,
whichever layer the preemptions landed in; without that figure, a spread slowdown whose process got less
CPU than the others' (``HostSample.cpu_pct``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from llmtop.protocol.events import PHASES, CollectiveWait, HostSample, LayerStats, Step

LAST_STEPS = 100  # the straggler is judged on this many recent steps common to every rank
MIN_STEPS = 5  # fewer common steps than this: no verdict
WARMUP_STEPS = 3  # each rank's first steps (first calls, allocations) are left out when enough remain
LATE_MIN_MS = 1.0
LATE_MIN_SHARE = 0.05  # of the median step time
PERSISTENT = 0.6  # late in at least this share of the compared steps (two ranks taking turns: 0.5)
LAYER_SHARE = 0.6  # a module explains the phase's excess when its own excess is this much of it
WHOLE_MODEL = 0.8  # a module taking this share of the root's time (on the other ranks) is the whole model
HOST_CPU_RATIO = 0.8  # the late rank's process CPU below this × the others' median: host contention
RUNQ_SHARE = 0.5  # the late rank's extra wait for a CPU, per step, explains this share of its lateness
CAUSE_STEPS = 30  # the cause is judged on the straggler's most recent late steps
PRE_SYNC = ("data", "h2d", "forward", "optimizer", "other")  # work a rank does before it reaches the sync
_ZEROS = (0.0,) * len(PRE_SYNC)
CAUSE_WORDS = {"data": "data wait", "h2d": "host-to-device copies", "forward": "forward",
               "backward": "backward compute", "optimizer": "optimizer", "other": "other work"}
STALE_S = 5.0  # a waiting rank that has not reported for this long (live) has stopped reporting


# --- stragglers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCause:
    path: str
    phase: str  # forward | backward
    ms: float  # the late rank's time per step
    others_ms: float  # the other ranks' median


@dataclass(frozen=True)
class Straggler:
    rank: int
    late_steps: int  # steps in which it was the late rank
    compared: int  # steps compared
    excess_ms: float  # median lateness per late step, against the median of the other ranks
    step_ms: float  # median step time over the compared steps
    basis: str  # collectives (it waits least in them) | work (its work before the sync)
    cause: str  # a phase name, "layer" or "host"
    phase: str  # the phase with the largest excess
    phase_ms: float  # that phase, per step, on the late rank ...
    phase_others_ms: float  # ... and the other ranks' median
    layer: LayerCause | None = None
    cpu_pct: float | None = None  # the late rank's process CPU, and the others' median (host cause)
    others_cpu_pct: float | None = None
    runq_ms: float | None = None  # per step, the late rank's main thread's wait for a CPU ...
    others_runq_ms: float | None = None  # ... and the other ranks' median (HostSample.runq_pct)
    text: str = ""

    @property
    def share(self) -> float:
        return self.late_steps / self.compared if self.compared else 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rank": self.rank, "late_steps": self.late_steps, "compared_steps": self.compared,
            "late_pct": 100.0 * self.share, "excess_ms": self.excess_ms, "step_ms": self.step_ms,
            "basis": self.basis, "cause": self.cause, "phase": self.phase, "phase_ms": self.phase_ms,
            "phase_others_ms": self.phase_others_ms, "layer": None, "cpu_pct": self.cpu_pct,
            "others_cpu_pct": self.others_cpu_pct, "runq_ms": self.runq_ms,
            "others_runq_ms": self.others_runq_ms, "text": self.text}
        if self.layer is not None:
            la = self.layer
            out["layer"] = {"path": la.path, "phase": la.phase, "ms": la.ms, "others_ms": la.others_ms}
        return out


def _work(s: Step, phase: str) -> float:
    """The rank's own work in ``phase`` (backward less its time blocked in collectives, when known)."""
    ms = s.phases.get(phase) or 0.0
    if phase == "backward" and s.comm_ms is not None:
        ms = max(0.0, ms - s.comm_ms)
    return ms


def _others(values: Mapping[int, float], rank: int) -> float:
    return statistics.median(v for r, v in values.items() if r != rank)


def _medians_of_others(values: Mapping[int, float]) -> dict[int, float]:
    """For each rank, the median of every other rank's value: one sort, then O(1) per rank (a view may
    ask for 64 ranks × 100 steps every frame)."""
    order = sorted(values.items(), key=lambda kv: kv[1])
    v = [x for _, x in order]
    m = len(v) - 1  # values left once one is taken out

    def at(j: int, i: int) -> float:  # the j-th of the values without the i-th
        return v[j] if j < i else v[j + 1]

    out: dict[int, float] = {}
    for i, (rank, _) in enumerate(order):
        out[rank] = at(m // 2, i) if m % 2 else (at(m // 2 - 1, i) + at(m // 2, i)) / 2.0
    return out


def _common_steps(steps: Mapping[int, Sequence[Step]], last: int) -> list[dict[int, Step]]:
    """The recent training steps every rank has, by step number, oldest first."""
    by_rank: dict[int, dict[int, Step]] = {}
    for rank, rows in steps.items():
        by_rank[rank] = {s.step: s for s in rows if s.mode == "train" and s.merged == 1 and s.phases}
    if len(by_rank) < 2:
        return []
    numbers = sorted(set.intersection(*(set(m) for m in by_rank.values())))
    if len(numbers) >= WARMUP_STEPS + MIN_STEPS:
        numbers = numbers[WARMUP_STEPS:]
    return [{r: by_rank[r][n] for r in by_rank} for n in numbers[-last:]]


def lateness(row: Mapping[int, Step]) -> tuple[str, dict[int, float]]:
    """How late each rank was at one step (ms, against the median of the others) and on what basis."""
    # A step in which no rank spent time in a collective (none was made, or the wait was not seen)
    # says nothing by its collectives: the work decides.
    if all(s.comm_ms is not None for s in row.values()) and any(s.comm_ms for s in row.values()):
        comm = {r: float(s.comm_ms or 0.0) for r, s in row.items()}
        others = _medians_of_others(comm)
        return "collectives", {r: others[r] - comm[r] for r in row}
    work = {r: sum(map(s.phases.get, PRE_SYNC, _ZEROS)) for r, s in row.items()}
    others = _medians_of_others(work)
    return "work", {r: work[r] - others[r] for r in row}


LayerTimes = Mapping[int, Mapping[str, tuple[float | None, float | None]]]


def stragglers(steps: Mapping[int, Sequence[Step]],
               layers: LayerTimes | Callable[[], LayerTimes | None] | None = None,
               hosts: Mapping[int, Sequence[HostSample]] | None = None,
               last: int = LAST_STEPS) -> Straggler | None:
    """The rank that is persistently late, with its cause, or None (no job, too few steps, no such rank).

    ``steps``: rank → its Step records; ``layers``: rank → module path → (forward, backward) ms per
    step (``layer_times``), or a function giving them, called only when the late phase is forward or
    backward (they are costly to gather); ``hosts``: rank → its host samples."""
    rows = _common_steps(steps, last)
    if len(rows) < MIN_STEPS:
        return None
    step_ms = statistics.median(statistics.median(s.dur_ms for s in row.values()) for row in rows)
    floor = max(LATE_MIN_MS, LATE_MIN_SHARE * step_ms)
    late: dict[int, list[tuple[dict[int, Step], float]]] = {}
    bases: set[str] = set()
    for row in rows:
        basis, by = lateness(row)
        bases.add(basis)
        rank = max(by, key=lambda r: (by[r], -r))
        if by[rank] >= floor:
            late.setdefault(rank, []).append((row, by[rank]))
    if not late:
        return None
    rank = max(late, key=lambda r: (len(late[r]), -r))
    hits = late[rank]
    if len(hits) < PERSISTENT * len(rows) or len(hits) < MIN_STEPS // 2 + 1:
        return None
    basis = "collectives" if bases == {"collectives"} else "work"
    excess = statistics.median(ms for _, ms in hits)

    # The phase: the largest median excess over the other ranks, over the recent steps it was late in.
    # Backward counts only when collectives were measured (else it holds the wait and says nothing).
    phases = [p for p in PHASES if p != "backward" or basis == "collectives"]
    excess_by: dict[str, tuple[float, float, float]] = {}
    for p in phases:
        diffs, mine, theirs = [], [], []
        for row, _ in hits[-CAUSE_STEPS:]:
            work = {r: _work(s, p) for r, s in row.items()}
            other = _others(work, rank)
            diffs.append(work[rank] - other)
            mine.append(work[rank])
            theirs.append(other)
        excess_by[p] = (statistics.median(diffs), statistics.median(mine), statistics.median(theirs))
    phase = max(excess_by, key=lambda p: excess_by[p][0])
    _, phase_ms, phase_others = excess_by[phase]

    cause = phase
    layer = None
    cpu = others_cpu = runq = others_runq = None
    if hosts:
        # first: a rank that waited for a CPU for most of its lateness is late because its host is
        # shared too thinly, whatever phase or layer the preemptions happened to land in (under DDP the
        # ranks' CPU shares stay alike: the others wait for it off the CPU, so only the run-queue wait
        # tells this apart)
        runq, others_runq = _runq_ms(hosts, rank, rows, step_ms)
        if runq is not None and others_runq is not None and runq - others_runq >= RUNQ_SHARE * excess:
            cause = "host"
    spread = False
    if cause != "host" and phase in ("forward", "backward"):
        if callable(layers):
            layers = layers()
        if layers and rank in layers:
            layer, spread = _layer_cause(layers, rank, phase, excess_by[phase][0])
        if layer is not None:
            cause = "layer"
        elif hosts and (spread or not layers):
            cpu, others_cpu = _cpu(hosts, rank, rows)
            if cpu is not None and others_cpu is not None and cpu < HOST_CPU_RATIO * others_cpu:
                cause = "host"
    out = Straggler(rank=rank, late_steps=len(hits), compared=len(rows), excess_ms=excess, step_ms=step_ms,
                    basis=basis, cause=cause, phase=phase, phase_ms=phase_ms, phase_others_ms=phase_others,
                    layer=layer, cpu_pct=cpu, others_cpu_pct=others_cpu, runq_ms=runq, others_runq_ms=others_runq)
    return _with_text(out)


def _layer_cause(layers: Mapping[int, Mapping[str, tuple[float | None, float | None]]], rank: int, phase: str,
                 phase_excess: float) -> tuple[LayerCause | None, bool]:
    """(the smallest module that explains most of the phase's excess, whether the excess is spread
    over the whole model instead)."""
    k = 0 if phase == "forward" else 1
    mine = layers[rank]
    rows: list[tuple[str, float, float]] = []
    for path, times in mine.items():
        ms = times[k]
        others = [t[k] for r, table in layers.items() if r != rank
                  for t in [table.get(path)] if t is not None and t[k] is not None]
        if ms is None or not others:
            continue
        rows.append((path, ms, statistics.median(others)))
    if not rows or phase_excess <= 0:
        return None, False
    whole = max(o for _, _, o in rows)
    explained = [r for r in rows if r[1] - r[2] >= LAYER_SHARE * phase_excess]
    if not explained:
        return None, True
    path, ms, other = max(explained, key=lambda r: (_depth(r[0]), r[1] - r[2]))
    if whole > 0 and other >= WHOLE_MODEL * whole:
        return None, True
    return LayerCause(path, phase, ms, other), False


def _depth(path: str) -> int:
    return path.count(".") + 1 if path else 0


def _cpu(hosts: Mapping[int, Sequence[HostSample]], rank: int,
         rows: Sequence[Mapping[int, Step]]) -> tuple[float | None, float | None]:
    """Median process CPU of the late rank and of the others, over the compared steps' time span."""
    return _host_medians(hosts, rank, rows, lambda h: h.cpu_pct)


def _runq_ms(hosts: Mapping[int, Sequence[HostSample]], rank: int, rows: Sequence[Mapping[int, Step]],
             step_ms: float) -> tuple[float | None, float | None]:
    """Per step, the late rank's wait for a CPU and the others' median, over the compared steps' span
    (``HostSample.runq_pct`` × the median step time; a share outside 0–100 % is no kernel's)."""
    def per_step(h: HostSample) -> float | None:
        share = h.runq_pct
        return share / 100.0 * step_ms if share is not None and 0.0 <= share <= 100.0 else None

    return _host_medians(hosts, rank, rows, per_step)


def _host_medians(hosts: Mapping[int, Sequence[HostSample]], rank: int, rows: Sequence[Mapping[int, Step]],
                  value: Callable[[HostSample], float | None]) -> tuple[float | None, float | None]:
    """The late rank's median ``value`` of its host samples over the compared steps' wall-clock span,
    and the median of the other ranks' medians; (None, None) without both."""
    start = min(s.t - s.dur_ms / 1000.0 for row in rows for s in row.values())
    end = max(s.t for row in rows for s in row.values())
    med: dict[int, float] = {}
    for r, samples in hosts.items():
        vals = [v for h in samples if start <= h.t <= end + 1.0 and (v := value(h)) is not None]
        if vals:
            med[r] = statistics.median(vals)
    if rank not in med or len(med) < 2:
        return None, None
    return med[rank], _others(med, rank)


def _with_text(s: Straggler) -> Straggler:
    basis = ("it waits least in collectives" if s.basis == "collectives"
             else "its work before the collective is longest")
    head = (f"rank {s.rank} is the straggler: late in {s.late_steps} of the last {s.compared} steps "
            f"({100.0 * s.share:.0f} %), {s.excess_ms:.1f} ms per step behind the median rank ({basis})")
    if s.cause == "layer" and s.layer is not None:
        la = s.layer
        why = (f"layer {la.path or '(root)'} in {la.phase}: {la.ms:.1f} ms vs {la.others_ms:.1f} ms on the "
               "other ranks")
    elif s.cause == "host" and s.runq_ms is not None and s.others_runq_ms is not None:
        why = (f"host contention: it waited {s.runq_ms:.1f} ms per step for a CPU vs "
               f"{s.others_runq_ms:.1f} ms on the other ranks ({CAUSE_WORDS.get(s.phase, s.phase)} "
               f"{s.phase_ms:.1f} vs {s.phase_others_ms:.1f} ms)")
    elif s.cause == "host":
        why = (f"host contention: {CAUSE_WORDS[s.phase]} is slower across every layer and its process had "
               f"{s.cpu_pct:.0f} % CPU vs {s.others_cpu_pct:.0f} % on the other ranks")
    else:
        why = f"{CAUSE_WORDS.get(s.phase, s.phase)}: {s.phase_ms:.1f} ms vs {s.phase_others_ms:.1f} ms on the other ranks"
    return Straggler(**{**s.__dict__, "text": f"{head}; cause: {why}"})


def short_text(s: Straggler) -> str:
    """The straggler in one short line, cause first (the Ranks view at 80 columns)."""
    if s.cause == "layer" and s.layer is not None:
        la = s.layer
        why = f"layer {la.path or '(root)'} {la.phase} {la.ms:.1f} vs {la.others_ms:.1f} ms"
    elif s.cause == "host" and s.runq_ms is not None and s.others_runq_ms is not None:
        why = f"host contention (waits for a CPU {s.runq_ms:.1f} vs {s.others_runq_ms:.1f} ms)"
    elif s.cause == "host" and s.cpu_pct is not None and s.others_cpu_pct is not None:
        why = f"host contention (CPU {s.cpu_pct:.0f} % vs {s.others_cpu_pct:.0f} %)"
    else:
        why = f"{CAUSE_WORDS.get(s.phase, s.phase)} {s.phase_ms:.1f} vs {s.phase_others_ms:.1f} ms"
    return (f"straggler: rank {s.rank}, {why} · late in {100.0 * s.share:.0f} % of {s.compared} steps, "
            f"+{s.excess_ms:.1f} ms/step")


def layer_times(tables: Iterable[LayerStats], paths: Mapping[int, str]) -> dict[str, tuple[float | None, float | None]]:
    """Module path → median (forward, backward) ms per step over ``tables`` (one rank's LayerStats;
    ``paths`` maps its module ids to paths, from its ModelTree events)."""
    fwd: dict[str, list[float]] = {}
    bwd: dict[str, list[float]] = {}
    for t in tables:
        has_bwd = len(t.bwd_ms) == len(t.ids)
        for i, mid in enumerate(t.ids):
            path = paths.get(mid)
            if path is None or (i < len(t.calls) and t.calls[i] == 0):
                continue
            fwd.setdefault(path, []).append(t.fwd_ms[i])
            if has_bwd:
                bwd.setdefault(path, []).append(t.bwd_ms[i])
    return {p: (statistics.median(v), statistics.median(bwd[p]) if bwd.get(p) else None) for p, v in fwd.items()}


LAYER_POINTS = 32  # recent timed steps per layer whose median is the layer's time (live models)


def recent(points: Sequence[Any], n: int) -> list[Any]:
    """The newest ``n`` of ``points`` (a list or a deque), oldest first, without copying the rest."""
    out = list(islice(reversed(points), n))
    out.reverse()
    return out


def straggler_from_models(models: Mapping[int, Any], last: int = LAST_STEPS) -> Straggler | None:
    """``stragglers`` of a job's ``SessionModel``s, keyed by rank (hold their locks).

    Per-layer medians are computed only when the late phase is forward or backward: a 64-rank job has
    thousands of layers, and a view may call this every frame."""
    steps = {r: list(m.steps)[-(last + WARMUP_STEPS + 1):] for r, m in models.items()}
    hosts = {r: list(m.host) for r, m in models.items() if m.host}

    def layers() -> LayerTimes | None:
        out: dict[int, dict[str, tuple[float | None, float | None]]] = {}
        for r, m in models.items():
            table: dict[str, tuple[float | None, float | None]] = {}
            for la in m.layers.values():
                pts = recent(la.history, LAYER_POINTS)
                if not pts:
                    continue
                f = statistics.median(p[1] for p in pts)
                b = [p[2] for p in pts if p[2] is not None]
                table[la.path] = (f, statistics.median(b) if b else None)
            if table:
                out[r] = table
        return out or None

    return stragglers(steps, layers, hosts or None, last)


# --- hangs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hang:
    op: str
    seq: int
    step: int
    since: float  # wall-clock time the first rank began waiting
    last: float  # wall-clock time of the latest report
    waiting: tuple[int, ...]  # ranks that reported waiting in it
    missing: tuple[int, ...]  # ranks of the world that never reported waiting in it
    ongoing: bool  # some rank is still waiting (as of its latest report)
    elsewhere: tuple[int, ...] = ()  # missing ranks that wait in another collective
    ended: dict[int, str] = field(default_factory=dict)  # missing ranks that ended, with how
    text: str = ""

    @property
    def wait_s(self) -> float:
        return max(0.0, self.last - self.since)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "seq": self.seq, "step": self.step, "since": self.since, "wait_s": self.wait_s,
                "waiting": list(self.waiting), "missing": list(self.missing), "ongoing": self.ongoing,
                "elsewhere": list(self.elsewhere), "ended": {str(k): v for k, v in self.ended.items()},
                "text": self.text}


def hangs(waits: Mapping[int, Iterable[CollectiveWait]], world_size: int | None = None,
          now: float | None = None, ended: Mapping[int, str] | None = None) -> list[Hang]:
    """Every collective some rank waited in past the agent's threshold, oldest first.

    ``waits``: rank → its CollectiveWait events; ``world_size``: the job's (ranks 0..N-1); ``now``
    (live): a waiting rank silent for ``STALE_S`` is no longer counted as waiting; ``ended``: rank →
    how it ended (exit text), for ranks that are gone."""
    ended = dict(ended or {})
    # (seq, op) → rank → (since, latest t, done, step)
    groups: dict[tuple[int, str], dict[int, list[Any]]] = {}
    for rank, events in waits.items():
        for w in events:
            row = groups.setdefault((w.seq, w.op), {}).get(rank)
            if row is None:
                groups[(w.seq, w.op)][rank] = [w.since, w.t, w.done, w.step]
            else:
                row[0] = min(row[0], w.since)
                if w.t >= row[1]:
                    row[1], row[3] = w.t, w.step
                row[2] = row[2] or w.done
    ranks_known = set(waits) | set(ended)
    world = range(world_size) if world_size else sorted(ranks_known)

    def waiting_now(row: list[Any]) -> bool:
        return not row[2] and (now is None or now - row[1] <= STALE_S)

    stuck = {r for g in groups.values() for r, row in g.items() if waiting_now(row)}
    out: list[Hang] = []
    for (seq, op), g in groups.items():
        waiting = tuple(sorted(g))
        missing = tuple(r for r in world if r not in g)
        ongoing = any(waiting_now(row) for row in g.values())
        h = Hang(op=op, seq=seq, step=max(row[3] for row in g.values()), since=min(row[0] for row in g.values()),
                 last=max(row[1] for row in g.values()), waiting=waiting, missing=missing, ongoing=ongoing,
                 elsewhere=tuple(r for r in missing if r in stuck),
                 ended={r: ended[r] for r in missing if r in ended})
        out.append(_hang_text(h))
    out.sort(key=lambda h: h.since)
    return out


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def hang_short_text(h: Hang) -> str:
    """A hang in one short line, the ranks that never arrived first (the Ranks view at 80 columns)."""
    absent = [r for r in h.missing if r not in h.elsewhere]
    parts = [f"hang in {h.op} #{h.seq} (step {h.step}), {h.wait_s:.0f} s"]
    if absent:
        parts.append(f"never arrived: {', '.join(map(str, absent))}")
    if h.elsewhere:
        parts.append(f"in another collective: {', '.join(map(str, h.elsewhere))}")
    parts.append(f"waiting: {', '.join(map(str, h.waiting))}")
    return " · ".join(parts)


def _hang_text(h: Hang) -> Hang:
    at = time.strftime("%H:%M:%S", time.localtime(h.since))
    what = f"{h.op} #{h.seq} (step {h.step})"
    if h.ongoing:
        text = f"hang: {_ranks(h.waiting)} {'waits' if len(h.waiting) == 1 else 'wait'} in {what} " \
               f"for {h.wait_s:.1f} s (since {at})"
    else:
        text = f"{_ranks(h.waiting)} waited {h.wait_s:.1f} s in {what} from {at}"
    absent = [r for r in h.missing if r not in h.elsewhere]
    notes = []
    if absent:
        never = "never arrived" if h.ongoing else "arrived late or never"
        gone = [f"rank {r} ended ({h.ended[r]})" for r in absent if r in h.ended]
        notes.append(f"{_ranks(absent)} {never}" + (f": {'; '.join(gone)}" if gone else ""))
    if h.elsewhere:
        notes.append(f"{_ranks(h.elsewhere)} {'waits' if len(h.elsewhere) == 1 else 'wait'} in another collective")
    if not h.missing:
        notes.append("every rank waits in it: the collective itself is stuck (network, a peer outside the job)")
    return Hang(**{**h.__dict__, "text": text + ("; " + "; ".join(notes) if notes else "")})
