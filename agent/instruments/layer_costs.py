"""What the layers instrument costs the run: step-end notes, accounting, sampling rate, calibration.

The hot path only notes each step's end (``_on_step_end``); the agent thread (or the step loop,
when the agent thread is behind) works out what each step cost (``_account``), feeds the budget
(agent/instruments/budget.py) and sets how often per-layer timing runs. ``_calibrate`` measures
once, at install, what the hooks cost on this machine.

``LayerCosts`` is a mixin of ``LayersInstrument`` (agent/instruments/layers.py): it reads the
instrument's state and calls its ``_timing_on``/``_timing_off``/``_fail``.
"""

from __future__ import annotations

import time
from typing import Any

from llmtop.agent.instruments.budget import MAX_EVERY
from llmtop.agent.instruments.layer_state import _Acc
from llmtop.agent.runtime import core
from llmtop.protocol.events import Event

# until calibrated: a root call of an unsampled step (agent/instruments/roots.py), torch calling a Python hook
_ROOT_CALL_NS = 8000
_HOOK_CALL_NS = 1500
_OWN_KEPT = 4096  # accounted steps' costs kept for the step tracker
_ACCOUNT_NS = 20_000_000  # the longest the sampling rate waits for the agent thread's accounting

# The instrument class: the calibration runs a private instance of it. layers.py binds it once the
# class exists (the class is built on LayerCosts, so this module cannot import it).
LayersInstrument: Any = None


class _NullContext:
    """Context for the private calibration instance: drops everything."""

    def __init__(self, options: core.Options) -> None:
        self.options = options
        self.current_step = 0

    def emit(self, event: Event) -> None:
        pass

    def warn(self, source: str, message: str) -> None:
        pass

    def set_manual_step(self, fn: Any) -> None:
        pass



