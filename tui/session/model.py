"""The viewer's state: a plain-Python model fed by events, read by the widgets on a timer.

No Textual here, so it is unit-tested alone and shared by every source (live socket, recording).
Every collection is bounded (``deque(maxlen=…)`` or one entry per module/span name), so memory stays
flat however long the run. The ingest thread holds ``lock`` while applying; the UI holds it while
reading; ``version`` grows on every change so a frame can skip work when nothing arrived.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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
from llmtop.protocol.formulas import bound, percentile

EMA_ALPHA = 0.2  # weight of the newest step in per-layer and step-time means
STEP_HISTORY = 10_000  # steps kept for sparklines (long windows of fast steps)
SAMPLE_HISTORY = 4_096  # host/device/metric samples kept per series
LAYER_HISTORY = 256  # per-layer (step, fwd, bwd, act) points kept for the detail screen
SPAN_DURATIONS = 512  # recent durations kept per span name for p95
LOG_LINES = 5_000
EVENTS_KEPT = 200  # anomalies, warnings
STEP_FLOPS_KEPT = 4_096  # per-step FLOPs events kept (sampled steps only)
TIMED_KEPT = 32  # per layer: (step, fwd ms, calls) of recent timed steps, to join per-step FLOPs
STALE_STEPS = 3  # a layer table older than this many steps is shown with its age
GENERATIONS = 512
DECODE_POINTS = 4_096
METRIC_NAMES = 64  # custom series beyond this are counted, not kept
SPAN_NAMES = 512

CONNECTING, LIVE, LOST, ENDED = "connecting", "live", "lost", "ended"


def _ema(old: float | None, new: float) -> float:
    return new if old is None else old + EMA_ALPHA * (new - old)


@dataclass
class Layer:
    """One module of a model tree, with its latest measurements."""

    id: int
    model: int
    path: str
    cls: str
    params: int  # owned directly
    parent: int
    depth: int = 0
    dtype: str = ""
    trainable: bool = True
    compiled: bool = False
    children: list[int] = field(default_factory=list)
    total_params: int = 0  # this module and everything under it
    # latest step with layer timing, and exponential means over steps
    step: int | None = None
    fwd_ms: float | None = None
    fwd_self_ms: float | None = None
    bwd_ms: float | None = None
    bwd_self_ms: float | None = None
    calls: int | None = None
    act_bytes: int | None = None
    fwd_ema: float | None = None
    bwd_ema: float | None = None
    act_ema: float | None = None
    history: deque[tuple[int, float, float | None, int | None]] = field(
        default_factory=lambda: deque(maxlen=LAYER_HISTORY)
    )
    # from LayerFlops: per forward call
    flops: float | None = None
    bytes: float | None = None
    peak_flops: float | None = None
    peak_bw: float | None = None
    # from StepFlops: the forward FLOPs/bytes of exactly the calls one timed step ran
    step_flops: float | None = None
    step_bytes: float | None = None
    step_flops_step: int | None = None  # the step those figures are for
    step_flops_note: str = ""  # why there is no figure for that step
    timed: deque[tuple[int, float, int]] = field(default_factory=lambda: deque(maxlen=TIMED_KEPT))

    @property
    def name(self) -> str:
        """The last path component; the root is shown by its class."""
        return self.path.rsplit(".", 1)[-1] if self.path else self.cls

    @property
    def time_ms(self) -> float | None:
        """Recent forward + backward time (EMA), None if never measured."""
        if self.fwd_ema is None:
            return None
        return self.fwd_ema + (self.bwd_ema or 0.0)

    def _timed_at(self, step: int | None) -> tuple[int, float, int] | None:
        """(step, forward ms, calls) of timed step ``step``, if it is recent enough to be kept."""
        if step is None:
            return None
        for entry in reversed(self.timed):
            if entry[0] == step:
                return entry
            if entry[0] < step:
                break
        return None

    @property
    def achieved_flops(self) -> float | None:
        """FLOP/s reached in forward: the FLOPs of one timed step's calls / that step's forward time
        (never FLOPs of some calls over the time of others). None when unknown or above the peak."""
        return self._achieved()[0]

    @property
    def achieved_note(self) -> str:
        """Why ``achieved_flops`` is None ("" when it is a number, or nothing is known yet)."""
        return self._achieved()[1]

    def _achieved(self) -> tuple[float | None, str]:
        if self.step_flops_note:
            return None, self.step_flops_note
        if not self.step_flops:
            return None, ""
        timed = self._timed_at(self.step_flops_step)
        if timed is None or timed[1] <= 0:
            return None, f"no forward time for step {self.step_flops_step}"
        value = self.step_flops / (timed[1] / 1000.0)
        if self.peak_flops and value > self.peak_flops:
            return None, (f"{value / 1e9:.1f} GFLOP/s > device peak {self.peak_flops / 1e9:.1f}: "
                          "count and time disagree")
        return value, ""

    @property
    def intensity(self) -> float | None:
        if self.flops is None or not self.bytes:
            return None
        return self.flops / self.bytes

    @property
    def bound(self) -> str | None:
        """compute / memory / overhead, from the roofline of one timed step's own FLOPs, bytes and
        forward time; None without peaks, or without that step's figures."""
        timed = self._timed_at(self.step_flops_step)
        if timed is None or self.achieved_note:  # an impossible figure gets no verdict either
            return None
        return roofline_bound(self.step_flops, self.step_bytes, self.peak_flops, self.peak_bw, timed[1], 1)


