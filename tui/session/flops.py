"""The session's FLOP figures and their FLOP/s joins: per-layer FLOPs and bytes per call (``LayerFlops``),
and the FLOPs of exactly the calls one timed step ran (``StepFlops``), set on each ``Layer`` so its FLOP/s
divides them by that same step's forward time; the whole step's achieved FLOP/s and MFU. ``FlopsJoins`` is
a mixin of ``SessionModel``: its state (``step_flops``, ``peak_flops``…) is declared in
``SessionModel.reset``. No Textual here.

Joins are by step number, which is unique within one numbering: the agent counts steps from 0 again
once, when training follows inference records (an evaluation before training, or ``generate`` calls),
and sends nothing of the earlier numbering after that. So the first ``LayerStats`` or ``StepFlops``
whose number is not above the last one's starts a new numbering, and the per-step figures of the
earlier one are forgotten (``numbering_restarts``): a training step never pairs with an evaluation's.
"""

from __future__ import annotations

from llmtop.protocol.events import LayerFlops, StepFlops


class FlopsJoins:
    """``SessionModel``'s FLOPs ingest and the FLOP/s read from it."""

    def _flops(self, e: LayerFlops) -> None:
        self.flops_signature = e.signature
        self.flops_device = e.device
        self.flops_method = e.method
        self.peak_source = e.peak_source  # measured / env / cpu-features / datasheet
        self.peak_flops = e.peak_flops
        self.peak_bw = e.peak_bw
        cols = self.columns
        for i, mid in enumerate(e.ids):
            layer = self.layers.get(mid)
            if layer is None:
                continue
            s = layer._s
            cols.flops[s] = e.flops[i]
            cols.bytes[s] = e.bytes[i] if i < len(e.bytes) else None
            cols.peak_flops[s] = e.peak_flops
            cols.peak_bw[s] = e.peak_bw

    def numbering_restarts(self) -> None:
        """The agent counts steps from 0 again: forget every figure keyed by the earlier numbers
        (timed steps and per-step FLOPs); the layer tables' means and history stay."""
        self._forget_step_flops()
        self.layers_step = None
        self.columns.timed_from = self.columns.seq + 1  # the tables before are no longer "timed"

    def _forget_step_flops(self) -> None:
        self.step_flops.clear()
        self.last_step_flops = None
        cols = self.columns
        n = len(cols.ids)
        cols.step_flops, cols.step_bytes, cols.step_flops_step = [None] * n, [None] * n, [None] * n
        cols.step_flops_note = [""] * n

    def _step_flops(self, e: StepFlops) -> None:
        """Per-module FLOPs of one timed step's calls: the layers' FLOP/s divide them by the same
        step's forward times. A root whose timed calls differ from the calls summed gets no figure."""
        if self.last_step_flops is not None and e.step <= self.last_step_flops.step:
            self._forget_step_flops()  # a new numbering (the layer tables saw it first, or had none)
        self.step_flops.append(e)
        self.last_step_flops = e
        if e.peak_flops:
            self.peak_flops = e.peak_flops
        mismatch = ""
        for rid, n in zip(e.roots, e.root_calls, strict=False):
            root = self.layers.get(rid)
            timed = root._timed_at(e.step) if root is not None else None
            if timed is not None and timed[2] != n:
                mismatch = f"step {e.step}: {timed[2]} calls timed, {n} counted"
        cols = self.columns
        n = len(e.ids)
        pos, every = cols.slots_of(e.ids, self.layers)
        note = mismatch or e.note
        if every and len(e.flops) == n:  # every module, in slot order: whole lists
            cols.step_flops = list(e.flops)
            cols.step_bytes = list(e.bytes[:n]) + [None] * (n - len(e.bytes))
            cols.step_flops_step = [e.step] * n
            cols.step_flops_note = [note] * n
            if e.peak_flops:
                cols.peak_flops = [e.peak_flops] * n
        else:
            sfs = cols.step_flops_step
            for s, at in enumerate(sfs):  # modules the step did not run keep no stale figure
                if at is not None and at < e.step:
                    cols.step_flops[s] = cols.step_bytes[s] = None
                    sfs[s] = e.step
                    cols.step_flops_note[s] = e.note
            for i, s in enumerate(pos):
                if s is None:
                    continue
                cols.step_flops[s] = e.flops[i]
                cols.step_bytes[s] = e.bytes[i] if i < len(e.bytes) else None
                sfs[s] = e.step
                cols.step_flops_note[s] = note
                if e.peak_flops:
                    cols.peak_flops[s] = e.peak_flops
        if not n and e.note:
            k = len(cols.ids)
            cols.step_flops, cols.step_bytes = [None] * k, [None] * k
            cols.step_flops_step, cols.step_flops_note = [e.step] * k, [e.note] * k

    @property
    def achieved_flops(self) -> float | None:
        """The newest sampled step's achieved FLOP/s (forward + backward FLOPs / step time)."""
        e = self.last_step_flops
        return e.achieved_flops if e is not None else None

    @property
    def mfu(self) -> float | None:
        """The newest sampled step's model FLOPs utilisation (achieved / device peak)."""
        e = self.last_step_flops
        return e.mfu if e is not None else None

    def recent_step_flops(self, window_s: float) -> list[StepFlops]:
        """StepFlops of the steps inside the last ``window_s`` seconds of data (for sparklines)."""
        steps = self.recent_steps(window_s)
        if not steps:
            return []
        first = steps[0].step
        return [e for e in self.step_flops if e.step >= first]
