"""The overhead budget: how often per-layer timing may run so the agent stays within its share.

Pure bookkeeping, fed once per step by the layers instrument (no torch, no clocks).

What a step costs the run is split in two:

- the *fixed* cost every step pays: the step tracker's hooks, the root-call hooks of unsampled
  steps, the agent thread's CPU time per step; it cannot be sampled away;
- the *extra* cost of a sampled step (timing around every module call, autograd node hooks).

The extra cost is known two ways, and the larger one is trusted: the calibrated per-call estimate,
and a control measurement: the median duration of recent sampled steps minus that of recent
unsampled ones (the unsampled steps are the control group; at a rate of 1 one step in
``CONTROL_EVERY`` stays unsampled to keep that group). The control catches what the estimate
misses (torch's hook dispatch, cache effects, models unlike the calibration model); the estimate
covers the start of a run, before both groups have enough steps.

Sampling aims at ``AIM`` (half) of the budget: the budget is a ceiling that must hold although the
costs the rate is computed from are noisy (a control group of steps whose durations vary by a few
per cent), and on long steps, where the fixed cost is small, that keeps the agent near 1 %. Per-layer
timing then gets what is left of that aim after the fixed cost and a reserve for the op profile
windows, but never less than ``LAYER_FLOOR`` of it; when the fixed cost leaves it only that floor
(millisecond steps), it still runs ``MIN_TABLES_PER_S`` times a second if that alone fits the whole
budget (a tiny share of the run, and the Layers view stays live).

Freshness floor: whatever the rate, a step is sampled once ``FRESH_S`` (5 s) of wall time have
passed since the last sampled one began (``sampled`` is given the clock of the step end where it
decides), so the newest layer table is never more than about 5 s plus one step old. The floor comes
on top of the budget: the budget sets the step-count rate, the floor only adds a sampled step when
that rate would leave a longer gap (e.g. "every 574 steps" in a 71-step run). Its cost is at most
one sampled step's extra per 5 s; on steps longer than 5 s every step is sampled, where the
per-module hook cost is a small share of such a step. It applies to the automatic rate only (a fixed
``--layer-every`` is the user's choice).
"""

from __future__ import annotations

import math
from collections import deque

MAX_EVERY = 1000
AIM = 0.5  # share of the budget the sampling rate aims at (the budget itself is the ceiling)
OPS_RESERVE = 0.25  # share of the budget op profile windows may use (agent/instruments/ops.py); layers leave
# that share of their aim free
LAYER_FLOOR = 0.1  # share of the aim per-layer timing always gets
MIN_TABLES_PER_S = 2.0  # sampled steps a second when layers are down to their floor and that fits
WINDOW = 15  # recent steps per group
UPDATE_EVERY = 8  # steps between rate updates (and at every sampled step): this runs on the hot path
MIN_CONTROL = 3  # steps needed in each group before the control measurement counts
CONTROL_EVERY = 8  # at a rate of 1, one step in this many still runs unsampled (the control group)
FRESH_S = 5.0  # a sampled step at least this often (wall time), whatever the rate
_FRESH_NS = int(FRESH_S * 1e9)


def _median(values: deque[int]) -> int:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2


class Budget:
    """Recent step durations and costs of one layers instrument, and the sampling rate they allow."""

    def __init__(self, budget_pct: float, window: int = WINDOW) -> None:
        self.share = max(budget_pct, 0.01) / 100.0
        self.unsampled_ns: deque[int] = deque(maxlen=window)  # step durations, control group
        self.sampled_ns: deque[int] = deque(maxlen=window)  # step durations, per-layer timing on
        self.fixed_ns: deque[int] = deque(maxlen=window)  # fixed cost of each step
        self.estimate_ns: deque[int] = deque(maxlen=window)  # calibrated extra cost of sampled steps
        self.every = 1
        self._since = 0  # steps observed since the last update
        self._last_sampled_ns = 0  # clock (perf_counter_ns) where the last sampled step was chosen

    def observe(self, step_ns: int, fixed_ns: int, sampled: bool, estimate_ns: int = 0) -> None:
        """One finished step: its duration, its fixed cost and, if sampled, the estimated extra."""
        if step_ns <= 0:
            return
        self._since += 1
        self.fixed_ns.append(max(0, fixed_ns))
        if sampled:
            self.sampled_ns.append(step_ns)
            self.estimate_ns.append(max(0, estimate_ns))
        else:
            self.unsampled_ns.append(step_ns)

    def control_ns(self) -> int:
        """Median sampled step minus median unsampled step (0 until both groups have enough)."""
        if len(self.sampled_ns) < MIN_CONTROL or len(self.unsampled_ns) < MIN_CONTROL:
            return 0
        return max(0, int(_median(self.sampled_ns) - _median(self.unsampled_ns)))

    def extra_ns(self) -> int:
        """What a sampled step costs on top of an unsampled one: the larger of both measures."""
        estimate = int(_median(self.estimate_ns)) if self.estimate_ns else 0
        return max(estimate, self.control_ns())

    def base_ns(self) -> int:
        """The step without the agent's extra cost: the control group, else sampled minus extra."""
        if self.unsampled_ns:
            return int(_median(self.unsampled_ns))
        if self.sampled_ns:
            return max(1, int(_median(self.sampled_ns)) - self.extra_ns())
        return 0

    def sampled(self, step: int, now_ns: int = 0) -> bool:
        """Does per-layer timing run on step ``step`` (at the rate in force, or by the freshness floor
        when ``now_ns``, the clock where the previous step ended, is ``FRESH_S`` past the last one)?"""
        if self.every == 1:
            hit = step % CONTROL_EVERY != CONTROL_EVERY - 1
        else:
            hit = step % self.every == 0
        if now_ns:
            if not self._last_sampled_ns:
                self._last_sampled_ns = now_ns
            elif not hit and now_ns - self._last_sampled_ns >= _FRESH_NS:
                hit = True
            if hit:
                self._last_sampled_ns = now_ns
        return hit

    def due(self, sampled: bool) -> bool:
        """Is a rate update due after this step? At sampled steps (new figures) and now and then."""
        return sampled or self._since >= UPDATE_EVERY

    def update(self) -> int:
        """The sampling rate to use from now on (1: every step)."""
        self._since = 0
        base = self.base_ns()
        extra = self.extra_ns()
        if base <= 0 or extra <= 0:
            return self.every
        allowed = self.share * AIM * base
        fixed = _median(self.fixed_ns) if self.fixed_ns else 0
        left = allowed * (1.0 - OPS_RESERVE) - fixed
        floor = allowed * LAYER_FLOOR
        every = min(MAX_EVERY, max(1, math.ceil(extra / max(left, floor, 1.0))))
        if left <= floor and extra * MIN_TABLES_PER_S <= self.share * 1e9:
            # the fixed cost leaves layers their floor, but a few tables a second fit the budget
            every = min(every, max(1, int(1e9 / MIN_TABLES_PER_S / base)))
        self.every = every
        return every
