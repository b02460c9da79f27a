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
import sys
from dataclasses import dataclass, field
from typing import Any

from llmtop.protocol.events import (
    PHASES,
    AgentWarning,
    DeviceSample,
    End,
    Generation,
    HostSample,
    LayerFlops,
    LayerStats,
    ModelTree,
    Ops,
    Session,
    Span,
    Stats,
    Step,
)
from llmtop.protocol.recording import RecordingReader
from llmtop.tui.commands import textstyle
from llmtop.tui.commands.common import read_recordings
from llmtop.tui.commands.textstyle import BOLD, RED, YELLOW, paint
from llmtop.tui.session import fmt
from llmtop.tui.session.model import SessionModel

HELP = ("Summarize a recording: run and exit, steps and FLOPs, phases, loss, tokens, layers, ops, memory, "
        "spans, inference, diagnoses and the agent's own cost.")
RESERVOIR = 2048  # samples kept per module and series for medians
LAYER_STEPS = 2048  # layer tables of at most this many steps (evenly spread) are read for medians
MODEL_TAIL = 300  # the last steps' layer tables also go to the model (diagnoses of the end state)
TOP = 8
SCHEMA_VERSION = 1  # of the --json object: docs/REPORT.md, docs/report.schema.json
TRACEBACK_LINES = 6  # of a crashed run's traceback, shown first
SPAN_NAMES = 512  # span names kept (the rest are not summarized)
SPAN_ROWS = 12  # span rows in the text
MODE_MEMORY = 256  # recent steps whose mode is remembered until their layer tables arrive
MAX_LOADS = 32  # from_pretrained calls listed
SEVERITY_SGR = {"error": (BOLD, RED), "warning": (YELLOW,)}


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
        """Typical self time per step, forward + backward: medians, so that a warm-up step's
        first-call costs do not rank a layer above the ones that are slow on every step."""
        return (self.fwd_self.median() or 0.0) + (self.bwd_self.median() or 0.0)


@dataclass
class ModeSteps:
    """Steps of one mode (train, or the eval/inference steps of a training run): times and phases."""

    count: int = 0
    step_ms: Reservoir = field(default_factory=Reservoir)
    phases: dict[str, Reservoir] = field(default_factory=dict)
    phase_totals: dict[str, float] = field(default_factory=dict)
    flops: Reservoir = field(default_factory=Reservoir)  # FLOPs per step, of the steps with layer tables

    def add(self, e: Step) -> None:
        self.count += 1
        self.step_ms.add(e.dur_ms)
        for name, ms in e.phases.items():
            self.phases.setdefault(name, Reservoir()).add(ms)
            self.phase_totals[name] = self.phase_totals.get(name, 0.0) + (ms if ms and math.isfinite(ms) else 0.0)

    def phase_shares(self) -> dict[str, float]:
        total = sum(self.phase_totals.values())
        return {k: v / total for k, v in self.phase_totals.items()} if total > 0 else {}


