"""The Chrome / Perfetto trace of a recording (``llmtop export --format chrome``): steps, phases,
layers per step, spans, generate calls, anomalies and logs as tracks; a job's rank files as one
process per rank on one time axis. ``docs/EXPORT.md`` documents the tracks."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

from llmtop.protocol.events import (
    PHASES,
    AgentWarning,
    Anomaly,
    DeviceSample,
    End,
    Event,
    Generation,
    HostSample,
    LayerStats,
    LogLine,
    Metric,
    ModelTree,
    Span,
    Step,
)
from llmtop.protocol.recording import RecordingReader
from llmtop.tui.commands.json_safe import clean, event_fields
from llmtop.tui.commands.step_tables import StepTables

DEFAULT_LAYER_STEPS = 2000  # layer slices for at most this many steps (evenly spread), unless --all-layers

# Chrome trace tracks (thread ids inside the run's process).
TID_STEPS, TID_PHASES, TID_FWD, TID_BWD, TID_GEN, TID_EVENTS, TID_LOGS = 1, 2, 3, 4, 5, 6, 7
TID_SPANS = 100  # + one per span category
TRACK_NAMES = {TID_STEPS: "steps", TID_PHASES: "phases", TID_FWD: "layers (forward)",
               TID_BWD: "layers (backward)", TID_GEN: "generate", TID_EVENTS: "anomalies & warnings",
               TID_LOGS: "logs"}




# --- Chrome / Perfetto trace ---------------------------------------------------------------------------


class ChromeTrace:
    """Builds trace events. Times are µs from the recording's start; every track is sorted at the end
    so timestamps never go backwards within one (pid, tid)."""

    def __init__(self, reader: RecordingReader, *, all_layers: bool = False, pid: int | None = None,
                 start: float | None = None, process_name: str | None = None) -> None:
        self.reader = reader
        self.start = start if start is not None else min(reader.start, reader.session.started or reader.start)
        self.pid = pid if pid is not None else int(reader.session.pid or 1)
        self.process_name = process_name  # a job's rank: "rank R (host)"
        self.events: list[dict[str, Any]] = []
        self.meta: list[dict[str, Any]] = []
        self.tracks: dict[int, str] = {}
        self.span_tids: dict[str, int] = {}
        self.trees: dict[int, ModelTree] = {}
        self.children: dict[int, list[int]] = {}
        self.parents: dict[int, int] = {}
        self.paths: dict[int, str] = {}
        self.tables = StepTables()  # each layer table with its own step's record (evaluations, restarts)
        total = reader.steps
        self.layer_every = 1 if all_layers or total <= DEFAULT_LAYER_STEPS else math.ceil(total / DEFAULT_LAYER_STEPS)

    def us(self, t: float) -> float:
        return round((t - self.start) * 1e6, 3)

    def _track(self, tid: int, name: str) -> int:
        if tid not in self.tracks:
            self.tracks[tid] = name
        return tid

    def slice(self, tid: int, name: str, ts: float, dur: float, cat: str, args: dict[str, Any] | None = None) -> None:
        ev = {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": max(0.0, round(dur, 3)),
              "pid": self.pid, "tid": tid}
        if args:
            ev["args"] = _json_args(args)
        self.events.append(ev)

    def counter(self, name: str, t: float, values: dict[str, Any]) -> None:
        vals = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if vals:
            self.events.append({"name": name, "ph": "C", "ts": self.us(t), "pid": self.pid, "tid": 0,
                                "args": vals})

    def instant(self, tid: int, name: str, t: float, cat: str, args: dict[str, Any]) -> None:
        self.events.append({"name": name, "cat": cat, "ph": "i", "s": "t", "ts": self.us(t),
                            "pid": self.pid, "tid": tid, "args": _json_args(args)})

    # -- per kind

    def add(self, e: Event) -> None:
        if isinstance(e, Step):
            self._step(e)
        elif isinstance(e, LayerStats):
            self._layers(e)
        elif isinstance(e, ModelTree):
            self.trees[e.model] = e
            for i, (mid, parent) in enumerate(zip(e.ids, e.parents, strict=False)):
                self.children.setdefault(mid, [])
                self.parents[mid] = parent
                self.paths[mid] = e.paths[i] or e.name
                if parent >= 0:
                    self.children.setdefault(parent, []).append(mid)
        elif isinstance(e, Span):
            cat = e.category or "other"
            tid = self.span_tids.get(cat)
            if tid is None:
                tid = self.span_tids[cat] = self._track(TID_SPANS + len(self.span_tids), f"spans: {cat}")
            self.slice(tid, e.name, self.us(e.start), e.dur_ms * 1000.0, cat,
                       {"step": e.step, "depth": e.depth, **e.attrs})
        elif isinstance(e, HostSample):
            self.counter("host cpu %", e.t, {"cpu_pct": e.cpu_pct})
            self.counter("host memory (bytes)", e.t, {"rss": e.rss, "sys_used": e.sys_used})
        elif isinstance(e, DeviceSample):
            self.counter(f"gpu{e.index} utilization %", e.t, {"util_pct": e.util_pct})
            self.counter(f"gpu{e.index} memory (bytes)", e.t, {"mem_used": e.mem_used})
            self.counter(f"gpu{e.index} power (W)", e.t, {"power_w": e.power_w})
        elif isinstance(e, Metric):
            self.counter(f"metric {e.name}", e.t, {e.name: e.value})
        elif isinstance(e, Generation):
            tid = self._track(TID_GEN, TRACK_NAMES[TID_GEN])
            total_ms = e.total_ms or (e.ttft_ms + sum(e.decode_ms))
            start = self.us(e.t) - total_ms * 1000.0
            self.slice(tid, "generate", start, total_ms * 1000.0, "generate",
                       {"batch": e.batch, "prompt_tokens": e.prompt_tokens, "new_tokens": e.new_tokens,
                        "ttft_ms": e.ttft_ms})
            self.slice(tid, "first token", start, e.ttft_ms * 1000.0, "generate")
        elif isinstance(e, (Anomaly, AgentWarning)):
            tid = self._track(TID_EVENTS, TRACK_NAMES[TID_EVENTS])
            name = e.what if isinstance(e, Anomaly) else f"warning: {e.source}"
            self.instant(tid, name, e.t, e.KIND, {"message": e.message})
        elif isinstance(e, LogLine):
            self.instant(self._track(TID_LOGS, TRACK_NAMES[TID_LOGS]), e.text[:80], e.t, "log",
                         {"stream": e.stream, "text": e.text})
        elif isinstance(e, End):
            self.instant(self._track(TID_EVENTS, TRACK_NAMES[TID_EVENTS]), f"end ({e.reason or 'exit'})",
                         e.t, "end", {"exit_code": e.exit_code, "signal": e.signal})

    def _step(self, s: Step) -> None:
        start = self._start(s)
        for table, step in self.tables.step(s):
            self._place(table, step)
        tid = self._track(TID_STEPS, TRACK_NAMES[TID_STEPS])
        # An evaluation carries the number of the training step it precedes: its slice says so.
        name = f"eval (before step {s.step})" if s.mode == "eval" else f"step {s.step}"
        self.slice(tid, name, start, s.dur_ms * 1000.0, "step",
                   {k: v for k, v in event_fields(s).items() if k not in ("t", "phases") and v is not None})
        # Phases are laid out back to back in their canonical order: the agent measures how long each
        # took in the step, not when it began.
        at = start
        ptid = self._track(TID_PHASES, TRACK_NAMES[TID_PHASES])
        for name in [p for p in PHASES if p in s.phases] + [p for p in s.phases if p not in PHASES]:
            ms = s.phases[name]
            if ms and math.isfinite(ms) and ms > 0:
                self.slice(ptid, name, at, ms * 1000.0, "phase", {"step": s.step})
                at += ms * 1000.0
        if s.samples or s.tokens:
            secs = s.dur_ms / 1000.0 if s.dur_ms > 0 else None
            if secs:
                self.counter("throughput", s.t, {"samples_per_s": (s.samples or 0) / secs,
                                                 "tokens_per_s": (s.tokens or 0) / secs})
        self.counter("loss", s.t, {"loss": s.loss, "grad_norm": s.grad_norm})
        self.counter("cuda memory (bytes)", s.t, {"allocated": s.cuda_allocated, "reserved": s.cuda_reserved,
                                                  "peak": s.cuda_peak})
        self.counter("step time (ms)", s.t, {"dur_ms": s.dur_ms, "gpu_ms": s.gpu_ms})

    def _phase_start(self, s: Step, phase: str, start: float) -> float:
        at = start
        for name in PHASES:
            if name == phase:
                return at
            at += (s.phases.get(name) or 0.0) * 1000.0
        return at

    def _start(self, s: Step) -> float:
        return self.us(s.t) - s.dur_ms * 1000.0

    def _layers(self, e: LayerStats) -> None:
        # The agent sends a step's layer table in the tick the step ends, before or after its record:
        # tables wait for their step (StepTables) and are laid out inside it. Sampled-out tables
        # still mark where the step numbering restarts.
        for table, step in self.tables.table(e, keep=self.layer_every <= 1 or e.step % self.layer_every == 0):
            self._place(table, step)

    def _place(self, table: LayerStats, step: Step | None) -> None:
        if step is not None:  # a table whose step record is out of reach is not placed in time
            self._lay_step(table, self._start(step), step)

    def finish(self) -> None:
        """The recording ended: lay out the tables still waiting for their step."""
        for table, step in self.tables.flush():
            self._place(table, step)

    def _lay_step(self, e: LayerStats, start: float, step: Step) -> None:
        index = {mid: i for i, mid in enumerate(e.ids)}
        roots = [mid for mid in e.ids if not self._has_timed_ancestor(mid, index)]
        fwd_tid = self._track(TID_FWD, TRACK_NAMES[TID_FWD])
        at = self._phase_start(step, "forward", start)
        for root in roots:
            at = self._lay(fwd_tid, e, index, root, at, e.fwd_ms, e.fwd_self_ms, "forward", reverse=False)
        if len(e.bwd_ms) == len(e.ids):
            bwd_tid = self._track(TID_BWD, TRACK_NAMES[TID_BWD])
            at = self._phase_start(step, "backward", start)
            for root in roots:
                at = self._lay(bwd_tid, e, index, root, at, e.bwd_ms, e.bwd_self_ms, "backward", reverse=True)

    def _lay(self, tid: int, e: LayerStats, index: dict[int, int], mid: int, at: float, total: list[float],
             self_ms: list[float], cat: str, reverse: bool) -> float:
        """Lay ``mid`` out at ``at`` with its children back to back inside it (reverse order for
        backward); returns where the next sibling starts. Children are clipped to their parent."""
        i = index[mid]
        dur = max(0.0, total[i] * 1000.0)
        kids = self._timed_children(mid, index)
        if reverse:
            kids.reverse()
        if dur <= 0.0:
            # Not timed itself (a container never called, e.g. a root whose submodules are called
            # directly): its children go back to back where it would have been.
            for k in kids:
                at = self._lay(tid, e, index, k, at, total, self_ms, cat, reverse)
            return at
        tree_path = self._path(mid)
        args = {"path": tree_path, "calls": e.calls[i] if i < len(e.calls) else None, "step": e.step}
        if i < len(self_ms):
            args["self_ms"] = self_ms[i]
        self.slice(tid, tree_path.rsplit(".", 1)[-1] or tree_path, at, dur, cat, args)
        end = at + dur
        child_at = at
        for k in kids:
            if child_at >= end:
                break
            child_at = min(end, self._lay(tid, e, index, k, child_at, total, self_ms, cat, reverse))
        return end

    def _has_timed_ancestor(self, mid: int, index: dict[int, int]) -> bool:
        p = self.parents.get(mid, -1)
        while p >= 0:
            if p in index:
                return True
            p = self.parents.get(p, -1)
        return False

    def _timed_children(self, mid: int, index: dict[int, int]) -> list[int]:
        """Children in the table; a child missing from it (a ModuleList is never called) is replaced
        by its own children, so the blocks of ``transformer.h`` still nest inside ``transformer``."""
        out: list[int] = []
        for k in self.children.get(mid, []):
            if k in index:
                out.append(k)
            else:
                out += self._timed_children(k, index)
        return out

    def _path(self, mid: int) -> str:
        return self.paths.get(mid, f"#{mid}")

    def trace(self) -> dict[str, Any]:
        self.finish()
        session = self.reader.session
        script = next((os.path.basename(a) for a in session.argv if a.endswith(".py")),
                      session.argv[0] if session.argv else "llmtop")
        meta = [{"name": "process_name", "ph": "M", "ts": 0, "pid": self.pid, "tid": 0,
                 "args": {"name": self.process_name or f"{script} (pid {session.pid})"}},
                {"name": "thread_name", "ph": "M", "ts": 0, "pid": self.pid, "tid": 0,
                 "args": {"name": "counters"}}]
        for tid, name in sorted(self.tracks.items()):
            meta.append({"name": "thread_name", "ph": "M", "ts": 0, "pid": self.pid, "tid": tid,
                         "args": {"name": name}})
            meta.append({"name": "thread_sort_index", "ph": "M", "ts": 0, "pid": self.pid, "tid": tid,
                         "args": {"sort_index": tid}})
        # Per track by time; at equal times the longer slice first, so parents enclose children.
        body = sorted(self.events, key=lambda ev: (ev["tid"], ev["ts"], -ev.get("dur", 0.0)))
        return {
            "traceEvents": meta + body,
            "displayTimeUnit": "ms",
            "otherData": {"llmtop_recording": os.path.abspath(self.reader.path),
                          "session_argv": " ".join(session.argv), "hostname": session.hostname,
                          "time_origin_unix_s": self.start, "layer_steps_every": self.layer_every},
        }


def _json_args(args: dict[str, Any]) -> dict[str, Any]:
    return {k: clean(v) for k, v in args.items() if v is not None}


def export_chrome(reader: RecordingReader, *, all_layers: bool = False) -> dict[str, Any]:
    trace = ChromeTrace(reader, all_layers=all_layers)
    for event in reader.events():
        trace.add(event)
    return trace.trace()


def export_chrome_job(readers: dict[int, RecordingReader], *, all_layers: bool = False) -> dict[str, Any]:
    """A job's trace: one process per rank (pid = rank, named "rank R (host)"), on one time axis from
    the earliest rank's start, so that a straggler's late phases line up against the others' waits."""
    start = min(min(r.start, r.session.started or r.start) for r in readers.values())
    events: list[dict[str, Any]] = []
    meta: list[dict[str, Any]] = []
    for rank, reader in sorted(readers.items()):
        host = reader.session.hostname or "?"
        trace = ChromeTrace(reader, all_layers=all_layers, pid=rank, start=start,
                            process_name=f"rank {rank} ({host})")
        for event in reader.events():
            trace.add(event)
        one = trace.trace()
        meta.append({"name": "process_sort_index", "ph": "M", "ts": 0, "pid": rank, "tid": 0,
                     "args": {"sort_index": rank}})
        for ev in one["traceEvents"]:
            (meta if ev.get("ph") == "M" else events).append(ev)
    first = readers[min(readers)]
    return {
        "traceEvents": meta + events,
        "displayTimeUnit": "ms",
        "otherData": {"llmtop_recordings": {str(r): os.path.abspath(rd.path) for r, rd in sorted(readers.items())},
                      "session_argv": " ".join(first.session.argv), "job": first.session.job,
                      "world_size": first.session.world_size or len(readers), "time_origin_unix_s": start},
    }


def iter_tracks(trace: dict[str, Any]) -> Iterator[tuple[tuple[int, int], list[dict[str, Any]]]]:
    """(pid, tid) → that track's non-metadata events in file order (tests and tools)."""
    tracks: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for ev in trace["traceEvents"]:
        if ev.get("ph") != "M":
            tracks.setdefault((ev["pid"], ev["tid"]), []).append(ev)
    yield from tracks.items()
