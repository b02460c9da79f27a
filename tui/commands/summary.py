"""A recording's run as bounded aggregates: the ``RunSummary`` that ``llmtop report`` prints.

``Reservoir`` keeps a seeded uniform sample of a series (an hour-long run costs the same memory as a
minute); ``LayerSummary``, ``ModeSteps`` and ``SpanSummary`` hold one module, one step mode and one span
name. ``RunSummary`` holds the whole run, the figures derived from it (top layers and ops, FLOPs and MFU,
exit, diagnoses) and its ``--json`` form (``to_json``, docs/REPORT.md). ``summarize.py`` fills it.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

from llmtop.protocol.events import PHASES, CollectiveWait, End, Session, Step
from llmtop.tui.session.model import SessionModel

RESERVOIR = 2048  # samples kept per module and series for medians
TOP = 8
SCHEMA_VERSION = 2  # of the --json object: docs/REPORT.md, docs/report.schema.json
TRACEBACK_LINES = 6  # of a crashed run's traceback, shown first


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
    # self time of every op of the profiled steps (Ops.total_ms), the base of the top ops' shares; windows
    # from agents that did not send it count their rows' sum instead (their shares are of the rows shown)
    op_total_ms: float = 0.0
    op_totals_missing: int = 0
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
    # torch.distributed: time blocked in collectives per step, and the agent's reports of long waits
    comm_ms: Reservoir = field(default_factory=Reservoir)
    comm_total_ms: float = 0.0
    comm_calls: int = 0
    comm_bytes: int = 0
    waits: list[CollectiveWait] = field(default_factory=list)
    job: Any = None  # the JobSummary (job_summary.py) this rank's summary belongs to, if any

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

    def top_ops(self, n: int = TOP) -> list[tuple[str, float, float, float | None]]:
        """(name, mean self ms per profiled step, calls per profiled step, share of the profiled steps'
        op time: every op of those steps, as the Ops view's % column)."""
        if not self.op_windows:
            return []
        total = self.op_total_ms if self.op_total_ms > 0 else None
        rows = [(name, v[0] / self.op_windows, v[1] / self.op_windows, v[0] / total if total else None)
                for name, v in self.ops.items()]
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

    def ranks(self) -> dict[str, Any] | None:
        """Rank and world size when the run was one rank of several (from the Session the agent sent),
        and, for a job's recording, every rank (``job_summary.JobSummary.to_json``)."""
        sess = self.session
        opts = sess.options or {}
        world = sess.world_size if sess.world_size is not None else opts.get("world_size")
        rank = sess.rank if sess.rank is not None else opts.get("rank")
        if self.job is not None:
            world = self.job.world_size
            rank = next((r for r, s in self.job.ranks.items() if s is self), rank)
        if not isinstance(world, int) or (world < 2 and self.job is None):
            return None
        out: dict[str, Any] = {"rank": rank if isinstance(rank, int) else None, "world_size": world,
                               "job": sess.job, "launcher": sess.launcher, "files": None, "per_rank": None,
                               "job_tokens_per_s": None, "job_step_p50_ms": None, "straggler": None,
                               "hangs": [], "died": [], "unrecorded": []}
        if self.job is not None:
            out.update(self.job.to_json())
        return out

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
                    "step_ms": self.op_total_ms / self.op_windows if self.op_windows else None,
                    "step_ms_source": ("rows" if self.op_totals_missing else "step") if self.op_windows else None,
                    "top": [{"name": n, "self_ms": ms, "calls": c, "shapes": self.op_shapes.get(n, ""),
                             "share_pct": share * 100.0 if share is not None else None}
                            for n, ms, c, share in self.top_ops()]},
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
