"""Anomaly detection over the stream of step records: pure, small and deterministic.

Each detector is fed one value at a time and returns the ``Anomaly`` events it raises. A detector
fires once per episode: it stays quiet while the same condition goes on and re-arms only after
the signal is back to normal, so a run that stays NaN produces one event, not one per step.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from llmtop.protocol.events import Anomaly, Step

MAD_SCALE = 1.4826  # MAD → standard deviation for normally distributed data
# The agent thread feeds every step (hundreds a second on short steps): a baseline is recomputed
# after this many new values, and always before an anomaly is raised, rather than on every value.
REFRESH = 8


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    mid = n // 2
    return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2


def robust_level(history: list[float]) -> tuple[float, float]:
    """(median, scale): the history's level and its robust standard deviation."""
    med = median(history)
    mad = median([abs(v - med) for v in history]) * MAD_SCALE
    # a flat history has MAD 0; fall back to a small share of the level so tiny jitter is no spike
    return med, max(mad, abs(med) * 0.01, 1e-12)


def robust_z(value: float, history: list[float]) -> tuple[float, float]:
    """(z, median): how many robust standard deviations ``value`` lies above the history's median."""
    med, scale = robust_level(history)
    return (value - med) / scale, med


def linear_slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, r²) of ys over xs."""
    n = len(xs)
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    if sxx == 0:
        return 0.0, 0.0
    slope = sxy / sxx
    r2 = (sxy * sxy) / (sxx * syy) if syy > 0 else 0.0
    return slope, r2


def fmt_bytes(n: float) -> str:
    sign = "-" if n < 0 else "+"
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} GiB"


def fmt_ms(ms: float) -> str:
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.1f} ms"


class NonFinite:
    """Fires when a signal becomes NaN or infinite; re-arms after a finite value."""

    def __init__(self, what: str = "nan_loss", label: str = "loss") -> None:
        self.what = what
        self.label = label
        self.active = False

    def feed(self, step: int, t: float, value: float | None) -> list[Anomaly]:
        if value is None:
            return []
        if math.isfinite(value):
            self.active = False
            return []
        if self.active:
            return []
        self.active = True
        kind = "NaN" if math.isnan(value) else ("+inf" if value > 0 else "-inf")
        return [Anomaly(t=t, what=self.what, message=f"{self.label} is {kind} since step {step}",
                        step=step, severity="error")]


class Spike:
    """Fires when a value jumps far above its recent robust level (median + k·MAD, and a ratio)."""

    def __init__(self, what: str, label: str, window: int = 50, min_history: int = 20,
                 z: float = 8.0, ratio: float = 1.5) -> None:
        self.what = what
        self.label = label
        self.history: deque[float] = deque(maxlen=window)
        self.min_history = min_history
        self.z = z
        self.ratio = ratio
        self.active = False
        self._base: tuple[float, float] | None = None  # (median, scale) of the history
        self._since = 0  # values added since the baseline was computed

    def _spiking(self, value: float, fresh: bool) -> tuple[bool, float]:
        if fresh or self._base is None or self._since >= REFRESH:
            self._base = robust_level(list(self.history))
            self._since = 0
        med, scale = self._base
        z = (value - med) / scale
        return (z > self.z and value > med * self.ratio if med > 0 else z > self.z), med

    def feed(self, step: int, t: float, value: float | None) -> list[Anomaly]:
        if value is None or not math.isfinite(value):
            return []
        out: list[Anomaly] = []
        if len(self.history) >= self.min_history:
            spiking, med = self._spiking(value, fresh=False)
            if spiking or self.active:  # a verdict that changes the state is taken on fresh figures
                spiking, med = self._spiking(value, fresh=True)
            if spiking and not self.active:
                out.append(Anomaly(t=t, what=self.what, step=step,
                                   message=f"{self.label} spike at step {step}: {value:.4g} "
                                           f"(recent median {med:.4g})"))
            self.active = spiking
            if spiking:
                return out  # keep spikes out of the baseline
        self.history.append(value)
        self._since += 1
        return out


class SlowStep:
    """Fires when a step takes far longer than the recent median (``factor``×, at least ``min_ms`` more)."""

    def __init__(self, window: int = 50, min_history: int = 10, factor: float = 3.0,
                 min_ms: float = 10.0, warmup: int = 3) -> None:
        self.warmup = warmup  # the first steps (allocation, compilation, caches) are slow by nature
        self.history: deque[float] = deque(maxlen=window)
        self.min_history = min_history
        self.factor = factor
        self.min_ms = min_ms
        self.active = False
        self._med: float | None = None  # the history's median, recomputed every REFRESH values
        self._since = 0

    def _slow(self, dur_ms: float, fresh: bool) -> tuple[bool, float]:
        if fresh or self._med is None or self._since >= REFRESH:
            self._med = median(list(self.history))
            self._since = 0
        med = self._med
        return dur_ms > med * self.factor and dur_ms - med >= self.min_ms, med

    def feed(self, step: int, t: float, dur_ms: float) -> list[Anomaly]:
        out: list[Anomaly] = []
        if self.warmup > 0:
            self.warmup -= 1
            return out
        if len(self.history) >= self.min_history:
            slow, med = self._slow(dur_ms, fresh=False)
            if slow or self.active:  # a verdict that changes the state is taken on fresh figures
                slow, med = self._slow(dur_ms, fresh=True)
            if slow and not self.active:
                ratio = dur_ms / med if med > 0 else float("inf")
                out.append(Anomaly(t=t, what="slow_step", step=step, severity="info",
                                   message=f"slow step {step}: {fmt_ms(dur_ms)}, {ratio:.1f}× the "
                                           f"recent median ({fmt_ms(med)})"))
            self.active = slow
            if slow:
                return out
        self.history.append(dur_ms)
        self._since += 1
        return out


class Creep:
    """Steady memory growth: over the last ``window`` samples a linear fit rises steadily (r² ≥
    ``min_r2``) by at least ``min_growth`` bytes and is still rising in the window's last quarter.
    Fires once, then re-arms once the condition has cleared.
    """

    def __init__(self, label: str, window: int = 400, min_samples: int = 50,
                 min_growth: float = 256 * 2**20, min_r2: float = 0.8) -> None:
        self.label = label
        self.xs: deque[float] = deque(maxlen=window)
        self.ys: deque[float] = deque(maxlen=window)
        self.min_samples = min_samples
        self.min_growth = min_growth
        self.min_r2 = min_r2
        self.active = False

    def feed(self, step: int, t: float, value: int | None) -> list[Anomaly]:
        if value is None:
            return []
        if self.xs and step <= self.xs[-1]:
            # several samples for one step (ticks without steps): keep the latest
            self.ys[-1] = value
            return []
        self.xs.append(step)
        self.ys.append(value)
        if len(self.xs) < self.min_samples:
            return []
        xs, ys = list(self.xs), list(self.ys)
        slope, r2 = linear_slope(xs, ys)
        span = xs[-1] - xs[0]
        growth = slope * span
        q = max(1, len(ys) // 4)
        # still rising at the end of the window: a one-off jump (optimizer state, warm-up caches)
        # fits a line too, but its last quarter is flat
        late = sum(ys[-q:]) / q - sum(ys[-2 * q:-q]) / q
        creeping = (slope > 0 and r2 >= self.min_r2 and growth >= self.min_growth
                    and late >= growth / 16)
        out: list[Anomaly] = []
        if creeping and not self.active:
            steps = int(span)
            out.append(Anomaly(t=t, what="memory_creep", step=step,
                               message=f"memory creep ({self.label}): {fmt_bytes(growth)} over "
                                       f"{steps} steps"))
        self.active = creeping
        return out


@dataclass
class AnomalyDetector:
    """All step-level detectors together; ``feed_step`` per emitted step, ``feed_memory`` per sample."""

    def __post_init__(self) -> None:
        self.nan_loss = NonFinite("nan_loss", "loss")
        self.nan_grad = NonFinite("nan_loss", "gradient norm")
        self.loss_spike = Spike("loss_spike", "loss")
        self.grad_spike = Spike("grad_spike", "gradient norm")
        self.slow = SlowStep()
        self.creep: dict[str, Creep] = {}

    def feed_step(self, s: Step) -> list[Anomaly]:
        out = self.nan_loss.feed(s.step, s.t, s.loss)
        out += self.loss_spike.feed(s.step, s.t, s.loss)
        out += self.nan_grad.feed(s.step, s.t, s.grad_norm)
        out += self.grad_spike.feed(s.step, s.t, s.grad_norm)
        out += self.slow.feed(s.step, s.t, s.dur_ms)
        if s.cuda_allocated is not None:
            out += self.feed_memory("CUDA allocated", s.step, s.t, s.cuda_allocated)
        return out

    def feed_memory(self, label: str, step: int, t: float, value: int | None) -> list[Anomaly]:
        det = self.creep.get(label)
        if det is None:
            det = self.creep[label] = Creep(label)
        return det.feed(step, t, value)
