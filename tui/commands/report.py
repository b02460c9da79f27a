"""`llmtop report FILE [--json]`: a recording's run in one screen of text.

``summarize(reader)`` reads every event once and keeps bounded aggregates (per-module samples are a
seeded reservoir, so an hour-long run costs the same memory as a minute). ``llmtop diff`` compares
two such summaries; ``llmtop export`` puts one in its JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

from llmtop.protocol.events import (
    PHASES,
    DeviceSample,
    End,
    HostSample,
    LayerStats,
    ModelTree,
    Ops,
    Session,
    Step,
)
from llmtop.protocol.recording import RecordingReader
from llmtop.tui.commands.common import read_recordings
from llmtop.tui.session import fmt
from llmtop.tui.session.model import SessionModel

HELP = "Print a one-screen summary of a recording: step times, phases, top layers and ops, memory, diagnoses."
RESERVOIR = 2048  # samples kept per module and series for medians
LAYER_STEPS = 2048  # layer tables of at most this many steps (evenly spread) are read for medians
MODEL_TAIL = 300  # the last steps' layer tables also go to the model (diagnoses of the end state)
TOP = 8


class Reservoir:
    """A uniform sample of at most ``size`` values from a stream (seeded: the same run gives the same
    summary), plus the exact count, sum and maximum."""

    def __init__(self, size: int = RESERVOIR, seed: int = 0) -> None:
        self.size = size
        self.values: list[float] = []
        self.n = 0
        self.total = 0.0
        self.max: float | None = None
        self._rng = random.Random(seed)

    def add(self, v: float) -> None:
        if v is None or not math.isfinite(v):
            return
        self.n += 1
        self.total += v
        if self.max is None or v > self.max:
            self.max = v
        if len(self.values) < self.size:
            self.values.append(v)
        else:
            j = self._rng.randrange(self.n)
            if j < self.size:
                self.values[j] = v

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def quantile(self, q: float) -> float | None:
        if not self.values:
            return None
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def mad(self) -> float | None:
        """Median absolute deviation: the spread used to tell a change from noise."""
        med = self.median()
        if med is None:
            return None
        return statistics.median(abs(v - med) for v in self.values)


@dataclass
class LayerSummary:
    id: int
    path: str
    cls: str
    leaf: bool
    fwd: Reservoir = field(default_factory=Reservoir)
    bwd: Reservoir = field(default_factory=Reservoir)
    fwd_self: Reservoir = field(default_factory=Reservoir)
    bwd_self: Reservoir = field(default_factory=Reservoir)
    calls: int = 0

    @property
    def name(self) -> str:
        return self.path or self.cls

    def self_ms(self) -> float:
        return (self.fwd_self.mean or 0.0) + (self.bwd_self.mean or 0.0)


@dataclass
class RunSummary:
    path: str
    session: Session
    duration_s: float
    warning: str | None
    steps: int = 0
    first_step: int | None = None
    last_step: int | None = None
    step_ms: Reservoir = field(default_factory=Reservoir)
    phases: dict[str, Reservoir] = field(default_factory=dict)
    phase_totals: dict[str, float] = field(default_factory=dict)
    layers: dict[int, LayerSummary] = field(default_factory=dict)
    ops: dict[str, list[float]] = field(default_factory=dict)  # name -> [self_ms total, calls, flops]
    op_windows: int = 0
    tokens: int = 0
    samples: int = 0
    busy_ms: float = 0.0
    cuda_peak: int | None = None
    rss_peak: int | None = None
    device_mem_peak: int | None = None
    losses: list[float] = field(default_factory=list)  # first and last few, for the report
    last_loss: float | None = None
    end: End | None = None
    model: SessionModel = field(default_factory=SessionModel)

    # -- derived

    def phase_shares(self) -> dict[str, float]:
        total = sum(self.phase_totals.values())
        return {k: v / total for k, v in self.phase_totals.items()} if total > 0 else {}

    def layer_by_path(self) -> dict[str, LayerSummary]:
        return {la.name: la for la in self.layers.values()}

    def top_layers(self, n: int = TOP) -> list[LayerSummary]:
        """Leaf modules by mean self time (forward + backward)."""
        pool = [la for la in self.layers.values() if la.leaf and (la.fwd_self.n or la.bwd_self.n)]
        pool.sort(key=lambda la: la.self_ms(), reverse=True)
        return pool[:n]

    def top_ops(self, n: int = TOP) -> list[tuple[str, float, float]]:
        """(name, mean self ms per profiled step, calls per profiled step)."""
        if not self.op_windows:
            return []
        rows = [(name, v[0] / self.op_windows, v[1] / self.op_windows) for name, v in self.ops.items()]
        rows.sort(key=lambda r: r[1], reverse=True)
        return rows[:n]

    def tokens_per_s(self) -> float | None:
        return self.tokens / (self.busy_ms / 1000.0) if self.tokens and self.busy_ms > 0 else None

    def exit_text(self) -> str:
        end = self.end
        if end is None:
            return "no end recorded (the recording stopped while the script ran)"
        if end.exit_code is None and end.signal is None and end.reason == "exit":
            return "ended normally (the agent records no exit code)"
        if end.reason in ("detached", "lost") and end.exit_code is None:
            return {"detached": "recorder stopped while the script ran",
                    "lost": "connection lost while the script ran"}[end.reason]
        return self.model.exit_text() or end.reason or "ended"

    def diagnoses(self) -> list[tuple[str, str]]:
        try:
            from llmtop.tui.session.diagnoses import diagnose
        except ImportError:
            return []
        window = max(120.0, self.duration_s + 1.0)
        return [(d.severity, d.text) for d in diagnose(self.model, window)]

    def to_json(self) -> dict[str, Any]:
        s = self.session
        return {
            "file": self.path,
            "session": {"pid": s.pid, "argv": s.argv, "cwd": s.cwd, "started": s.started,
                        "hostname": s.hostname, "python": s.python, "torch": s.torch,
                        "transformers": s.transformers, "devices": s.devices},
            "duration_s": self.duration_s,
            "warning": self.warning,
            "steps": self.steps, "first_step": self.first_step, "last_step": self.last_step,
            "step_ms": {"p50": self.step_ms.median(), "p95": self.step_ms.quantile(0.95),
                        "mean": self.step_ms.mean, "max": self.step_ms.max},
            "phase_share": self.phase_shares(),
            "phase_ms_p50": {k: r.median() for k, r in self.phases.items()},
            "tokens_per_s": self.tokens_per_s(),
            "loss": {"last": _finite(self.last_loss)},
            "top_layers": [{"path": la.name, "class": la.cls, "self_ms": la.self_ms(),
                            "fwd_ms_p50": la.fwd.median(), "bwd_ms_p50": la.bwd.median(), "calls": la.calls}
                           for la in self.top_layers()],
            "top_ops": [{"name": n, "self_ms": ms, "calls": c} for n, ms, c in self.top_ops()],
            "memory": {"cuda_peak": self.cuda_peak, "rss_peak": self.rss_peak,
                       "device_mem_peak": self.device_mem_peak},
            "diagnoses": [{"severity": sev, "text": text} for sev, text in self.diagnoses()],
            "exit": {"text": self.exit_text(), "exit_code": self.end.exit_code if self.end else None,
                     "signal": self.end.signal if self.end else None,
                     "reason": self.end.reason if self.end else None},
        }


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def summarize(reader: RecordingReader) -> RunSummary:
    """Read every event once into a RunSummary (and a SessionModel for the diagnoses)."""
    out = RunSummary(path=reader.path, session=reader.session, duration_s=reader.duration,
                     warning=reader.warning)
    model = out.model
    merger = LayerMerger()
    # Per-layer medians need a sample, not every table: decoding 36 000 tables of an hour-long run
    # costs minutes. Steps are numbered, so a stride picks an even spread without reading ahead.
    every = max(1, math.ceil(reader.steps / LAYER_STEPS))
    tail = (reader.last_step or 0) - MODEL_TAIL

    def wanted(step: int) -> bool:
        return step % every == 0 or step >= tail

    for event in reader.events(layers=wanted if every > 1 else None):
        if not isinstance(event, LayerStats) or event.step >= tail:
            model.apply(event)
        if isinstance(event, Step):
            _step(out, event)
            for table in merger.ready(event.step):
                _layers(out, table)
        elif isinstance(event, LayerStats) and event.step % every == 0:
            merger.add(event)
        elif isinstance(event, ModelTree):
            _tree(out, event)
        elif isinstance(event, Ops):
            out.op_windows += 1
            for i, name in enumerate(event.names):
                row = out.ops.setdefault(name, [0.0, 0.0, 0.0])
                row[0] += event.self_ms[i]
                row[1] += event.calls[i] if i < len(event.calls) else 0
                row[2] += event.flops[i] if i < len(event.flops) else 0.0
        elif isinstance(event, HostSample):
            out.rss_peak = max(out.rss_peak or 0, event.rss)
        elif isinstance(event, DeviceSample) and event.mem_used is not None:
            out.device_mem_peak = max(out.device_mem_peak or 0, event.mem_used)
    for table in merger.ready():
        _layers(out, table)
    out.end = model.end
    return out


def _step(out: RunSummary, e: Step) -> None:
    out.steps += 1
    if out.first_step is None:
        out.first_step = e.step
    out.last_step = e.step if out.last_step is None else max(out.last_step, e.step)
    out.step_ms.add(e.dur_ms)
    out.busy_ms += e.dur_ms
    for name, ms in e.phases.items():
        out.phases.setdefault(name, Reservoir()).add(ms)
        out.phase_totals[name] = out.phase_totals.get(name, 0.0) + (ms if ms and math.isfinite(ms) else 0.0)
    out.tokens += e.tokens or 0
    out.samples += e.samples or 0
    if e.loss is not None:
        out.last_loss = e.loss
    if e.cuda_peak is not None:
        out.cuda_peak = max(out.cuda_peak or 0, e.cuda_peak)


def _tree(out: RunSummary, e: ModelTree) -> None:
    parents = set(e.parents)
    for i, mid in enumerate(e.ids):
        if mid not in out.layers or out.layers[mid].path != e.paths[i]:
            out.layers[mid] = LayerSummary(id=mid, path=e.paths[i], cls=e.classes[i], leaf=mid not in parents)


def _layers(out: RunSummary, e: LayerStats) -> None:
    n = len(e.ids)
    has_bwd = len(e.bwd_ms) == n
    for i, mid in enumerate(e.ids):
        la = out.layers.get(mid)
        if la is None:
            la = out.layers[mid] = LayerSummary(id=mid, path=f"#{mid}", cls="?", leaf=True)
        called = (e.calls[i] if i < len(e.calls) else 1) > 0 or e.fwd_ms[i] > 0
        if called:  # a module not run this step (calls 0) says nothing about its speed
            la.fwd.add(e.fwd_ms[i])
            if i < len(e.fwd_self_ms):
                la.fwd_self.add(e.fwd_self_ms[i])
        if has_bwd and e.bwd_ms[i] > 0:
            la.bwd.add(e.bwd_ms[i])
            if i < len(e.bwd_self_ms):
                la.bwd_self.add(e.bwd_self_ms[i])
        if i < len(e.calls):
            la.calls = max(la.calls, e.calls[i])


class LayerMerger:
    """Per-step layer tables. The agent sends what it measured each tick, so one step's modules may
    come in several tables (forward in one, backward in the next): they are summed per module.
    ``add`` buffers; ``ready(step)`` returns merged tables of steps up to ``step``."""

    def __init__(self) -> None:
        self.pending: dict[int, dict[int, list[Any]]] = {}

    def add(self, e: LayerStats) -> None:
        rows = self.pending.setdefault(e.step, {})
        n = len(e.ids)
        has_bwd = len(e.bwd_ms) == n
        for i, mid in enumerate(e.ids):
            row = rows.get(mid)
            if row is None:
                row = rows[mid] = [0.0, 0.0, 0, None, None, None]  # fwd, fwd_self, calls, bwd, bwd_self, act
            row[0] += e.fwd_ms[i]
            row[1] += e.fwd_self_ms[i] if i < len(e.fwd_self_ms) else 0.0
            row[2] += e.calls[i] if i < len(e.calls) else 0
            if has_bwd:
                row[3] = (row[3] or 0.0) + e.bwd_ms[i]
                row[4] = (row[4] or 0.0) + (e.bwd_self_ms[i] if i < len(e.bwd_self_ms) else 0.0)
            if len(e.act_bytes) == n:
                row[5] = (row[5] or 0) + e.act_bytes[i]

    def ready(self, step: int | None = None) -> list[LayerStats]:
        done = sorted(s for s in self.pending if step is None or s <= step)
        return [self._table(s, self.pending.pop(s)) for s in done]

    @staticmethod
    def _table(step: int, rows: dict[int, list[Any]]) -> LayerStats:
        ids = list(rows)
        vals = [rows[i] for i in ids]
        has_bwd = any(v[3] is not None for v in vals)
        has_act = any(v[5] is not None for v in vals)
        return LayerStats(step=step, ids=ids, fwd_ms=[v[0] for v in vals], fwd_self_ms=[v[1] for v in vals],
                          calls=[v[2] for v in vals],
                          bwd_ms=[v[3] or 0.0 for v in vals] if has_bwd else [],
                          bwd_self_ms=[v[4] or 0.0 for v in vals] if has_bwd else [],
                          act_bytes=[v[5] or 0 for v in vals] if has_act else [])


def open_summary(path: str) -> RunSummary:
    """Open and summarize; ``RecordingError`` for files that cannot be read."""
    with RecordingReader(path) as reader:
        return summarize(reader)


def render(s: RunSummary) -> str:
    """The one screen of text."""
    lines: list[str] = []
    sess = s.session
    script = " ".join(sess.argv) or "?"
    lines.append(f"{os.path.basename(s.path)}: {script}")
    lines.append(f"  pid {sess.pid} on {sess.hostname or '?'}, python {sess.python or '?'}, torch {sess.torch or '?'}"
                 f"{', transformers ' + sess.transformers if sess.transformers else ''}; "
                 f"devices: {', '.join(sess.devices) or 'cpu'}")
    lines.append(f"  recorded {fmt.duration(s.duration_s)}, {s.steps} steps"
                 + (f" ({s.first_step}..{s.last_step})" if s.steps else "")
                 + f"; exit: {s.exit_text()}")
    if s.warning:
        lines.append(f"  note: {s.warning}")
    if s.steps:
        tps = s.tokens_per_s()
        lines.append(f"step time  p50 {fmt.ms(s.step_ms.median())} ms   p95 {fmt.ms(s.step_ms.quantile(0.95))} ms"
                     f"   max {fmt.ms(s.step_ms.max)} ms"
                     + (f"   {fmt.rate(tps, ' tok/s')}" if tps else "")
                     + (f"   last loss {s.last_loss:.4g}" if s.last_loss is not None else ""))
        shares = s.phase_shares()
        if shares:
            ordered = [p for p in PHASES if p in shares] + [p for p in shares if p not in PHASES]
            lines.append("phases     " + "   ".join(f"{p} {shares[p] * 100:.0f}%" for p in ordered))
    top = s.top_layers()
    if top:
        lines.append("top layers (self time per step, fwd+bwd)")
        for la in top:
            lines.append(f"  {fmt.ms(la.self_ms(), 2):>9} ms  {la.name}  ({la.cls})")
    ops = s.top_ops(5)
    if ops:
        lines.append(f"top ops (per profiled step, {s.op_windows} profiles)")
        for name, ms, calls in ops:
            lines.append(f"  {fmt.ms(ms, 2):>9} ms  {name}  x{calls:.0f}")
    mem = []
    if s.cuda_peak:
        mem.append(f"CUDA peak {fmt.nbytes(s.cuda_peak)}")
    if s.device_mem_peak:
        mem.append(f"device used peak {fmt.nbytes(s.device_mem_peak)}")
    if s.rss_peak:
        mem.append(f"RSS peak {fmt.nbytes(s.rss_peak)}")
    if mem:
        lines.append("memory     " + "   ".join(mem))
    diags = s.diagnoses()
    if diags:
        lines.append("diagnoses")
        for sev, text in diags[:6]:
            lines.append(f"  [{sev}] {text}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a recording")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    return read_recordings("report", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    summary = open_summary(args.file)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2, default=str))
    else:
        print(render(summary))
    return 0