def roofline_bound(flops: float | None, nbytes: float | None, peak_flops: float | None,
                   peak_bw: float | None, fwd_ms: float | None, calls: int | None) -> str | None:
    """Which limit a layer sits against: ``compute``, ``memory`` or ``overhead``.

    The arithmetic intensity (FLOPs per byte) against the ridge point (peak FLOP/s ÷ bandwidth)
    decides compute versus memory; a measured time far above both roofline limits means neither is
    the limit (launch overhead, Python, synchronisation): ``overhead``.
    """
    if not flops or not nbytes or not peak_flops or not peak_bw:
        return None
    per_call_s = fwd_ms / 1000.0 / calls if fwd_ms and calls else None
    return bound(flops, nbytes, per_call_s, peak_flops, peak_bw)


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


class SessionModel:
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
        self.flops_signature = ""
        self.flops_device = ""
        self.flops_method = ""
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

    def _model(self, e: ModelTree) -> None:
        old = self.models.get(e.model)
        if old is not None:
            for mid in old.ids:
                self.layers.pop(mid, None)
            self.roots = [r for r in self.roots if r not in old.ids]
        self.models[e.model] = e
        n = len(e.ids)
        dtypes = e.dtypes if len(e.dtypes) == n else [""] * n
        trainable = e.trainable if len(e.trainable) == n else [True] * n
        compiled = e.compiled if len(e.compiled) == n else [False] * n
        for i, mid in enumerate(e.ids):
            self.layers[mid] = Layer(id=mid, model=e.model, path=e.paths[i], cls=e.classes[i],
                                     params=e.params[i], parent=e.parents[i], dtype=dtypes[i],
                                     trainable=trainable[i], compiled=compiled[i])
        for mid in e.ids:
            layer = self.layers[mid]
            parent = self.layers.get(layer.parent)
            if parent is None:
                self.roots.append(mid)
            else:
                parent.children.append(mid)
        for root in e.ids:
            if self.layers[root].parent not in self.layers:
                _fill_totals(self.layers, root)
        self.tree_version += 1

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

    def _layers(self, e: LayerStats) -> None:
        layers = self.layers
        n = len(e.ids)
        bwd = e.bwd_ms if len(e.bwd_ms) == n else None
        bwd_self = e.bwd_self_ms if len(e.bwd_self_ms) == n else None
        act = e.act_bytes if len(e.act_bytes) == n else None
        for i, mid in enumerate(e.ids):
            layer = layers.get(mid)
            if layer is None:
                continue
            f = e.fwd_ms[i]
            b = bwd[i] if bwd is not None else None
            a = act[i] if act is not None else None
            layer.step = e.step
            layer.fwd_ms = f
            layer.fwd_self_ms = e.fwd_self_ms[i]
            layer.calls = e.calls[i]
            layer.bwd_ms = b
            layer.bwd_self_ms = bwd_self[i] if bwd_self is not None else None
            layer.act_bytes = a
            layer.fwd_ema = f if layer.fwd_ema is None else layer.fwd_ema + EMA_ALPHA * (f - layer.fwd_ema)
            if b is not None:
                layer.bwd_ema = b if layer.bwd_ema is None else layer.bwd_ema + EMA_ALPHA * (b - layer.bwd_ema)
            if a is not None:
                layer.act_ema = a if layer.act_ema is None else layer.act_ema + EMA_ALPHA * (a - layer.act_ema)
            layer.history.append((e.step, f, b, a))
            layer.timed.append((e.step, f, e.calls[i]))
        if self.layers_step is None or e.step >= self.layers_step:
            self.layers_step = e.step

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

    def _flops(self, e: LayerFlops) -> None:
        self.flops_signature = e.signature
        self.flops_device = e.device
        self.flops_method = e.method
        self.peak_flops = e.peak_flops
        self.peak_bw = e.peak_bw
        for i, mid in enumerate(e.ids):
            layer = self.layers.get(mid)
            if layer is None:
                continue
            layer.flops = e.flops[i]
            layer.bytes = e.bytes[i] if i < len(e.bytes) else None
            layer.peak_flops = e.peak_flops
            layer.peak_bw = e.peak_bw

    def _step_flops(self, e: StepFlops) -> None:
        """Per-module FLOPs of one timed step's calls: the layers' FLOP/s divide them by the same
        step's forward times. A root whose timed calls differ from the calls summed gets no figure."""
        self.step_flops.append(e)
        self.last_step_flops = e
        if e.peak_flops:
            self.peak_flops = e.peak_flops
        mismatch = ""
        for rid, n in zip(e.roots, e.root_calls, strict=False):
            root = self.layers.get(rid)
            timed = root._timed_at(e.step) if root is not None else None
            if timed is not None and timed[2] != n:
                mismatch = f"step {e.step}: {timed[2]} calls timed, {n} counted"
        n = len(e.ids)
        for layer in self.layers.values():  # modules the step did not run keep no stale figure
            if layer.step_flops_step is not None and layer.step_flops_step < e.step:
                layer.step_flops = layer.step_bytes = None
                layer.step_flops_step = e.step
                layer.step_flops_note = e.note
        for i, mid in enumerate(e.ids):
            layer = self.layers.get(mid)
            if layer is None:
                continue
            layer.step_flops = e.flops[i]
            layer.step_bytes = e.bytes[i] if i < len(e.bytes) else None
            layer.step_flops_step = e.step
            layer.step_flops_note = mismatch or e.note
            if e.peak_flops:
                layer.peak_flops = e.peak_flops
        if not n and e.note:
            for layer in self.layers.values():
                layer.step_flops = layer.step_bytes = None
                layer.step_flops_step = e.step
                layer.step_flops_note = e.note

    @property
    def achieved_flops(self) -> float | None:
        """The newest sampled step's achieved FLOP/s (forward + backward FLOPs / step time)."""
        e = self.last_step_flops
        return e.achieved_flops if e is not None else None

    @property
    def mfu(self) -> float | None:
        """The newest sampled step's model FLOPs utilisation (achieved / device peak)."""
        e = self.last_step_flops
        return e.mfu if e is not None else None

    def recent_step_flops(self, window_s: float) -> list[StepFlops]:
        """StepFlops of the steps inside the last ``window_s`` seconds of data (for sparklines)."""
        steps = self.recent_steps(window_s)
        if not steps:
            return []
        first = steps[0].step
        return [e for e in self.step_flops if e.step >= first]

    @property
    def layers_age_steps(self) -> int | None:
        """Steps since the newest layer table (0: the latest step was timed); None without one."""
        if self.layers_step is None or self.last_step is None:
            return None
        return max(0, self.last_step.step - self.layers_step)

    @property
    def layers_age_s(self) -> float | None:
        """Seconds of the run between the newest layer table's step and the latest step."""
        if self.layers_step is None or self.last_step is None:
            return None
        for s in reversed(self.steps):
            if s.step <= self.layers_step:
                return max(0.0, self.last_step.t - s.t)
        return None

    @property
    def layers_stale(self) -> str:
        """"" while the layer table is fresh; else its age as people read it ("table of step 12,
        40 steps / 9 s ago"), for every view that draws layer figures."""
        age = self.layers_age_steps
        if age is None or age <= STALE_STEPS:
            return ""
        secs = self.layers_age_s
        when = f"{age} steps" + (f" / {secs:.0f} s" if secs is not None else "")
        return f"layer table of step {self.layers_step}, {when} old"

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

    # --- derived values (call with the lock held) -----------------------------------------------

    @property
    def ended(self) -> bool:
        return self.end is not None

    def recent_steps(self, window_s: float) -> list[Step]:
        """Steps that ended within ``window_s`` of the latest data, oldest first."""
        cutoff = self.now - window_s
        out: list[Step] = []
        for s in reversed(self.steps):
            if s.t < cutoff:
                break
            out.append(s)
        out.reverse()
        return out

    def recent_host(self, window_s: float) -> list[HostSample]:
        return _recent(self.host, self.now - window_s)

    def recent_device(self, index: int, window_s: float) -> list[DeviceSample]:
        return _recent(self.devices.get(index, ()), self.now - window_s)

    def recent_generations(self, window_s: float) -> list[Generation]:
        return _recent(self.generations, self.now - window_s)

    def steps_per_s(self, window_s: float = 10.0) -> float | None:
        steps = self.recent_steps(window_s)
        if len(steps) >= 2 and steps[-1].t > steps[0].t:
            return (len(steps) - 1) / (steps[-1].t - steps[0].t)
        if steps and steps[-1].dur_ms > 0:
            return 1000.0 / steps[-1].dur_ms
        return None

    def tokens_per_s(self, window_s: float = 10.0) -> float | None:
        steps = [s for s in self.recent_steps(window_s) if s.tokens]
        busy_ms = sum(s.dur_ms for s in steps)
        if not steps or busy_ms <= 0:
            return None
        return sum(s.tokens or 0 for s in steps) / (busy_ms / 1000.0)

    def phase_totals(self, window_s: float) -> dict[str, float]:
        """Milliseconds per phase summed over the recent window (empty when no phases came)."""
        totals = dict.fromkeys(PHASES, 0.0)
        seen = False
        for s in self.recent_steps(window_s):
            for name, ms in s.phases.items():
                if name in totals and ms:
                    totals[name] += ms
                    seen = True
        return totals if seen else {}

    def layer_share(self, layer: Layer) -> float | None:
        """Share of the step (0..1) spent in this module, forward + backward, from the means."""
        t = layer.time_ms
        if t is None or not self.step_ema_ms:
            return None
        return t / self.step_ema_ms

    def walk(self, root: int | None = None) -> Iterator[Layer]:
        """Modules depth-first in tree order."""
        stack = list(reversed(self.roots if root is None else [root]))
        while stack:
            layer = self.layers.get(stack.pop())
            if layer is None:
                continue
            yield layer
            stack.extend(reversed(layer.children))

    def hottest_layers(self, n: int = 5, leaves_only: bool = True) -> list[Layer]:
        """Modules with the most recent time; leaves by default so parents don't hide their children."""
        pool = [la for la in self.layers.values() if la.time_ms is not None
                and (not leaves_only or not la.children)]
        pool.sort(key=lambda la: la.time_ms or 0.0, reverse=True)
        return pool[:n]

    def span_rows(self) -> list[SpanStats]:
        return sorted(self.spans.values(), key=lambda s: (s.category, s.name))

    def generation_tokens_per_s(self, g: Generation) -> float | None:
        total = g.total_ms or (g.ttft_ms + sum(g.decode_ms))
        if total <= 0:
            return None
        return g.new_tokens * max(1, g.batch) / (total / 1000.0)

    def decode_latency(self, window_s: float) -> list[float]:
        cutoff = self.now - window_s
        out = [ms for t, ms in reversed(self.decode_points) if t >= cutoff]
        out.reverse()
        return out

    def uptime(self, now: float) -> float | None:
        """Seconds since the script started; frozen at the end once it ended."""
        if self.session is None or not self.session.started:
            return None
        end = self.end.t if self.end is not None else now
        return max(0.0, end - self.session.started)

    def exit_text(self) -> str | None:
        """"exit 0", "exit 1", "killed by signal 9", "uncaught exception", or None while running."""
        if self.end is None:
            return None
        if self.end.signal:
            return f"killed by signal {self.end.signal}"
        if self.end.exit_code is not None:
            return f"exit {self.end.exit_code}"
        if self.end.reason == "exception":
            return "uncaught exception"
        return self.end.reason or "ended"

    @property
    def exit_ok(self) -> bool:
        """Ended normally: exit code 0, or the agent saw a clean exit (its code is the launcher's)."""
        e = self.end
        if e is None or e.signal or e.reason == "exception":
            return False
        return e.exit_code == 0 or (e.exit_code is None and e.reason == "exit")

    def summary(self) -> dict[str, Any]:
        """Counts for tests and the bench: how much of each kind is held."""
        return {
            "steps": len(self.steps), "layers": len(self.layers), "host": len(self.host),
            "logs": len(self.logs), "spans": len(self.spans), "generations": len(self.generations),
            "anomalies": len(self.anomalies), "devices": {k: len(v) for k, v in self.devices.items()},
        }


def _recent(ring: Iterable[Any], cutoff: float) -> list[Any]:
    out = []
    for item in reversed(ring):  # type: ignore[call-overload]
        if item.t < cutoff:
            break
        out.append(item)
    out.reverse()
    return out


def _fill_totals(layers: dict[int, Layer], root: int) -> None:
    """Subtree parameter counts and depths, iteratively (deep trees must not hit the recursion limit)."""
    order: list[int] = []
    stack = [(root, 0)]
    while stack:
        mid, depth = stack.pop()
        layer = layers[mid]
        layer.depth = depth
        order.append(mid)
        stack.extend((c, depth + 1) for c in layer.children)
    for mid in reversed(order):
        layer = layers[mid]
        layer.total_params = layer.params + sum(layers[c].total_params for c in layer.children)


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
    SnapshotDone: SessionModel._snapshot_done,
    End: SessionModel._end,
}
