"""Diagnoses: pure functions of a SessionModel that say in words what a person should look at.

Each rule returns zero or more ``Diagnosis`` (severity and one sentence). ``diagnose`` runs them all,
worst first. Call with the model's lock held (or on a model no thread is feeding).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from llmtop.tui.session import fmt
from llmtop.tui.session.model import SessionModel

INPUT_BOUND_SHARE = 0.20  # data wait above this share of the step is worth a sentence
CREEP_MIN_BYTES = 64 * 1024 * 1024
WARMUP_STEPS = 5
CREEP_MIN_STEPS = 20
CREEP_MIN_GROWTH = 0.05
SLOW_FACTOR = 2.0
OVERHEAD_NOTE_PCT = 5.0  # agent overhead above this is a warning rather than a note
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
CPU_WAIT_PCT = 20.0  # the main thread waiting for a CPU this share of the time is worth a sentence
CPU_WAIT_SAMPLES = 3


@dataclass(frozen=True)
class Diagnosis:
    severity: str  # error | warning | info
    text: str
    what: str = ""  # a stable id for tests and filters


def input_bound(model: SessionModel, window_s: float) -> list[Diagnosis]:
    totals = model.phase_totals(window_s)
    step_ms = sum(totals.values())
    if not step_ms:
        return []
    share = totals.get("data", 0.0) / step_ms
    if share < INPUT_BOUND_SHARE:
        return []
    return [Diagnosis("warning", f"input-bound: data wait is {share * 100:.0f} % of the step", "input_bound")]


def cpu_starved(model: SessionModel, window_s: float) -> list[Diagnosis]:
    """The script's main thread ready to run but waiting for a CPU (``HostSample.runq_pct``): its
    cores are shared with other work, and every phase is slower for it."""
    waits = [h.runq_pct for h in model.recent_host(window_s)
             if h.runq_pct is not None and 0.0 <= h.runq_pct <= 100.0]  # a share of the time, never more
    if len(waits) < CPU_WAIT_SAMPLES:
        return []
    share = statistics.median(waits)
    if share < CPU_WAIT_PCT:
        return []
    return [Diagnosis("warning", f"CPU-starved: the script waited for a CPU {share:.0f} % of the time "
                      "(other work shares its cores)", "cpu_starved")]


def memory_creep(model: SessionModel, window_s: float) -> list[Diagnosis]:
    """Device memory (allocated, from steps) or else process RSS growing across the window."""
    recent = model.recent_steps(window_s)
    # start-up (model build, first allocations, warm-up steps) is growth, not creep
    warm = [s for s in recent if s.step > WARMUP_STEPS]
    steps = [s for s in warm if s.cuda_allocated is not None]
    if len(steps) >= CREEP_MIN_STEPS:
        k = max(3, len(steps) // 10)
        first = statistics.median(s.cuda_allocated or 0 for s in steps[:k])
        last = statistics.median(s.cuda_allocated or 0 for s in steps[-k:])
        n = steps[-1].step - steps[0].step
        return _creep(first, last, f"over {n} steps", "GPU memory")
    if not warm:
        return []
    host = [h for h in model.recent_host(window_s) if h.t >= warm[0].t]
    in_window = [s for s in model.steps if host and host[0].t <= s.t <= host[-1].t]
    # growth over a handful of slow steps is the run settling (optimizer state, caches), not creep
    if len(host) >= 20 and len(in_window) >= CREEP_MIN_STEPS:
        k = max(3, len(host) // 10)
        first = statistics.median(h.rss for h in host[:k])
        last = statistics.median(h.rss for h in host[-k:])
        return _creep(first, last, f"over {len(in_window)} steps", "RSS")
    return []


def _creep(first: float, last: float, span: str, what: str) -> list[Diagnosis]:
    growth = last - first
    if growth < CREEP_MIN_BYTES or growth < CREEP_MIN_GROWTH * max(first, 1):
        return []
    return [Diagnosis("warning", f"memory creep: +{fmt.nbytes(growth)} {what} {span}", "memory_creep")]


def nonfinite_loss(model: SessionModel, window_s: float) -> list[Diagnosis]:
    if model.nonfinite_since is None or model.last_step is None or model.last_step.loss is None:
        return []
    kind = "NaN" if math.isnan(model.last_step.loss) else "infinite"
    return [Diagnosis("error", f"loss is {kind} since step {model.nonfinite_since}", "nonfinite_loss")]


def agent_overhead(model: SessionModel, window_s: float) -> list[Diagnosis]:
    steps = model.recent_steps(window_s)
    busy_us = sum(s.dur_ms for s in steps) * 1000.0
    if not steps or busy_us <= 0:
        return []
    share = 100.0 * sum(s.overhead_us for s in steps) / busy_us
    every = steps[-1].layer_every
    sampled = f", layers timed every {every} steps" if every > 1 else ""
    severity = "warning" if share > OVERHEAD_NOTE_PCT else "info"
    return [Diagnosis(severity, f"agent overhead {share:.1f} %{sampled}", "agent_overhead")]


def slow_steps(model: SessionModel, window_s: float) -> list[Diagnosis]:
    steps = model.recent_steps(window_s)
    if len(steps) < 10:
        return []
    median = statistics.median(s.dur_ms for s in steps)
    slow = [s for s in steps if s.dur_ms > SLOW_FACTOR * median]
    if not slow:
        return []
    worst = max(slow, key=lambda s: s.dur_ms)
    return [Diagnosis(
        "warning",
        f"slow steps: {len(slow)} of the last {len(steps)} took over {SLOW_FACTOR:g}× the median "
        f"({fmt.ms(median)} ms); worst step {worst.step} at {fmt.ms(worst.dur_ms)} ms",
        "slow_steps",
    )]


def dropped_frames(model: SessionModel, window_s: float) -> list[Diagnosis]:
    if not model.dropped:
        return []
    return [Diagnosis("warning", f"viewer fell behind: {model.dropped} events dropped by the agent",
                      "dropped")]


def agent_reports(model: SessionModel, window_s: float) -> list[Diagnosis]:
    """Anomalies the agent detected and instruments it disabled, newest first, one per kind."""
    out: list[Diagnosis] = []
    seen: set[str] = set()
    for a in reversed(model.anomalies):
        if a.what in seen:
            continue
        seen.add(a.what)
        where = f" (step {a.step})" if a.step is not None and str(a.step) not in a.message else ""
        out.append(Diagnosis(a.severity if a.severity in SEVERITY_ORDER else "warning",
                             f"{a.message}{where}", a.what))
    for w in reversed(model.warnings):
        if w.source in seen:
            continue
        seen.add(w.source)
        out.append(Diagnosis("info", f"{w.source} disabled: {w.message}", "agent_warning"))
    return out


def script_end(model: SessionModel, window_s: float) -> list[Diagnosis]:
    end = model.end
    if end is None or model.exit_ok:
        return []
    last_line = (end.traceback or "").strip().splitlines()[-1:] or [""]
    detail = f": {last_line[0]}" if last_line[0] else ""
    return [Diagnosis("error", f"the script ended ({model.exit_text()}){detail}", "script_end")]


NO_STEP_S = 30.0  # host samples this long with no step: the hooks cannot see the loop


def no_steps_seen(model: SessionModel, window_s: float) -> list[Diagnosis]:
    if model.end is not None or not model.host:
        return []
    last = model.last_step.t if model.last_step is not None else None
    started = model.session.started if model.session is not None else 0.0
    since = last if last is not None else (started or model.host[0].t)
    quiet = model.host[-1].t - since
    if quiet < NO_STEP_S:
        return []
    what = "no step seen yet" if last is None else f"no step has ended for {quiet:.0f} s"
    return [Diagnosis(
        "info",
        f"{what}: steps end at optimizer.step(), a backward() or a model's forward; if your loop has "
        "none llmtop can see, call llmtop.agent.step() once per iteration",
        "no_steps",
    )]


def folded_steps(model: SessionModel, window_s: float) -> list[Diagnosis]:
    if not model.steps_folded:
        return []
    return [Diagnosis("info", f"{model.steps_folded} steps arrived folded into aggregate records (the agent's "
                      "thread fell behind a very fast loop): counts and times are exact, losses missing",
                      "folded_steps")]


RULES = (script_end, nonfinite_loss, input_bound, cpu_starved, memory_creep, slow_steps, dropped_frames, agent_reports, agent_overhead,
         no_steps_seen, folded_steps)


def diagnose(model: SessionModel, window_s: float = 120.0) -> list[Diagnosis]:
    out: list[Diagnosis] = []
    for rule in RULES:
        for d in rule(model, window_s):
            # the agent's own report of something a rule already said (e.g. nan_loss) is not repeated
            if d.what in ("nan_loss", "nonfinite_loss") and any(o.what == "nonfinite_loss" for o in out):
                continue
            out.append(d)
    out.sort(key=lambda d: SEVERITY_ORDER.get(d.severity, 3))
    return out
