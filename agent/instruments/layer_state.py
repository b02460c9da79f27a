"""Per-step accumulators and per-call records of the layers instrument (plain data, hot path).

``_Acc`` holds one step's per-module sums, indexed by global module id; ``_ThreadState`` is one
thread's stack of open module calls; ``_Rec`` is one module call's backward bookkeeping, referenced
only by the autograd nodes it is hooked on, so it dies with the graph.
"""

from __future__ import annotations

from typing import Any


class _Acc:
    """One step's per-module accumulators, indexed by global module id."""

    __slots__ = ("fwd", "fwd_self", "calls", "bwd", "bwd_self", "act", "bwd_seen")

    def __init__(self, n: int) -> None:
        self.fwd = [0] * n
        self.fwd_self = [0] * n
        self.calls = [0] * n
        self.bwd = [0] * n
        self.bwd_self = [0] * n
        self.act = [0] * n
        self.bwd_seen = False

    def grow(self, n: int) -> None:
        extra = n - len(self.fwd)
        if extra > 0:
            for arr in (self.fwd, self.fwd_self, self.calls, self.bwd, self.bwd_self, self.act):
                arr.extend([0] * extra)


class _ThreadState:
    __slots__ = ("stack", "mute", "hold", "gen")

    def __init__(self, gen: int) -> None:
        self.stack: list[list[Any]] = []  # frames: [gid, t0, child_ns, mem0, rec, module]
        self.mute = 0  # >0 inside a forward re-run by autograd (activation checkpointing)
        self.hold = 0  # LayersInstrument.muted() depth on this thread
        self.gen = gen


class _Rec:
    """One module call's backward bookkeeping; referenced only by its autograd hooks."""

    __slots__ = ("gid", "parent", "seq", "start", "end", "kid_start", "kid_end", "kids", "task", "params")

    def __init__(self, gid: int, parent: _Rec | None, seq: int) -> None:
        self.gid = gid
        self.parent = parent
        self.seq = seq
        self.task = -2  # start, end, kid_start, kid_end and kids are set when its backward starts
        self.params = False  # end also waits for this module's own parameter gradients

