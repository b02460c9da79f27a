"""The summary pass: ``summarize(reader)`` reads every event of a recording once into a ``RunSummary``.

Per-layer medians come from an even spread of at most ``LAYER_STEPS`` steps' layer tables (decoding
every table of an hour-long run costs minutes); the last ``MODEL_TAIL`` steps also go to a
``SessionModel`` so the diagnoses see the end state. ``open_summary(path)`` opens and summarizes.

Step numbers repeat (an evaluation's record carries the number of the training step it precedes; the
agent counts from 0 again when training follows inference records), so nothing is joined by number
alone: layer tables meet their step through ``StepTables`` (the live viewer's rule, in stream order), a
step's FLOPs (``StepFlops``) meet it by number and duration, and inference records before the first
training step become one evaluation, as in the dashboard.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from llmtop.protocol.events import (
    AgentWarning,
    CollectiveWait,
    DeviceSample,
    Generation,
    HostSample,
    LayerFlops,
    LayerStats,
    ModelTree,
    Ops,
    Span,
    Stats,
    Step,
    StepFlops,
)
from llmtop.protocol.recording import RecordingReader
from llmtop.tui.commands.step_tables import STEPS_KEPT, StepTables
from llmtop.tui.commands.summary import LayerSummary, ModeSteps, Reservoir, RunSummary, SpanSummary

LAYER_STEPS = 2048  # layer tables of at most this many steps (evenly spread) are read for medians
MODEL_TAIL = 300  # the last steps' layer tables also go to the model (diagnoses of the end state)
SPAN_NAMES = 512  # span names kept (the rest are not summarized)
MAX_LOADS = 32  # from_pretrained calls listed
MAX_WAITS = 4096  # CollectiveWait reports kept (a hang reports once per tick)


def summarize(reader: RecordingReader) -> RunSummary:
    """Read every event once into a RunSummary (and a SessionModel for the diagnoses)."""
    out = RunSummary(path=reader.path, session=reader.session, duration_s=reader.duration,
                     warning=reader.warning)
    model = out.model
    tables = StepTables()  # each table with its own step's record, across evaluations and restarts
    flops = FlopsJoin()  # the agent's FLOPs of each sampled step, with that step's record
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
            for table, step in tables.step(event):
                _layers(out, table, step)
            flops.step(event)
        elif isinstance(event, StepFlops):
            flops.flops(event)
        elif isinstance(event, LayerStats):
            for table, step in tables.table(event, keep=event.step % every == 0):
                _layers(out, table, step)
        elif isinstance(event, ModelTree):
            _tree(out, event)
        elif isinstance(event, LayerFlops):
            for i, mid in enumerate(event.ids):
                if i < len(event.flops):
                    out.module_flops[mid] = event.flops[i]
            if event.peak_flops:
                out.peak_flops = event.peak_flops
            out.flops_device = event.device or out.flops_device
        elif isinstance(event, Ops):
            _ops(out, event)
        elif isinstance(event, HostSample):
            out.rss_peak = max(out.rss_peak or 0, event.rss)
            if out.rss_first is None:
                out.rss_first = event.rss
            out.rss_last = event.rss
        elif isinstance(event, DeviceSample) and event.mem_used is not None:
            out.device_mem_peak = max(out.device_mem_peak or 0, event.mem_used)
        elif isinstance(event, Span):
            _span(out, event)
        elif isinstance(event, Generation):
            _generation(out, event)
        elif isinstance(event, AgentWarning):
            out.flops_failed = out.flops_failed or "flops" in event.source
        elif isinstance(event, CollectiveWait):
            if len(out.waits) < MAX_WAITS or event.done:
                out.waits.append(event)
        elif isinstance(event, Stats):
            if event.agent_cpu_pct is not None and math.isfinite(event.agent_cpu_pct):
                out.agent_cpu_max = max(out.agent_cpu_max or 0.0, event.agent_cpu_pct)
            out.dropped = max(out.dropped, event.dropped)
    for table, step in tables.flush():
        _layers(out, table, step)
    if flops.seen:  # the agent's own figures of the steps' calls replace the estimate from the tables
        for name, mode in out.modes.items():
            mode.flops = flops.by_mode.get(name, Reservoir())
    out.end = model.end
    return out


class FlopsJoin:
    """``StepFlops`` (the FLOPs of exactly the calls one sampled step timed, each call counted at its own
    input shapes) with the record of that step, for the FLOPs per step of each mode. A step's FLOPs can
    come before or after its record, and numbers repeat (an evaluation's, a numbering that restarts):
    the two are joined on number and duration, which the agent gives both from the same clock reading."""

    def __init__(self) -> None:
        self.seen = False
        self.by_mode: dict[str, Reservoir] = {}
        self.recent: deque[Step] = deque(maxlen=STEPS_KEPT)
        self.waiting: deque[StepFlops] = deque(maxlen=STEPS_KEPT)

    def step(self, s: Step) -> None:
        if s.mode == "eval":  # an evaluation's calls are no step's: it has no StepFlops
            return
        self.recent.append(s)
        for e in [e for e in self.waiting if _same_step(e, s)]:
            self.waiting.remove(e)
            self._add(e, s)

    def flops(self, e: StepFlops) -> None:
        self.seen = True
        s = next((s for s in reversed(self.recent) if _same_step(e, s)), None)
        if s is None:
            self.waiting.append(e)
        else:
            self._add(e, s)

    def _add(self, e: StepFlops, s: Step) -> None:
        if e.flops_total is not None and math.isfinite(e.flops_total) and e.flops_total > 0:
            self.by_mode.setdefault(s.mode or "train", Reservoir()).add(e.flops_total)


def _same_step(e: StepFlops, s: Step) -> bool:
    return e.step == s.step and e.dur_ms is not None and e.dur_ms == s.dur_ms


def _step(out: RunSummary, e: Step) -> None:
    if e.mode == "eval":  # an evaluation inside training: shown apart, never a training step
        out.modes.setdefault("eval", ModeSteps()).add(e)
        return
    if e.mode == "train" and "train" not in out.modes and "infer" in out.modes:
        _evaluation_before_training(out)
    out.steps += 1
    if out.first_step is None:
        out.first_step = e.step
    out.last_step = e.step if out.last_step is None else max(out.last_step, e.step)
    out.step_ms.add(e.dur_ms)
    out.busy_ms += e.dur_ms if math.isfinite(e.dur_ms) and e.dur_ms > 0 else 0.0
    for name, ms in e.phases.items():
        out.phases.setdefault(name, Reservoir()).add(ms)
        out.phase_totals[name] = out.phase_totals.get(name, 0.0) + (ms if ms and math.isfinite(ms) else 0.0)
    out.modes.setdefault(e.mode or "train", ModeSteps()).add(e)
    out.tokens += e.tokens or 0
    if e.comm_ms is not None and math.isfinite(e.comm_ms) and e.comm_ms >= 0:
        out.comm_ms.add(e.comm_ms)
        out.comm_total_ms += e.comm_ms
    out.comm_calls += e.comm_calls
    out.comm_bytes += e.comm_bytes
    out.samples += e.samples or 0
    if e.loss is not None:
        if math.isfinite(e.loss):
            out.loss_count += 1
            if out.first_loss is None:
                out.first_loss = e.loss
            out.min_loss = e.loss if out.min_loss is None else min(out.min_loss, e.loss)
        else:
            out.nonfinite_losses += 1
        out.last_loss = e.loss
    if e.cuda_peak is not None:
        out.cuda_peak = max(out.cuda_peak or 0, e.cuda_peak)
    if e.overhead_us and math.isfinite(e.overhead_us) and e.overhead_us >= 0:
        out.overhead_us.add(e.overhead_us)
        out.overhead_total_us += e.overhead_us
    out.layer_every = e.layer_every


# What the step records add to a RunSummary (its eval records and memory peaks aside).
_STEP_FIELDS = ("steps", "first_step", "last_step", "step_ms", "busy_ms", "phases", "phase_totals", "tokens",
                "samples", "comm_ms", "comm_total_ms", "comm_calls", "comm_bytes", "loss_count", "first_loss",
                "min_loss", "last_loss", "nonfinite_losses", "overhead_us", "overhead_total_us")


def _evaluation_before_training(out: RunSummary) -> None:
    """The first training step, after inference records only: they were an evaluation before training
    (or generate calls), and the agent counts training steps from 0 again. As the live viewer does
    (``SessionModel._pretraining_evals``), they become one evaluation and are no steps of the run. Op
    profiles stay: the agent drops its windows from before the restart itself, and a training step's
    profile can come before the first training step's record."""
    infer = out.modes.pop("infer")
    fresh = RunSummary(path=out.path, session=out.session, duration_s=out.duration_s, warning=out.warning)
    for name in _STEP_FIELDS:
        setattr(out, name, getattr(fresh, name))
    out.modes.setdefault("eval", ModeSteps()).add(
        Step(step=0, t=0.0, dur_ms=infer.step_ms.total, mode="eval", phases=dict(infer.phase_totals)))


def _tree(out: RunSummary, e: ModelTree) -> None:
    parents = set(e.parents)
    known = set(e.ids)
    for i, mid in enumerate(e.ids):
        if mid not in out.layers or out.layers[mid].path != e.paths[i]:
            out.layers[mid] = LayerSummary(id=mid, path=e.paths[i], cls=e.classes[i], leaf=mid not in parents)
        if e.parents[i] not in known:
            out.roots.add(mid)


def _layers(out: RunSummary, e: LayerStats, step: Step | None) -> None:
    n = len(e.ids)
    has_bwd = len(e.bwd_ms) == n
    step_flops = 0.0
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
        if mid in out.roots and mid in out.module_flops and i < len(e.calls):
            # Forward FLOPs per call × calls; a backward costs about twice its forward (the usual 3×).
            backward = has_bwd and e.bwd_ms[i] > 0
            step_flops += out.module_flops[mid] * e.calls[i] * (3.0 if backward else 1.0)
    # FLOPs count per mode (a generate after training is not a training step), from the table's own step:
    # an evaluation shares its number with the training step it precedes.
    mode = out.modes.get((step.mode or "train") if step is not None else "")
    if step_flops > 0 and mode is not None:
        mode.flops.add(step_flops)


def _ops(out: RunSummary, e: Ops) -> None:
    out.op_windows += 1
    best: dict[str, float] = {}
    rows_ms = 0.0
    for i, name in enumerate(e.names):
        row = out.ops.setdefault(name, [0.0, 0.0, 0.0])
        ms = e.self_ms[i] if i < len(e.self_ms) else 0.0
        ms = ms if math.isfinite(ms) and ms > 0 else 0.0
        rows_ms += ms
        row[0] += ms
        row[1] += e.calls[i] if i < len(e.calls) else 0
        row[2] += e.flops[i] if i < len(e.flops) else 0.0
        if i < len(e.shapes) and e.shapes[i] and ms > best.get(name, -1.0):
            best[name] = ms
            out.op_shapes[name] = e.shapes[i]
    # The rows are the step's top K ops; their shares are of every op of the step (Ops.total_ms), as in
    # the Ops view. An older agent sent no total: its rows' sum stands in (and the report says so).
    total = e.total_ms
    if total is None or not math.isfinite(total) or total < rows_ms - 1e-6:
        out.op_totals_missing += 1
        total = rows_ms
    out.op_total_ms += max(total, rows_ms)


def _span(out: RunSummary, e: Span) -> None:
    key = (e.category, e.name)
    sp = out.spans.get(key)
    if sp is None:
        if len(out.spans) >= SPAN_NAMES:
            return
        sp = out.spans[key] = SpanSummary(e.category, e.name)
    ms = e.dur_ms if math.isfinite(e.dur_ms) and e.dur_ms >= 0 else 0.0
    sp.count += 1
    sp.total_ms += ms
    sp.dur_ms.add(ms)
    a = e.attrs or {}
    if e.category == "model_loading" and "what" in a and len(out.loads) < MAX_LOADS:
        out.loads.append({"name": e.name, "what": str(a.get("what")), "source": str(a.get("name", "")),
                          "load_ms": ms, "params": _int(a.get("params")), "dtype": a.get("dtype") or None,
                          "rss_added_bytes": _int(a.get("rss_added")), "error": a.get("error")})
    elif e.category == "text_preprocessing" and "tokens" in a:
        out.tok_calls += _int(a.get("calls")) or 1
        out.tok_texts += _int(a.get("texts")) or 0
        out.tok_tokens += _int(a.get("tokens")) or 0
        out.tok_ms += ms
        if _int(a.get("pad_tokens")) is not None:
            out.tok_pads += _int(a.get("pad_tokens")) or 0
            out.tok_pads_known = True
        if _int(a.get("truncated")) is not None:
            out.tok_truncated += _int(a.get("truncated")) or 0
            out.tok_truncation_known = True
    elif e.category == "model_inference" and e.name == "evaluate" and e.depth == 0:
        out.evaluations.add(ms)
    elif e.category == "model_inference" and e.name.startswith("pipeline"):
        row = out.pipelines.setdefault(e.name, [0.0, 0.0, 0.0])
        row[0] += 1
        items = a.get("items")
        if items is None and a.get("items_per_s") and ms > 0:
            items = round(a["items_per_s"] * ms / 1000.0)
        row[1] += _int(items) or 0
        row[2] += ms


def _generation(out: RunSummary, e: Generation) -> None:
    batch = max(1, e.batch)
    out.requests += 1
    out.sequences += batch
    out.prefill_tokens += max(0, e.prompt_tokens) * batch
    out.decode_tokens += max(0, e.new_tokens) * batch
    total = e.total_ms or (e.ttft_ms + sum(e.decode_ms))
    out.generate_ms += total if math.isfinite(total) and total > 0 else 0.0
    if e.ttft_ms >= 0:
        out.ttft_ms.add(e.ttft_ms)
    for ms in e.decode_ms:
        if ms >= 0:
            out.per_token_ms.add(ms)
    if e.kv_bytes is not None and e.kv_bytes >= 0:
        out.kv_bytes = max(out.kv_bytes or 0, e.kv_bytes)


def _int(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return int(v)


def open_summary(path: str) -> RunSummary:
    """Open and summarize; ``RecordingError`` for files that cannot be read."""
    with RecordingReader(path) as reader:
        return summarize(reader)
