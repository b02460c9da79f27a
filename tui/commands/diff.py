"""`llmtop diff A B [--fail-if-slower PCT]`: what got slower or faster from run A to run B.

Compares medians: step time, each phase, and each module's forward and backward time matched by
module path. Exit status (for CI gates): 0 when nothing is slower beyond the rule, 1 when B is
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
from typing import Any

from llmtop.tui.commands.common import read_recordings
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
    a = open_summary(args.a)
    b = open_summary(args.b)
    step, phases, layers = compare(a, b)
    pct = args.fail_if_slower
    regressions = [d for d in ([step] if step else []) + layers if pct is not None and d.slower(pct)]
    if args.json:
        print(json.dumps({"a": a.path, "b": b.path, "step": step.to_json() if step else None,
                          "phases": [d.to_json() for d in phases], "layers": [d.to_json() for d in layers],
                          "fail_if_slower": pct, "regressions": [d.to_json() for d in regressions]},
                         indent=2))
    else:
        print(render(a, b, step, phases, layers, pct))
        if pct is not None:
            if regressions:
                worst = max(regressions, key=lambda d: d.pct)
                print(f"FAIL: {len(regressions)} slower by more than {pct:g}% beyond noise; worst "
                      f"{worst.what} {worst.name} {worst.pct:+.1f}%")
            else:
                print(f"OK: nothing slower by more than {pct:g}% beyond noise")
    return 1 if regressions else 0
