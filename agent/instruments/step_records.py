"""Plain data of the step tracker (agent/instruments/steps.py): its phases, the frames of its
exclusive-time stack and the finished steps that ``poll`` completes.

The phase indices count into the step loop's accumulators (``acc``) in the protocol's order;
``_Frame`` is one open phase on the step loop's thread; ``_Raw`` is a finished step as the hot
path queued it, completed into a ``Step`` on the agent thread.
"""

from __future__ import annotations

import time

from llmtop.protocol.events import PHASES

DATA, H2D, FWD, BWD, OPT = range(5)
PHASE_NAMES = PHASES[: PHASES.index("other")]  # the measured ones, in the protocol's order; "other" is the rest
NPH = 5


class _Frame:
    __slots__ = ("phase", "t0", "child")

    def __init__(self, phase: int, t0: int) -> None:
        self.phase = phase
        self.t0 = t0
        self.child = 0


class _Raw:
    """A finished step, completed into a ``Step`` by ``poll`` (agent thread)."""

    __slots__ = ("step", "t_end", "dur", "phases", "mode", "losses", "grad", "lr", "samples", "tokens",
                 "overhead_ns", "layer_every", "mem", "gpu_ms", "loss_value", "grad_value", "born", "merged",
                 "micro")

    def __init__(self, captured: tuple) -> None:
        """``captured``: the tuple ``_end_step`` queues (one tuple is the cheapest thing to build
        on the hot path)."""
        (self.step, self.t_end, self.dur, self.phases, self.mode, self.losses, self.grad, self.lr,
         self.samples, self.tokens, self.mem, self.layer_every, self.overhead_ns) = captured
        self.gpu_ms: float | None = None
        self.loss_value: float | None = None
        self.grad_value: float | None = None
        self.born = time.monotonic()
        self.merged = 1  # steps this record stands for (>1: folded while the agent thread was behind)
        self.micro = len(self.losses) if self.losses else 0
