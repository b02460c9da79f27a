"""The step tracker's agent-thread side: finished steps completed into ``Step`` events.

``StepCompletion`` is a mixin of ``StepInstrument`` (agent/instruments/steps.py): its state lives in
the instrument's ``__init__``. Every tick ``poll`` takes the steps the hot path queued (and those it
folded into running totals while the queue was full), resolves their loss, gradient norm and GPU
time without a sync (a step waits for values not ready yet; after 10 s, or when far behind, they
are given up on), and emits ``Step`` and ``Anomaly`` events.
"""

from __future__ import annotations

import time

from llmtop.agent.instruments.gpu_timing import cuda_ready
from llmtop.agent.instruments.memory import NONE3, host_rss
from llmtop.agent.instruments.step_records import PHASE_NAMES, _Raw
from llmtop.agent.runtime import core
from llmtop.protocol.events import Event, Step


class StepCompletion:
    """``poll`` and what it needs: folded runs, loss and gradient reads, the ``Step`` event (mixin)."""

    # --- agent thread ----------------------------------------------------------------------------

    def poll(self, now: float) -> list[Event]:
        events: list[Event] = []
        if not self.flushed and getattr(self.ctx, "stopping", False):
            try:  # the agent's last tick, the script done: what is still open is its last step
                self.flush()
            except Exception as exc:
                self._fail("flush", exc)
        costs = core.BUS.costs
        self.hook_ns = costs.hook_ns
        if not self.scalars.prepared and cuda_ready():
            self.scalars.prepare()
        gpu = self.gpu.resolve() if self.gpu.pending else {}
        done, waiting = self._done, self._waiting
        folded = self._take_folded()
        while done:
            captured = done.popleft()
            if folded is not None and captured[0] > folded.step:
                waiting.append(folded)  # in step order: the folded run came before this one
                folded = None
            waiting.append(_Raw(captured))
        if folded is not None:
            waiting.append(folded)
        n = 0
        while waiting:
            r = waiting[0]
            # far behind (values that never become ready): give up on them rather than grow
            if not self._complete(r, gpu, len(waiting) > self.done_max):
                break
            waiting.popleft()
            n += 1
            if n % core.YIELD_EVERY == 0:
                core.let_script_run()
            if costs.of_step is not None:
                try:
                    r.overhead_ns += int(costs.of_step(r.step))
                except Exception:
                    pass
            s = self._to_event(r)
            events.append(s)
            if r.mode != "eval" and r.merged == 1:  # an evaluation or a folded run is no step to judge
                events.extend(self.detector.feed_step(s))
        rss = host_rss()
        if rss is not None and self.step > 0:
            events.extend(self.detector.feed_memory("host RSS", self.step, now, rss))
        return events

    def _take_folded(self) -> _Raw | None:
        """The steps folded into running totals since the last poll, as one record (or None)."""
        f, seen = self._folded, self._folded_seen
        now = list(f)  # the hot path may add meanwhile: what it adds later is taken next time
        if now[0] == seen[0]:
            return None
        d = [a - b for a, b in zip(now, seen, strict=True)]
        self._folded_seen = now
        r = _Raw((now[1], now[2], d[3], d[4:9], self._folded_mode, [], None, None, d[9] or None, d[10] or None,
                  NONE3, 1, d[11]))
        r.merged = d[0]
        return r

    def _complete(self, r: _Raw, gpu: dict[int, float], stale: bool = False) -> bool:
        """Resolve what the GPU still owes this step; False while something is not ready yet."""
        if r.step in gpu:
            r.gpu_ms = gpu[r.step]
        stale = stale or time.monotonic() - r.born > 10.0  # give up on values that never become ready
        ready = True
        if r.losses:
            vals = []
            for h in r.losses:
                ok, v = self.scalars.read(h)
                if not ok:
                    ready = False
                    break
                if v is not None:
                    vals.append(v)
            if ready:
                # with gradient accumulation the step's loss is the sum of the micro-batch losses
                # that went into its gradient: the mean when the script divides each by the number
                # of micro-batches, and the figure transformers' Trainer logs when it does not
                r.loss_value = sum(vals) if vals else None
                r.losses = []
        if r.grad is not None:
            ok, v = self.scalars.read(r.grad)
            if ok:
                r.grad_value = v
                r.grad = None
            else:
                ready = False
        if not ready and stale:
            r.losses = []
            r.grad = None
            return True
        return ready

    def _to_event(self, r: _Raw) -> Step:
        dur_ms = r.dur / 1e6
        phases = [p / 1e6 for p in r.phases]
        measured = sum(phases)
        if measured > dur_ms > 0:
            # a frame opened before the window began (rare): scale so the parts still add up
            k = dur_ms / measured
            phases = [p * k for p in phases]
            measured = dur_ms
        ph = dict(zip(PHASE_NAMES, phases, strict=True))
        ph["other"] = max(0.0, dur_ms - measured)
        wall = self._wall0 + (r.t_end - self._pc0) / 1e9
        alloc, reserved, peak = r.mem
        comm = None
        comm_of = core.BUS.comm_of
        if comm_of is not None:
            try:
                comm = comm_of(r.step, r.mode, r.merged)
            except Exception:
                comm = None
        ev = Step(step=r.step, t=wall, dur_ms=dur_ms, mode=r.mode, phases=ph, loss=r.loss_value,
                  grad_norm=r.grad_value, lr=r.lr, samples=r.samples, tokens=r.tokens,
                  overhead_us=r.overhead_ns / 1e3, layer_every=r.layer_every,
                  cuda_allocated=alloc, cuda_reserved=reserved, cuda_peak=peak, gpu_ms=r.gpu_ms,
                  merged=r.merged, losses=r.micro,
                  comm_ms=comm[0] if comm else None, comm_calls=comm[1] if comm else 0,
                  comm_bytes=comm[2] if comm else 0)
        split = self._gen_split.pop(r.t_end, None)
        if split is not None and r.merged == 1:
            ev.prefill_tokens, ev.decode_tokens = split
        return ev