@dataclass
class SpanSummary:
    """One span name of one category: count, total and a sample for percentiles."""

    category: str
    name: str
    count: int = 0
    total_ms: float = 0.0
    dur_ms: Reservoir = field(default_factory=Reservoir)


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
    modes: dict[str, ModeSteps] = field(default_factory=dict)
    layers: dict[int, LayerSummary] = field(default_factory=dict)
    ops: dict[str, list[float]] = field(default_factory=dict)  # name -> [self_ms total, calls, flops]
    op_shapes: dict[str, str] = field(default_factory=dict)  # name -> input shapes of its hottest profile row
    op_windows: int = 0
    tokens: int = 0
    samples: int = 0
    busy_ms: float = 0.0
    cuda_peak: int | None = None
    rss_peak: int | None = None
    rss_first: int | None = None
    rss_last: int | None = None
    device_mem_peak: int | None = None
    losses: list[float] = field(default_factory=list)  # first and last few, for the report
    first_loss: float | None = None
    last_loss: float | None = None
    min_loss: float | None = None
    loss_count: int = 0
    nonfinite_losses: int = 0
    # FLOPs: forward FLOPs per call of each module (latest signature), and per-step totals of the roots
    module_flops: dict[int, float] = field(default_factory=dict)
    roots: set[int] = field(default_factory=set)
    step_modes: dict[int, str] = field(default_factory=dict)  # mode of the recent steps, for their tables
    peak_flops: float | None = None
    flops_device: str = ""
    # spans, loading and tokenization
    spans: dict[tuple[str, str], SpanSummary] = field(default_factory=dict)
    loads: list[dict[str, Any]] = field(default_factory=list)
    tok_calls: int = 0
    tok_texts: int = 0
    tok_tokens: int = 0
    tok_pads: int = 0
    tok_pads_known: bool = False
    tok_truncated: int = 0
    tok_truncation_known: bool = False
    tok_ms: float = 0.0
    # inference
    requests: int = 0
    sequences: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    generate_ms: float = 0.0
    ttft_ms: Reservoir = field(default_factory=Reservoir)
    per_token_ms: Reservoir = field(default_factory=Reservoir)
    kv_bytes: int | None = None
    pipelines: dict[str, list[float]] = field(default_factory=dict)  # name -> [calls, items, ms]
    # the agent's own cost
    overhead_us: Reservoir = field(default_factory=Reservoir)
    overhead_total_us: float = 0.0
    layer_every: int | None = None
    agent_cpu_max: float | None = None
    dropped: int = 0
    flops_failed: bool = False
    evaluations: Reservoir = field(default_factory=Reservoir)  # Trainer.evaluate spans, ms
    end: End | None = None
    model: SessionModel = field(default_factory=SessionModel)

    # -- derived

    def phase_shares(self) -> dict[str, float]:
        total = sum(self.phase_totals.values())
        return {k: v / total for k, v in self.phase_totals.items()} if total > 0 else {}

    def layer_by_path(self) -> dict[str, LayerSummary]:
        return {la.name: la for la in self.layers.values()}

    def top_layers(self, n: int = TOP) -> list[LayerSummary]:
        """Leaf modules by median self time (forward + backward)."""
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

    def main_mode(self) -> str | None:
        """The run's own steps: training when there are training steps, else inference."""
        if "train" in self.modes:
            return "train"
        return max(self.modes, key=lambda m: self.modes[m].count) if self.modes else None

    def eval_steps(self) -> ModeSteps | None:
        """Inference steps inside a training run (an evaluation loop), kept apart from training."""
        if self.main_mode() != "train":
            return None
        others = [m for m in self.modes if m != "train"]
        return self.modes[others[0]] if others else None

    def flops_figures(self) -> tuple[dict[str, float | None], dict[str, str]]:
        """Step FLOPs, achieved FLOP/s and MFU, each None with a reason when it cannot be told."""
        out: dict[str, float | None] = {"step_flops": None, "achieved_flop_per_s": None,
                                        "peak_flop_per_s": _positive(self.peak_flops), "mfu_pct": None}
        why: dict[str, str] = {}
        mode = self.modes.get(self.main_mode() or "")
        step_ms = mode.step_ms.median() if mode else None
        flops = _positive(mode.flops.median()) if mode else None
        if flops is None:
            if self.module_flops:
                reason = "no layer timing of a step whose FLOPs are known"
            elif (self.session.options or {}).get("flops") is False:
                reason = "FLOP counting was off in the agent"
            elif self.flops_failed:
                reason = "FLOP counting failed (see diagnoses)"
            else:
                reason = "the agent counted no FLOPs for this run's models"
            why.update(step_flops=reason, achieved_flop_per_s=reason, mfu_pct=reason)
            return out, why
        out["step_flops"] = flops
        if not step_ms or step_ms <= 0:
            why.update(achieved_flop_per_s="no step time", mfu_pct="no step time")
            return out, why
        achieved = flops / (step_ms / 1000.0)
        out["achieved_flop_per_s"] = achieved
        peak = out["peak_flop_per_s"]
        if peak is None:
            why["mfu_pct"] = f"no peak FLOP/s known for {self.flops_device or 'this device'}"
            why["peak_flop_per_s"] = why["mfu_pct"]
        elif achieved > peak:
            # Above the peak is impossible: the FLOP count or the peak is wrong, so neither the rate
            # nor the MFU is shown (the count itself stays: it is what the agent counted).
            out["achieved_flop_per_s"] = None
            why["mfu_pct"] = "above 100 % of the peak: the FLOP count or the peak is wrong"
            why["achieved_flop_per_s"] = why["mfu_pct"]
        else:
            out["mfu_pct"] = 100.0 * achieved / peak
        return out, why

    def padding_share(self) -> float | None:
        if not self.tok_pads_known or self.tok_tokens <= 0 or not 0 <= self.tok_pads <= self.tok_tokens:
            return None
        return self.tok_pads / self.tok_tokens

    def overhead_share(self) -> float | None:
        """The agent's own time as a share of the steps' time (0..1)."""
        if self.busy_ms <= 0 or not self.overhead_us.n:
            return None
        share = self.overhead_total_us / 1000.0 / self.busy_ms
        return share if 0 <= share <= 1 else None

    def traceback_tail(self, lines: int = TRACEBACK_LINES) -> list[str]:
        tb = self.end.traceback if self.end is not None else None
        if not tb:
            return []
        return [line for line in tb.rstrip().splitlines() if line.strip()][-lines:]

    def crashed(self) -> bool:
        e = self.end
        return e is not None and (e.reason == "exception" or bool(e.signal) or bool(e.traceback)
                                  or (e.exit_code is not None and e.exit_code != 0))

    def ranks(self) -> dict[str, int] | None:
        """Rank and world size when the run was one rank of several (from the launcher's environment)."""
        opts = self.session.options or {}
        world = opts.get("world_size")
        if not isinstance(world, int) or world < 2:
            return None
        rank = opts.get("rank")
        return {"rank": rank if isinstance(rank, int) else None, "world_size": world}

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
        """Every figure as a number whose unit is in its key (docs/REPORT.md, docs/report.schema.json)."""
        s = self.session
        main = self.modes.get(self.main_mode() or "")
        flops, flops_why = self.flops_figures()
        missing: dict[str, str] = dict(flops_why)
        steps: dict[str, Any] = {
            "mode": self.main_mode(), "count": self.steps, "first": self.first_step, "last": self.last_step,
            "step_p50_ms": main.step_ms.median() if main else None,
            "step_p95_ms": main.step_ms.quantile(0.95) if main else None,
            "step_max_ms": main.step_ms.max if main else None,
            "step_mean_ms": main.step_ms.mean if main else None,
            **flops,
        }
        ev = self.eval_steps()
        eval_json: dict[str, Any] | None = None
        if ev is not None:
            eval_json = {"source": "steps", "count": ev.count, "total_ms": ev.step_ms.total,
                         "p50_ms": ev.step_ms.median(), "p95_ms": ev.step_ms.quantile(0.95),
                         "max_ms": ev.step_ms.max, "phases": _phases_json(ev)}
        elif self.evaluations.n:
            r = self.evaluations
            eval_json = {"source": "evaluate spans", "count": r.n, "total_ms": r.total, "p50_ms": r.median(),
                         "p95_ms": r.quantile(0.95), "max_ms": r.max, "phases": []}
        pad = self.padding_share()
        if self.tok_calls and pad is None:
            missing["padding_share_pct"] = "the tokenizer calls did not return an attention mask"
        tokens = {
            "step_tokens": self.tokens, "samples": self.samples, "tokens_per_s": self.tokens_per_s(),
            "tokenized_tokens": self.tok_tokens if self.tok_calls else None,
            "pad_tokens": self.tok_pads if self.tok_pads_known else None,
            "real_tokens": self.tok_tokens - self.tok_pads if pad is not None else None,
            "padding_share_pct": pad * 100.0 if pad is not None else None,
            "prefill_tokens": self.prefill_tokens if self.requests else None,
            "decode_tokens": self.decode_tokens if self.requests else None,
        }
        ttft_p50, tok_p50 = self.ttft_ms.median(), self.per_token_ms.median()
        inference = None if not self.requests and not self.pipelines else {
            "requests": self.requests, "sequences": self.sequences,
            "ttft_p50_ms": ttft_p50, "ttft_p95_ms": self.ttft_ms.quantile(0.95),
            "per_token_p50_ms": tok_p50, "per_token_p95_ms": self.per_token_ms.quantile(0.95),
            "kv_cache_bytes": self.kv_bytes,
            "decode_tokens_per_s": (self.decode_tokens / (self.generate_ms / 1000.0)
                                    if self.decode_tokens and self.generate_ms > 0 else None),
            "pipelines": [{"name": n, "calls": int(v[0]), "items": int(v[1]), "total_ms": v[2],
                           "items_per_s": v[1] / (v[2] / 1000.0) if v[2] > 0 and v[1] else None}
                          for n, v in sorted(self.pipelines.items())],
        }
        if self.requests and self.kv_bytes is None:
            missing["kv_cache_bytes"] = "generate returned no cache the agent could measure"
        share = self.overhead_share()
        hosts = self.model.host
        out = {
            "schema_version": SCHEMA_VERSION,
            "file": self.path,
            "run": {"argv": list(s.argv), "cwd": s.cwd, "pid": s.pid, "hostname": s.hostname,
                    "python": s.python, "torch": s.torch, "transformers": s.transformers,
                    "devices": list(s.devices), "started_unix_s": s.started or None,
                    "duration_s": self.duration_s, "warning": self.warning},
            "exit": {"text": self.exit_text(), "exit_code": self.end.exit_code if self.end else None,
                     "signal": self.end.signal if self.end else None,
                     "reason": self.end.reason if self.end else None,
                     "crashed": self.crashed(), "traceback_tail": self.traceback_tail()},
            "steps": steps,
            "phases": _phases_json(main) if main else [],
            "eval": eval_json,
            "loss": {"count": self.loss_count, "first": _finite(self.first_loss), "last": _finite(self.last_loss),
                     "min": _finite(self.min_loss), "nonfinite_steps": self.nonfinite_losses},
            "tokens": tokens,
            "top_layers": [{"path": la.name, "class": la.cls, "self_ms": la.self_ms(),
                            "fwd_p50_ms": la.fwd.median(), "bwd_p50_ms": la.bwd.median(), "calls": la.calls}
                           for la in self.top_layers()],
            "ops": {"profiles": self.op_windows,
                    "top": [{"name": n, "self_ms": ms, "calls": c, "shapes": self.op_shapes.get(n, "")}
                            for n, ms, c in self.top_ops()]},
            "memory": {"cuda_peak_bytes": self.cuda_peak, "device_used_peak_bytes": self.device_mem_peak,
                       "rss_peak_bytes": self.rss_peak, "rss_first_bytes": self.rss_first,
                       "rss_last_bytes": self.rss_last},
            "spans": {
                "loading": [dict(ld) for ld in self.loads],
                "tokenization": None if not self.tok_calls else {
                    "calls": self.tok_calls, "texts": self.tok_texts, "tokens": self.tok_tokens,
                    "total_ms": self.tok_ms, "padding_share_pct": tokens["padding_share_pct"],
                    "truncated_texts": self.tok_truncated if self.tok_truncation_known else None},
                "by_name": [{"category": sp.category, "name": sp.name, "count": sp.count,
                             "total_ms": sp.total_ms, "p50_ms": sp.dur_ms.median(),
                             "p95_ms": sp.dur_ms.quantile(0.95)} for sp in self.span_rows()],
            },
            "inference": inference,
            "ranks": self.ranks(),
            "diagnoses": [{"severity": sev, "text": text} for sev, text in self.diagnoses()],
            "agent": {"overhead_share_pct": share * 100.0 if share is not None else None,
                      "overhead_per_step_p50_us": self.overhead_us.median(),
                      "overhead_total_ms": self.overhead_total_us / 1000.0 if self.overhead_us.n else None,
                      "cpu_peak_pct": self.agent_cpu_max, "dropped_events": self.dropped,
                      "layer_every": self.layer_every, "host_samples": len(hosts)},
            "missing": missing,
        }
        return _clean_json(out)

    def span_rows(self) -> list[SpanSummary]:
        """Spans by category, then by total time."""
        return sorted(self.spans.values(), key=lambda sp: (sp.category, -sp.total_ms, sp.name))


