"""What the views read from a ``SessionModel``: recent windows, rates, phase totals, exit text. A mixin
of ``SessionModel`` (its state is declared in ``SessionModel.reset``); call with the model's lock held."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from llmtop.protocol.events import PHASES, DeviceSample, Generation, HostSample, Step

if TYPE_CHECKING:
    from llmtop.tui.session.model import SpanStats


class SessionQueries:
    """Derived figures of ``SessionModel`` (see the module docstring)."""

    now: float
    steps: Any
    host: Any
    devices: Any
    generations: Any
    spans: Any
    decode_points: Any
    session: Any
    end: Any
    layers: Any
    logs: Any
    anomalies: Any

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