class LayerCosts:
    """The layers instrument's cost accounting and sampling (mixin; state lives in its __init__)."""

    def overhead_ns_last_step(self) -> int:
        """The hooks' estimated cost in the last step accounted (agent thread, at each ``poll``)."""
        return self._overhead_last

    def step_overhead_ns(self, step: int) -> int:
        """Agent thread: the hooks' estimated cost in step ``step`` (0 if it was never noted)."""
        with self._account_lock:
            self._account()
            return self._own_by_step.pop(step, 0)
    # ----------------------------------------------------------------- steps and sampling

    def _on_eval_end(self, step: int, t_end_ns: int) -> None:
        """An evaluation between training steps ended (step tracker): its module times are no
        training step's, so a sampled step's table starts again."""
        if self._sampled and not self._dead:
            self._acc = _Acc(self._n)

    def _on_step_end(self, step: int, t_end_ns: int) -> None:
        """Hot path: note the step's costs for the agent thread; set the next step's sampling."""
        try:
            if self._dead:
                return
            rc = self._rc
            fired = self._param_fired
            sampled = self._sampled
            acc = None
            if sampled:
                acc, self._acc = self._acc, _Acc(self._n)
            marks = self._marks
            costs = core.BUS.costs
            marks.append((step, t_end_ns, acc, rc.calls, rc.listeners_ns, fired[0], costs.tracker_ns,
                          self._extra_ns))
            rc.calls = rc.listeners_ns = fired[0] = self._extra_ns = costs.tracker_ns = 0
            try:
                oldest = marks[0][1]
            except IndexError:  # the agent thread has just accounted for them all
                oldest = t_end_ns
            if t_end_ns - oldest >= _ACCOUNT_NS and self._account_lock.acquire(False):
                try:  # the agent thread is behind (between ticks, or busy): account here, in a batch
                    self._account()
                finally:
                    self._account_lock.release()
            nxt = step + 1
            sampled_next = self.budget.sampled(nxt, t_end_ns) if self._auto else nxt % self.current_every == 0
            if sampled_next != sampled:
                self._sampled = sampled_next
                core.BUS.detail = sampled_next
                if sampled_next:
                    self._acc = _Acc(self._n)
                    self._timing_on()
                else:
                    self._timing_off()
        except Exception as exc:
            self._fail("step end", exc)

    def _account(self) -> None:
        """Feed the budget the steps noted since the last call, work out what each cost, queue
        the sampled ones' tables and set the sampling rate the hot path follows. Called with
        ``_account_lock`` held: by the agent thread at each tick, or by the step loop once its
        oldest unaccounted step is ``_ACCOUNT_NS`` old. Done in batches because every line run
        right after torch has run costs several times more (cold caches) than in a loop."""
        marks = self._marks
        if not marks:
            return
        self._cuda = self._cuda or self._cuda_ready()
        own_by_step = self._own_by_step
        while marks:
            step, t_end_ns, acc, calls, shared, fired, tracker_ns, extra_ns = marks.popleft()
            self._steps_seen += 1
            step_ns = t_end_ns - self._last_end_ns if self._last_end_ns else 0
            self._last_end_ns = t_end_ns
            params = int(fired * self.hook_call_ns)  # torch calling the parameter hooks
            fixed = tracker_ns + self.agent_ns + shared  # shared: the root-call listeners, always paid
            if acc is not None:
                n_calls = sum(acc.calls)
                if n_calls or acc.bwd_seen:
                    self._ready.append((step, acc, self._cuda))
                estimate = int(n_calls * self.call_cost_ns) + extra_ns + params
                self.budget.observe(step_ns, fixed, True, estimate)
                own = shared + max(estimate, self.budget.control_ns())
            else:
                # root-call detection (agent/instruments/roots.py); parameter hooks exist only while timing is
                # on: a late backward of a sampled step
                roots = int(calls * self.root_call_ns)
                self.budget.observe(step_ns, fixed + roots + params, False)
                own = shared + roots + params
            self._overhead_last = own_by_step[step] = own + self.agent_ns
            if self._auto and self.budget.due(acc is not None):
                self.current_every = core.BUS.costs.every = self.budget.update()
        while len(own_by_step) > _OWN_KEPT:  # nobody asks when no step tracker runs
            del own_by_step[next(iter(own_by_step))]
        self._agent_share()

    def _agent_share(self) -> None:
        """The agent thread's CPU time per step since its previous tick (it counts per tick)."""
        cpu = getattr(self.ctx, "cpu_s", None)
        if not isinstance(cpu, float):
            return
        steps0, cpu0 = self._agent_mark
        if cpu != cpu0:
            n = self._steps_seen - steps0
            if n > 0:
                # smoothed over ticks: a one-off (a FLOP count, an op profile parsed) is spread out
                now = (cpu - cpu0) * 1e9 / n
                self.agent_ns = int(now if not self.agent_ns else 0.75 * self.agent_ns + 0.25 * now)
            self._agent_mark = (self._steps_seen, cpu)

    def _calibrate(self) -> tuple[float, float, float]:
        """What these hooks cost on this machine, in ns, from paired runs of a tiny model:
        (one module call on a sampled step, forward and backward; one root call on an unsampled
        step; torch calling one Python hook). CPU time of this thread, so other programs on the
        machine do not count; each side keeps its fastest run."""
        import torch

        probe = LayersInstrument(self.options, _private=True)
        # Built without drawing from the script's generator (skip_init), filled from a private one.
        gen = torch.Generator().manual_seed(0)
        skip = torch.nn.utils.skip_init
        model = torch.nn.Sequential(*[skip(torch.nn.Linear, 4, 4) for _ in range(16)])
        one = skip(torch.nn.Linear, 4, 4)
        with torch.no_grad():
            for p in [*model.parameters(), *one.parameters()]:
                p.uniform_(-0.5, 0.5, generator=gen)
        x = torch.empty(2, 4).uniform_(-1, 1, generator=gen).requires_grad_()
        reps, calls = 6, 17

        def run() -> int:
            t = time.thread_time_ns()
            for _ in range(reps):
                model(x).sum().backward()
            return time.thread_time_ns() - t

        def run_fwd() -> int:
            model(x)  # warm: the first call after a switch pays for it
            t = time.thread_time_ns()
            for _ in range(20):
                model(x)
            return time.thread_time_ns() - t

        def run_one() -> int:
            t = time.thread_time_ns()
            for _ in range(100):
                one(x)
            return time.thread_time_ns() - t

        def noop(module: Any, args: Any) -> None:
            pass

        base: list[int] = []
        sampled: list[int] = []
        fwd_base: list[int] = []
        unsampled: list[int] = []
        plain: list[int] = []
        hooked: list[int] = []
        ctx = _NullContext(self.options)
        try:
            run()
            for _ in range(3):  # interleaved, so that a slow spell hits every side
                base.append(run())
                fwd_base.append(run_fwd())
                probe.install(ctx)
                sampled.append(run())
                probe._auto, probe._sampled, probe.current_every = False, False, MAX_EVERY
                probe._timing_off()
                unsampled.append(run_fwd())
                probe.uninstall()
                probe._sampled = True
                plain.append(run_one())
                handle = self._nnm.register_module_forward_pre_hook(noop)
                try:
                    hooked.append(run_one())
                finally:
                    handle.remove()
        except Exception:
            return 3000.0, float(_ROOT_CALL_NS), float(_HOOK_CALL_NS)
        finally:
            probe.uninstall()
        per_call = (min(sampled) - min(base)) / (reps * calls)
        root = (min(unsampled) - min(fwd_base)) / 20
        hook = (min(hooked) - min(plain)) / 100
        return max(per_call, 500.0), max(root, 1000.0), max(hook, 300.0)