def _phases_json(mode: ModeSteps) -> list[dict[str, Any]]:
    shares = mode.phase_shares()
    ordered = [p for p in PHASES if p in shares] + [p for p in shares if p not in PHASES]
    return [{"name": p, "share_pct": shares[p] * 100.0, "p50_ms": mode.phases[p].median()} for p in ordered]


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _positive(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) and v > 0 else None


def _clean_json(value: Any) -> Any:
    """No NaN or infinity in the JSON (they are not JSON): such a figure is unknown, so null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    return value


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
            out.step_modes[event.step] = event.mode or "train"
            for table in merger.ready(event.step):
                _layers(out, table)
            # A step's tables come with it or a tick or two after: the modes of older steps go.
            for done in [k for k in out.step_modes if k < event.step - MODE_MEMORY]:
                del out.step_modes[done]
        elif isinstance(event, LayerStats) and event.step % every == 0:
            merger.add(event)
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
        elif isinstance(event, Stats):
            if event.agent_cpu_pct is not None and math.isfinite(event.agent_cpu_pct):
                out.agent_cpu_max = max(out.agent_cpu_max or 0.0, event.agent_cpu_pct)
            out.dropped = max(out.dropped, event.dropped)
    for table in merger.ready():
        _layers(out, table)
    out.end = model.end
    return out


def _step(out: RunSummary, e: Step) -> None:
    if e.mode == "eval":  # an evaluation inside training: shown apart, never a training step
        out.modes.setdefault("eval", ModeSteps()).add(e)
        return
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


def _tree(out: RunSummary, e: ModelTree) -> None:
    parents = set(e.parents)
    known = set(e.ids)
    for i, mid in enumerate(e.ids):
        if mid not in out.layers or out.layers[mid].path != e.paths[i]:
            out.layers[mid] = LayerSummary(id=mid, path=e.paths[i], cls=e.classes[i], leaf=mid not in parents)
        if e.parents[i] not in known:
            out.roots.add(mid)


def _layers(out: RunSummary, e: LayerStats) -> None:
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
    mode = out.modes.get(out.step_modes.get(e.step, ""))
    if step_flops > 0 and mode is not None:  # FLOPs count per mode: a generate after training is not a step
        mode.flops.add(step_flops)


def _ops(out: RunSummary, e: Ops) -> None:
    out.op_windows += 1
    best: dict[str, float] = {}
    for i, name in enumerate(e.names):
        row = out.ops.setdefault(name, [0.0, 0.0, 0.0])
        ms = e.self_ms[i] if i < len(e.self_ms) else 0.0
        row[0] += ms
        row[1] += e.calls[i] if i < len(e.calls) else 0
        row[2] += e.flops[i] if i < len(e.flops) else 0.0
        if i < len(e.shapes) and e.shapes[i] and ms > best.get(name, -1.0):
            best[name] = ms
            out.op_shapes[name] = e.shapes[i]


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


def _ms(value: float | None, digits: int = 1) -> str:
    """Milliseconds with their unit (fmt.ms writes 10 s and more as seconds, with its own unit)."""
    text = fmt.ms(value, digits)
    return text if text == fmt.DASH or text.endswith("s") else f"{text} ms"


def _plural(n: float, word: str) -> str:
    return f"{n:.0f} {word}" + ("" if round(n) == 1 else "s")


def _kv(pairs: list[tuple[str, str]]) -> str:
    return "   ".join(f"{k} {v}" for k, v in pairs)


def render(s: RunSummary, color: bool = False) -> str:
    """The summary as text, one section per dashboard view that has data, in the dashboard's order.
    ``color``: bold section titles and red/yellow severities (only for a terminal that wants them)."""
    lines: list[str] = []

    def title(text: str, *sgr: str) -> str:
        return paint(text, *(sgr or (BOLD,)), on=color)

    sess = s.session
    tb = s.traceback_tail()
    if tb and s.crashed():
        lines.append(title("CRASHED: the script's traceback ends with", BOLD, RED))
        lines += [f"  {line}" for line in tb]
        lines.append("")
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
    ranks = s.ranks()
    if ranks:
        lines.append(f"  rank {ranks['rank'] if ranks['rank'] is not None else '?'} of {ranks['world_size']}")

    main_name = s.main_mode()
    main = s.modes.get(main_name or "")
    if main is not None:
        r = main.step_ms
        lines.append(title(f"\nsteps ({main_name}, {main.count})"))
        lines.append("  " + _kv([("p50", _ms(r.median())), ("p95", _ms(r.quantile(0.95))),
                                 ("max", _ms(r.max))]))
        figures, why = s.flops_figures()
        flop_line = [("FLOPs/step", fmt.flops(figures["step_flops"])),
                     ("achieved", fmt.rate(figures["achieved_flop_per_s"], "FLOP/s")
                      if figures["achieved_flop_per_s"] else fmt.DASH),
                     ("MFU", f"{figures['mfu_pct']:.1f}%" if figures["mfu_pct"] is not None else fmt.DASH)]
        lines.append("  " + _kv(flop_line))
        reasons = sorted(set(why.values()))
        if reasons:
            lines.append(f"  (— : {'; '.join(reasons)})")
        _phase_lines(lines, "phases", main)
    ev = s.eval_steps()
    if ev is not None:
        lines.append(f"\neval steps ({ev.count})  p50 {_ms(ev.step_ms.median())}   "
                     f"p95 {_ms(ev.step_ms.quantile(0.95))}   max {_ms(ev.step_ms.max)}")
        _phase_lines(lines, "eval phases", ev)
    elif s.evaluations.n:
        r = s.evaluations
        lines.append(f"\neval (evaluate calls, {r.n})  total {_ms(r.total)}   p50 {_ms(r.median())}   "
                     f"max {_ms(r.max)}")
    if s.loss_count or s.nonfinite_losses:
        loss = [("first", fmt.value(s.first_loss)), ("last", fmt.value(s.last_loss)), ("min", fmt.value(s.min_loss))]
        if s.nonfinite_losses:
            loss.append(("non-finite steps", str(s.nonfinite_losses)))
        lines.append("\nloss       " + _kv(loss))
    tok: list[tuple[str, str]] = []
    if s.tokens:
        tok += [("in steps", fmt.count(s.tokens)), ("rate", fmt.rate(s.tokens_per_s(), " tok/s"))]
    pad = s.padding_share()
    if s.tok_calls:
        tok.append(("tokenized", fmt.count(s.tok_tokens)))
        if pad is not None:
            tok += [("real", fmt.count(s.tok_tokens - s.tok_pads)), ("padding", fmt.count(s.tok_pads)),
                    ("padding share", fmt.pct(pad))]
    if s.requests:
        tok += [("prefill", fmt.count(s.prefill_tokens)), ("decode", fmt.count(s.decode_tokens))]
    if tok:
        lines.append("tokens     " + _kv(tok))

    top = s.top_layers()
    if top:
        lines.append(title("\ntop layers (self time per step, p50 fwd + p50 bwd)"))
        for la in top:
            lines.append(f"  {fmt.ms(la.self_ms(), 2):>9} ms  {la.name}  ({la.cls})")
    ops = s.top_ops(5)
    if ops:
        lines.append(title(f"\ntop ops (per profiled step, {_plural(s.op_windows, 'profile')})"))
        for name, ms, calls in ops:
            shapes = s.op_shapes.get(name)
            lines.append(f"  {fmt.ms(ms, 2):>9} ms  {name}  x{calls:.0f}" + (f"  [{shapes}]" if shapes else ""))
    mem = []
    if s.cuda_peak:
        mem.append(("CUDA peak", fmt.nbytes(s.cuda_peak)))
    if s.device_mem_peak:
        mem.append(("device used peak", fmt.nbytes(s.device_mem_peak)))
    if s.rss_peak:
        mem.append(("RSS peak", fmt.nbytes(s.rss_peak)))
        if s.rss_first is not None and s.rss_last is not None:
            mem.append(("RSS first→last", f"{fmt.nbytes(s.rss_first)} → {fmt.nbytes(s.rss_last)}"))
    if mem:
        lines.append("\nmemory     " + _kv(mem))

    if s.spans:
        lines.append(title("\nspans"))
        for ld in s.loads:
            extra = [_ms(ld['load_ms'])]
            if ld.get("params"):
                extra.append(f"{fmt.count(ld['params'])} params")
            if ld.get("dtype"):
                extra.append(str(ld["dtype"]))
            if ld.get("error"):
                extra.append(f"failed: {ld['error']}")
            lines.append(f"  loading      {ld['what']} {ld['name']}: {', '.join(extra)}")
        if s.tok_calls:
            t = [_plural(s.tok_calls, "call"), f"{fmt.count(s.tok_texts)} texts", f"{fmt.count(s.tok_tokens)} tokens",
                 _ms(s.tok_ms)]
            t.append(f"padding {fmt.pct(pad)}" if pad is not None else "padding — (no attention mask)")
            if s.tok_truncation_known:
                t.append(f"{s.tok_truncated} truncated")
            lines.append(f"  tokenization {', '.join(t)}")
        rows = s.span_rows()
        width = min(40, max(len(f"{sp.category}/{sp.name}") for sp in rows))
        for sp in rows[:SPAN_ROWS]:
            label = f"{sp.category}/{sp.name}"
            lines.append(f"  {label[:width]:<{width}}  x{sp.count:<5} total {_ms(sp.total_ms):>10}"
                         f"   p50 {_ms(sp.dur_ms.median()):>10}   p95 {_ms(sp.dur_ms.quantile(0.95)):>10}")
        if len(rows) > SPAN_ROWS:
            lines.append(f"  … {len(rows) - SPAN_ROWS} more (--json has them all)")

    if s.requests or s.pipelines:
        lines.append(title("\ninference"))
        if s.requests:
            lines.append(f"  {_plural(s.requests, 'request')} ({_plural(s.sequences, 'sequence')})   "
                         + _kv([("TTFT p50", _ms(s.ttft_ms.median())),
                                ("p95", _ms(s.ttft_ms.quantile(0.95)))]))
            lines.append("  " + _kv([("per token p50", _ms(s.per_token_ms.median(), 2)),
                                     ("p95", _ms(s.per_token_ms.quantile(0.95), 2)),
                                     ("KV cache", fmt.nbytes(s.kv_bytes) if s.kv_bytes is not None
                                      else "— (no cache measured)")]))
        for name, (calls, items, ms) in sorted(s.pipelines.items()):
            rate = fmt.rate(items / (ms / 1000.0), " items/s") if ms > 0 and items else fmt.DASH
            lines.append(f"  {name}: {_plural(calls, 'call')}, {_plural(items, 'item')}, {rate}")

    diags = s.diagnoses()
    if diags:
        lines.append(title("\ndiagnoses"))
        for sev, text in diags[:8]:
            lines.append(f"  {paint(f'[{sev}]', *SEVERITY_SGR.get(sev, ()), on=color)} {text}")

    share = s.overhead_share()
    agent = []
    if share is not None:
        agent += [("overhead", f"{share * 100:.1f}% of step time"),
                  ("per step p50", f"{s.overhead_us.median():.0f} µs")]
    if s.agent_cpu_max is not None:
        agent.append(("agent CPU peak", f"{s.agent_cpu_max:.0f} %"))
    if s.dropped:
        agent.append(("dropped events", str(s.dropped)))
    if s.layer_every and s.layer_every > 1:
        agent.append(("layers timed", f"every {s.layer_every} steps"))
    if agent:
        lines.append("\nagent      " + _kv(agent))
    return "\n".join(lines)


def _phase_lines(lines: list[str], label: str, mode: ModeSteps) -> None:
    shares = mode.phase_shares()
    if not shares:
        return
    # A phase that never took time (no backward in inference) says nothing: left out of the line.
    ordered = [p for p in PHASES if shares.get(p)] + [p for p in shares if p not in PHASES and shares[p]]
    lines.append(f"  {label}: " + "   ".join(
        f"{p} {shares[p] * 100:.0f}% ({_ms(mode.phases[p].median())})" for p in ordered))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a recording")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    return read_recordings("report", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    summary = open_summary(args.file)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2, allow_nan=False))
    else:
        print(render(summary, color=textstyle.wanted(sys.stdout)))
    return 0
