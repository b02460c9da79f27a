"""The viewer's state: a plain-Python model fed by events, read by the widgets on a timer.

No Textual here, so it is unit-tested alone and shared by every source (live socket, recording).
Every collection is bounded (``deque(maxlen=…)`` or one entry per module/span name), so memory stays
flat however long the run. The ingest thread holds ``lock`` while applying; the UI holds it while
reading; ``version`` grows on every change so a frame can skip work when nothing arrived.

``SessionModel`` holds the session core here (lifecycle, steps, samples, spans, logs, ops,
generations, the end, and the values derived from them); its per-layer state (``Layer``, model trees,
layer tables) is in ``layers.py`` and its FLOP/s joins in ``flops.py``, as mixins of one class.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from llmtop.protocol.events import (
    AgentWarning,
    Anomaly,
    CollectiveWait,
    DeviceSample,
    End,
    Event,
    Generation,
    HostSample,
    LayerFlops,
    LayerStats,
    LogLine,
    Metric,
    ModelTree,
    Ops,
    Session,
    SnapshotDone,
    Span,
    Stats,
    Step,
    StepFlops,
)
from llmtop.protocol.formulas import percentile
from llmtop.tui.session.flops import FlopsJoins
from llmtop.tui.session.layers import EMA_ALPHA, Columns, Layer, LayerTables
from llmtop.tui.session.queries import SessionQueries

STEP_HISTORY = 10_000  # steps kept for sparklines (long windows of fast steps)
SAMPLE_HISTORY = 4_096  # host/device/metric samples kept per series
SPAN_DURATIONS = 512  # recent durations kept per span name for p95
LOG_LINES = 5_000
EVENTS_KEPT = 200  # anomalies, warnings
STEP_FLOPS_KEPT = 4_096  # per-step FLOPs events kept (sampled steps only)
GENERATIONS = 512
DECODE_POINTS = 4_096
METRIC_NAMES = 64  # custom series beyond this are counted, not kept
SPAN_NAMES = 512

CONNECTING, LIVE, LOST, ENDED = "connecting", "live", "lost", "ended"


def _ema(old: float | None, new: float) -> float:
    return new if old is None else old + EMA_ALPHA * (new - old)


@dataclass
class SpanStats:
    category: str
    name: str
    count: int = 0
    total_ms: float = 0.0
    last_ms: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=SPAN_DURATIONS))

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.count if self.count else 0.0

    @property
    def p95_ms(self) -> float | None:
        return percentile(self.recent, 95)


@dataclass
class OpRow:
    name: str
    self_ms: float
    calls: int
    flops: float | None
    shapes: str


@dataclass
class LogEntry:
    """One line of output. Immutable once made: a ``\\r`` update replaces the entry."""

    seq: int
    t: float
    text: str
    stream: str


class SessionModel(LayerTables, FlopsJoins, SessionQueries):
    """Everything the viewer knows about one session."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.version = 0
        self.connection = CONNECTING
        self.connection_note = ""
        self.logs_from_viewer = False  # attach mode: logs come from the pty, kept across resets
        self.logs: deque[LogEntry] = deque(maxlen=LOG_LINES)
        self.log_seq = 0  # grows on every line, replacements included
        self.log_total = 0  # lines appended (a \r update is not a new line)
        self.reset()

    # --- lifecycle ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the session (a reconnect re-ingests the agent's snapshot). Keeps pty logs."""
        self.session: Session | None = None
        self.models: dict[int, ModelTree] = {}
        self.layers: dict[int, Layer] = {}
        self.columns = Columns()  # the layers' measurements, one list per figure (layers.py)
        self.roots: list[int] = []
        self.tree_version = 0  # bumped when the set of modules changes
        self.steps: deque[Step] = deque(maxlen=STEP_HISTORY)
        self.step_count = 0
        self.last_step: Step | None = None
        # evaluations between training steps (Step records with mode "eval"): shown and timed apart,
        # never in ``steps`` (so never in the step diagnoses, rates or sparklines)
        self.evals: deque[Step] = deque(maxlen=EVENTS_KEPT)
        self.eval_count = 0
        self.eval_ms_total = 0.0
        self.train_count = 0
        self.steps_folded = 0  # steps the agent folded into aggregate records (its thread was behind)
        self.step_ema_ms: float | None = None
        self.nonfinite_since: int | None = None
        self.tokens_total = 0
        self.prefill_tokens_total = 0  # generate() steps' tokens, counted apart (part of tokens_total)
        self.decode_tokens_total = 0
        self.samples_total = 0
        self.host: deque[HostSample] = deque(maxlen=SAMPLE_HISTORY)
        self.devices: dict[int, deque[DeviceSample]] = {}
        self.spans: dict[tuple[str, str], SpanStats] = {}
        self.span_overflow = 0
        self.metrics: dict[str, deque[tuple[float, float]]] = {}
        self.metric_overflow = 0
        if not self.logs_from_viewer:
            self.logs.clear()
            self.log_total = 0
        self.anomalies: deque[Anomaly] = deque(maxlen=EVENTS_KEPT)
        self.warnings: deque[AgentWarning] = deque(maxlen=EVENTS_KEPT)
        self.ops: list[OpRow] = []
        self.ops_step: int | None = None
        self.ops_coverage: float | None = None
        self.ops_total_ms: float | None = None  # every op of the profiled step (the rows' shares are of it)
        self.ops_rows = 0  # op/shape rows in the profile, before the agent kept the top K
        self.flops_signature = ""
        self.flops_device = ""
        self.flops_method = ""
        self.peak_source = ""
        self.peak_flops: float | None = None
        self.step_flops: deque[StepFlops] = deque(maxlen=STEP_FLOPS_KEPT)
        self.last_step_flops: StepFlops | None = None
        self.layers_step: int | None = None  # the step of the newest layer table
        self.peak_bw: float | None = None
        self.generations: deque[Generation] = deque(maxlen=GENERATIONS)
        self.generation_count = 0
        self.generated_tokens = 0
        self.decode_points: deque[tuple[float, float]] = deque(maxlen=DECODE_POINTS)
        self.kv_bytes: int | None = None
        self.dropped = 0
        self.clients = 0
        self.agent_cpu_pct: float | None = None
        self.waiting: CollectiveWait | None = None  # the collective this rank is stuck in, if any
        self.waits: deque[CollectiveWait] = deque(maxlen=EVENTS_KEPT)  # every report, for the hang diagnosis
        self.waits_seen = 0
        self.snapshot_done = False
        self.end: End | None = None
        self.now = 0.0  # latest timestamp seen in the data: sparkline windows end here
        self.events = 0
        self.skipped = 0  # unknown kinds, counted by the source
        self.version += 1

    def set_connection(self, state: str, note: str = "") -> None:
        if self.end is not None and state in (LOST, CONNECTING):
            state = ENDED  # the script has ended: a closed socket is expected, not a loss
        if state != self.connection or note != self.connection_note:
            self.connection = state
            self.connection_note = note
            self.version += 1

    # --- ingest ------------------------------------------------------------------------------

    def apply(self, event: Event) -> None:
        """Fold one event into the model. Unknown event types are ignored (counted)."""
        handler = _HANDLERS.get(type(event))
        self.events += 1
        if handler is None:
            self.skipped += 1
            return
        handler(self, event)
        self.version += 1

    def apply_all(self, events: Iterable[Event]) -> None:
        for event in events:
            self.apply(event)

    def _see(self, t: float) -> None:
        if t > self.now:
            self.now = t

    def _session(self, e: Session) -> None:
        self.session = e
        self._see(e.started)

    def _step(self, e: Step) -> None:
        if e.mode == "eval":
            self._eval(e)
            return
        if e.mode == "train":
            if not self.train_count:
                self._pretraining_evals()
            self.train_count += e.merged
        self.steps.append(e)
        self.step_count += e.merged
        if e.merged > 1:
            self.steps_folded += e.merged
        self.last_step = e
        self.step_ema_ms = _ema(self.step_ema_ms, e.dur_ms / max(1, e.merged))
        if e.tokens:
            self.tokens_total += e.tokens
        self.prefill_tokens_total += e.prefill_tokens or 0
        self.decode_tokens_total += e.decode_tokens or 0
        if e.samples:
            self.samples_total += e.samples
        if e.loss is not None and not math.isfinite(e.loss):
            if self.nonfinite_since is None:
                self.nonfinite_since = e.step
        elif e.loss is not None:
            self.nonfinite_since = None
        self._see(e.t)

    def _eval(self, e: Step) -> None:
        self.evals.append(e)
        self.eval_count += 1
        self.eval_ms_total += e.dur_ms
        self._see(e.t)

    def _pretraining_evals(self) -> None:
        """The first training step: inference records before it were an evaluation before training
        (the agent counts training steps from 0 again), filed as one evaluation."""
        before = [s for s in self.steps if s.mode == "infer"]
        if not before or len(before) != len(self.steps):
            return
        self.steps.clear()
        self.step_count = 0
        self.last_step = None
        self.step_ema_ms = None
        self.samples_total -= sum(s.samples or 0 for s in before)
        self.tokens_total -= sum(s.tokens or 0 for s in before)
        self.ops, self.ops_step = [], None  # a profile taken before was that evaluation's
        self.prefill_tokens_total -= sum(s.prefill_tokens or 0 for s in before)
        self.decode_tokens_total -= sum(s.decode_tokens or 0 for s in before)
        dur = sum(s.dur_ms for s in before)
        phases = {k: sum(s.phases.get(k, 0.0) for s in before) for k in before[-1].phases}
        self._eval(Step(step=0, t=before[-1].t, dur_ms=dur, mode="eval", phases=phases,
                        samples=sum(s.samples or 0 for s in before) or None,
                        tokens=sum(s.tokens or 0 for s in before) or None))

    def loss_note(self) -> str:
        """How the last step's loss was made, for where the loss is shown: with gradient
        accumulation it is the sum of the micro-batch losses backward() saw (their mean when the
        script divides each by their count, as Trainer and most loops do)."""
        last = self.last_step
        if last is None or last.loss is None or last.losses <= 1:
            return ""
        return f"sum of {last.losses} micro-batch losses"

    def _host(self, e: HostSample) -> None:
        self.host.append(e)
        self._see(e.t)

    def _device(self, e: DeviceSample) -> None:
        ring = self.devices.get(e.index)
        if ring is None:
            ring = self.devices[e.index] = deque(maxlen=SAMPLE_HISTORY)
        ring.append(e)
        self._see(e.t)

    def _span(self, e: Span) -> None:
        key = (e.category, e.name)
        stats = self.spans.get(key)
        if stats is None:
            if len(self.spans) >= SPAN_NAMES:
                self.span_overflow += 1
                return
            stats = self.spans[key] = SpanStats(e.category, e.name)
        stats.count += 1
        stats.total_ms += e.dur_ms
        stats.last_ms = e.dur_ms
        stats.recent.append(e.dur_ms)
        self._see(e.start + e.dur_ms / 1000.0)

    def _metric(self, e: Metric) -> None:
        ring = self.metrics.get(e.name)
        if ring is None:
            if len(self.metrics) >= METRIC_NAMES:
                self.metric_overflow += 1
                return
            ring = self.metrics[e.name] = deque(maxlen=SAMPLE_HISTORY)
        ring.append((e.t, e.value))
        self._see(e.t)

    def _log(self, e: LogLine) -> None:
        self.add_log(e.text, e.stream, e.replace, e.t)

    def add_log(self, text: str, stream: str = "stdout", replace: bool = False, t: float = 0.0) -> None:
        """Append a line; a ``\\r`` update (or text with a ``\\r`` in it) overwrites the last line."""
        if "\r" in text:
            parts = [p for p in text.split("\r") if p]
            replace = replace or (text.startswith("\r") and bool(self.logs))
            text = parts[-1] if parts else ""
        text = text.rstrip("\n")
        self.log_seq += 1
        entry = LogEntry(self.log_seq, t, text, stream)
        if replace and self.logs and self.logs[-1].stream == stream:
            self.logs[-1] = entry
        else:
            self.logs.append(entry)
            self.log_total += 1
        if t:
            self._see(t)
        self.version += 1

    def _anomaly(self, e: Anomaly) -> None:
        self.anomalies.append(e)
        self._see(e.t)

    def _warning(self, e: AgentWarning) -> None:
        self.warnings.append(e)

    def _ops(self, e: Ops) -> None:
        n = len(e.names)
        flops = e.flops if len(e.flops) == n else [None] * n
        shapes = e.shapes if len(e.shapes) == n else [""] * n
        self.ops = [OpRow(e.names[i], e.self_ms[i], e.calls[i], flops[i] or None, shapes[i]) for i in range(n)]
        self.ops.sort(key=lambda op: op.self_ms, reverse=True)
        self.ops_step = e.step
        self.ops_coverage = e.coverage
        self.ops_total_ms, self.ops_rows = e.total_ms, e.rows

    def _generation(self, e: Generation) -> None:
        self.generations.append(e)
        self.generation_count += 1
        self.generated_tokens += e.new_tokens * max(1, e.batch)
        for ms in e.decode_ms:
            self.decode_points.append((e.t, ms))
        if e.kv_bytes is not None:
            self.kv_bytes = e.kv_bytes
        self._see(e.t)

    def _stats(self, e: Stats) -> None:
        self.dropped = e.dropped
        self.clients = e.clients
        self.agent_cpu_pct = e.agent_cpu_pct
        self._see(e.t)

    def _collective_wait(self, e: CollectiveWait) -> None:
        self.waits_seen += 1
        self.waits.append(e)
        self.waiting = None if e.done else e
        self._see(e.t)

    def _snapshot_done(self, e: SnapshotDone) -> None:
        self.snapshot_done = True

    def _end(self, e: End) -> None:
        """Merge: the agent knows the traceback, the launcher knows exit code and signal."""
        if self.end is None:
            self.end = End(t=e.t, exit_code=e.exit_code, signal=e.signal, traceback=e.traceback,
                           reason=e.reason)
        else:
            for name in ("exit_code", "signal", "traceback"):
                if getattr(e, name) is not None:
                    setattr(self.end, name, getattr(e, name))
            if e.reason and (not self.end.reason or e.reason != "exit"):
                self.end.reason = e.reason
            self.end.t = max(self.end.t, e.t)
        self.connection = ENDED
        self._see(e.t)


_HANDLERS = {
    Session: SessionModel._session,
    ModelTree: SessionModel._model,
    Step: SessionModel._step,
    LayerStats: SessionModel._layers,
    HostSample: SessionModel._host,
    DeviceSample: SessionModel._device,
    Span: SessionModel._span,
    Metric: SessionModel._metric,
    LogLine: SessionModel._log,
    Anomaly: SessionModel._anomaly,
    AgentWarning: SessionModel._warning,
    Ops: SessionModel._ops,
    LayerFlops: SessionModel._flops,
    StepFlops: SessionModel._step_flops,
    Generation: SessionModel._generation,
    Stats: SessionModel._stats,
    CollectiveWait: SessionModel._collective_wait,
    SnapshotDone: SessionModel._snapshot_done,
    End: SessionModel._end,
}
