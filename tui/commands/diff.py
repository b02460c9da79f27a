"""`llmtop diff A B [--fail-if-slower PCT]`: what got slower or faster from run A to run B.

Compares medians: step time, each phase, and each module's forward and backward time matched by
module path. Two jobs' recordings (``run.lrec`` or a rank file: every rank), or a job and one process:
the job's step time over every rank's steps, its tokens/s and stragglers, a row per rank (step and
collective times), then the lowest ranks in detail as above. Exit status (for CI gates): 0 when nothing is slower beyond the rule, 1 when B is
slower, 2 when a file cannot be read.

The rule, with ``--fail-if-slower PCT``: a quantity counts as slower when B's median exceeds A's
by more than PCT percent AND by more than the noise band, ``NOISE_Z`` combined standard errors of
the two medians (1.4826 × MAD × 1.25 / √n for each run), AND by more than ``MIN_DELTA_MS``.
Step time is always checked; a module is checked when its time is at least ``MIN_SHARE`` of A's
median step (so tiny modules whose times are mostly timer noise cannot fail a build).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtop.tui.commands.common import read_recordings
from llmtop.tui.commands.job_summary import JobSummary, is_job, open_job
from llmtop.tui.commands.summarize import open_summary
from llmtop.tui.commands.summary import Reservoir, RunSummary
from llmtop.tui.session import fmt

HELP = "Compare two recordings per phase and per layer; --fail-if-slower PCT exits 1 on a regression."
NOISE_Z = 3.0
MIN_DELTA_MS = 0.005
MIN_SHARE = 0.01
ROWS = 12


@dataclass
class Delta:
    what: str  # "step", "phase", "fwd", "bwd"
    name: str
    a_ms: float
    b_ms: float
    noise_ms: float

    @property
    def delta_ms(self) -> float:
        return self.b_ms - self.a_ms

    @property
    def pct(self) -> float:
        return 100.0 * self.delta_ms / self.a_ms if self.a_ms > 0 else (math.inf if self.delta_ms > 0 else 0.0)

    def slower(self, pct: float) -> bool:
        return self.pct > pct and self.delta_ms > max(self.noise_ms, MIN_DELTA_MS)

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "name": self.name, "a_ms": self.a_ms, "b_ms": self.b_ms,
                "delta_ms": self.delta_ms, "pct": self.pct if math.isfinite(self.pct) else None,
                "noise_ms": self.noise_ms}


def _stderr_of_median(r: Reservoir) -> float:
    mad = r.mad()
    if mad is None or not r.values:
        return 0.0
    return 1.4826 * mad * 1.2533 / math.sqrt(len(r.values))


def _delta(what: str, name: str, a: Reservoir, b: Reservoir) -> Delta | None:
    ma, mb = a.median(), b.median()
    if ma is None or mb is None:
        return None
    noise = NOISE_Z * math.hypot(_stderr_of_median(a), _stderr_of_median(b))
    return Delta(what, name, ma, mb, noise)


def compare(a: RunSummary, b: RunSummary) -> tuple[Delta | None, list[Delta], list[Delta]]:
    """(step time, phases, layers) deltas. Layers are matched by module path; only modules whose
    A-median is at least MIN_SHARE of the step are kept (all of them when there is no step time)."""
    step = _delta("step", "step time", a.step_ms, b.step_ms)
    phases = [d for name in a.phases if name in b.phases
              if (d := _delta("phase", name, a.phases[name], b.phases[name])) is not None]
    step_ms = a.step_ms.median() or 0.0
    bpaths = b.layer_by_path()
    layers: list[Delta] = []
    for path, la in a.layer_by_path().items():
        lb = bpaths.get(path)
        if lb is None:
            continue
        for what, ra, rb in (("fwd", la.fwd, lb.fwd), ("bwd", la.bwd, lb.bwd)):
            d = _delta(what, path, ra, rb)
            if d is not None and d.a_ms >= MIN_SHARE * step_ms:
                layers.append(d)
    layers.sort(key=lambda d: d.delta_ms, reverse=True)
    return step, phases, layers


def render(a: RunSummary, b: RunSummary, step: Delta | None, phases: list[Delta], layers: list[Delta],
           pct: float | None) -> str:
    def row(d: Delta) -> str:
        mark = "  SLOWER" if pct is not None and d.slower(pct) else ""
        p = f"{d.pct:+.1f}%" if math.isfinite(d.pct) else "new"
        label = f"{d.what} {d.name}" if d.what in ("fwd", "bwd") else d.name
        return (f"  {label[:48]:<48} {fmt.ms(d.a_ms, 3):>9} → {fmt.ms(d.b_ms, 3):>9} ms  {p:>8}"
                f"  (±{fmt.ms(d.noise_ms, 3)}){mark}")

    lines = [f"A: {a.path} ({a.steps} steps)", f"B: {b.path} ({b.steps} steps)"]
    if step is not None:
        lines.append("step (median)")
        lines.append(row(step))
    if phases:
        lines.append("phases (median ms)")
        lines += [row(d) for d in phases]
    if layers:
        shown = sorted((d for d in layers if d.delta_ms > 0), key=lambda d: d.pct, reverse=True)[:ROWS]
        faster = sorted((d for d in layers if d.delta_ms < 0), key=lambda d: d.delta_ms)[: max(0, ROWS // 2)]
        if shown:
            lines.append("layers slower in B (median ms, by module path)")
            lines += [row(d) for d in shown]
        if faster:
            lines.append("layers faster in B")
            lines += [row(d) for d in faster]
    elif not step:
        lines.append("nothing to compare: neither steps nor layer times in common")
    return "\n".join(lines)


@dataclass
class JobDiff:
    """Two jobs (or a job and one process, as a job of one rank): the job's step time over every rank's
    steps, tokens/s, and per rank its step and collective times."""

    a: JobSummary
    b: JobSummary
    step: Delta | None
    ranks: list[Delta]

    def to_json(self) -> dict[str, Any]:
        sa, sb = self.a.straggler(), self.b.straggler()
        return {"a_ranks": sorted(self.a.ranks), "b_ranks": sorted(self.b.ranks),
                "step": self.step.to_json() if self.step else None,
                "a_tokens_per_s": self.a.tokens_per_s(), "b_tokens_per_s": self.b.tokens_per_s(),
                "a_straggler": sa.text if sa else None, "b_straggler": sb.text if sb else None,
                "ranks": [d.to_json() for d in self.ranks]}


def _all_steps(job: JobSummary) -> Reservoir:
    out = Reservoir()
    for s in job.ranks.values():
        for v in s.step_ms.values:
            out.add(v)
    return out


def compare_jobs(a: JobSummary, b: JobSummary) -> JobDiff:
    ranks: list[Delta] = []
    for r in sorted(set(a.ranks) & set(b.ranks)):
        ra, rb = a.ranks[r], b.ranks[r]
        for what, name, x, y in (("rank", f"rank {r} step", ra.step_ms, rb.step_ms),
                                 ("rank", f"rank {r} collectives", ra.comm_ms, rb.comm_ms)):
            d = _delta(what, name, x, y)
            if d is not None:
                ranks.append(d)
    return JobDiff(a, b, _delta("step", "job step time (every rank)", _all_steps(a), _all_steps(b)), ranks)


def render_job(jd: JobDiff, pct: float | None) -> str:
    def row(d: Delta) -> str:
        mark = "  SLOWER" if pct is not None and d.slower(pct) else ""
        p = f"{d.pct:+.1f}%" if math.isfinite(d.pct) else "new"
        return (f"  {d.name[:48]:<48} {fmt.ms(d.a_ms, 3):>9} → {fmt.ms(d.b_ms, 3):>9} ms  {p:>8}"
                f"  (±{fmt.ms(d.noise_ms, 3)}){mark}")

    a, b = jd.a, jd.b
    lines = [f"job A: {len(a.ranks)} of {a.world_size} ranks   job B: {len(b.ranks)} of {b.world_size} ranks"]
    if jd.step is not None:
        lines.append(row(jd.step))
    lines.append(f"  {'job tokens/s':<48} {fmt.rate(a.tokens_per_s(), ''):>9} → {fmt.rate(b.tokens_per_s(), ''):>9}")
    if jd.ranks:
        lines.append("per rank (median ms)")
        lines += [row(d) for d in jd.ranks]
    for name, job in (("A", a), ("B", b)):
        s = job.straggler()
        lines.append(f"straggler in {name}: {s.text if s else 'none'}")
    return "\n".join(lines)


def _as_job(path: str) -> JobSummary:
    job = open_job(path)
    if job is not None:
        return job
    one = open_summary(path)
    rank = one.session.rank if one.session.rank is not None else 0
    job = JobSummary(path=path, files={rank: Path(path)}, ranks={rank: one}, world_size=one.session.world_size or 1)
    one.job = job
    return job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="the baseline recording")
    parser.add_argument("b", help="the recording to compare with it")
    parser.add_argument("--fail-if-slower", type=float, default=None, metavar="PCT",
                        help="exit 1 when B is slower than A by more than PCT %% (beyond noise) on step "
                             "time or on any module's forward/backward time")
    parser.add_argument("--json", action="store_true", help="print the deltas as JSON")


def run(args: argparse.Namespace) -> int:
    if args.fail_if_slower is not None and args.fail_if_slower < 0:
        print("llmtop diff: --fail-if-slower must be a percentage >= 0", file=sys.stderr)
        return 2
    return read_recordings("diff", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    jd: JobDiff | None = None
    if is_job(args.a) or is_job(args.b):
        # Jobs: the job's figures and a row per rank, then the lowest ranks compared in detail.
        jd = compare_jobs(_as_job(args.a), _as_job(args.b))
        a, b = jd.a.first, jd.b.first
    else:
        a = open_summary(args.a)
        b = open_summary(args.b)
    step, phases, layers = compare(a, b)
    pct = args.fail_if_slower
    checked = ([step] if step else []) + layers
    if jd is not None:
        checked += ([jd.step] if jd.step else []) + [d for d in jd.ranks if d.name.endswith(" step")]
    regressions = [d for d in checked if pct is not None and d.slower(pct)]
    if args.json:
        out = {"a": a.path, "b": b.path, "step": step.to_json() if step else None,
               "phases": [d.to_json() for d in phases], "layers": [d.to_json() for d in layers],
               "fail_if_slower": pct, "regressions": [d.to_json() for d in regressions]}
        if jd is not None:
            out["job"] = jd.to_json()
        print(json.dumps(out, indent=2))
    else:
        if jd is not None:
            print(render_job(jd, pct))
            print(f"\nrank {min(jd.a.ranks)} (A) against rank {min(jd.b.ranks)} (B) in detail")
        print(render(a, b, step, phases, layers, pct))
        if pct is not None:
            if regressions:
                worst = max(regressions, key=lambda d: d.pct)
                print(f"FAIL: {len(regressions)} slower by more than {pct:g}% beyond noise; worst "
                      f"{worst.what} {worst.name} {worst.pct:+.1f}%")
            else:
                print(f"OK: nothing slower by more than {pct:g}% beyond noise")
    return 1 if regressions else 0
