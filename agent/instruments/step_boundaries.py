"""Where a step ends: the step tracker's boundary decisions and the step end itself.

``StepBoundaries`` is a mixin of ``StepInstrument`` (agent/instruments/steps.py): its state lives
in the instrument's ``_reset_state``. An inference step held until it is known not to be training
(``tentative``), the end of a ``generate`` call, the first training step, an evaluation between
training steps, the boundaries of a loop with no optimizer (held for HOLD iterations), the flush at
exit and ``llmtop.agent.step()``; ``_end_step`` (hot path) notes the finished step for ``poll`` and
starts the next.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from llmtop.agent.instruments.gpu_timing import cuda_ready
from llmtop.agent.instruments.memory import NONE3
from llmtop.agent.instruments.step_records import BWD, DATA, NPH, OPT
from llmtop.agent.runtime import core

# Iterations with a backward and no optimizer held back before the loop counts as optimizer-free
# (until then they could be gradient accumulation's micro-batches, one step once the optimizer runs)
HOLD = 16

_perf = time.perf_counter_ns
_ident = threading.get_ident


def _lr_value(lr: Any) -> float | None:
    """The learning rate as a float: a number, or a CPU tensor (capturable schedules; a host read)."""
    if isinstance(lr, (int, float)):
        return float(lr)
    if getattr(lr, "device", None) is not None and lr.device.type == "cpu":
        return float(lr)
    return None


class StepBoundaries:
    """Step ends: tentative, eval, optimizer-free loops, flush, manual steps (mixin)."""

    def _commit_tentative(self) -> None:
        t1, acc, samples, tokens, hs, ht = self.tentative  # type: ignore[misc]
        self.tentative = None
        after = [a - b for a, b in zip(self.acc, acc, strict=True)]
        s2, t2 = self.samples - samples, self.tokens - tokens
        self.acc = acc
        self.samples, self.tokens, self.have_samples, self.have_tokens = samples, tokens, hs, ht
        self._end_step(t1, "infer", None)
        self.acc = after
        self.samples, self.tokens = s2, t2
        self.have_samples, self.have_tokens = s2 > 0, t2 > 0

    def _on_generate_end(self, t_end: int) -> None:
        """The outermost ``generate`` call returned (HF integration, on the bus): its step ends now,
        not when something else starts."""
        if self.disabled or self.tentative is None or self.manual or _ident() != self.owner:
            return
        try:
            self.tentative = (max(t_end, self.tentative[0]),) + self.tentative[1:]
            self._commit_tentative()
        except Exception as exc:
            self._fail("generate end", exc)

    def _training_begins(self) -> None:
        """The first backward or optimizer step: earlier steps were inference. When they were
        evaluation before training (no-grad forwards), training steps still count from 0, so step
        N is the loop's iteration N; the viewer files the earlier inference records as evaluation."""
        self.training = True
        if not self.train_steps and self.step and not self.manual:
            self.step = 0
            try:
                self.ctx.current_step = 0
            except Exception:
                pass

    def _end_eval(self, t: int) -> None:
        """Training resumes at ``t``: the window since the last step end was an evaluation. A batch
        fetched after its last forward belongs to the training step that starts (its data time
        moves there)."""
        self.in_eval = self.eval_pending = False
        fetch, self.eval_fetch = self.eval_fetch, None
        carry = 0
        if fetch is not None and fetch[0] >= self.eval_fwd_end:
            t, carry = fetch
            self.acc[DATA] -= carry
        self._end_step(t, "eval", None)
        self.acc[DATA] += carry

    def _loop_boundary(self, t: int) -> None:
        """No optimizer seen: an iteration ends where the next one starts (its batch fetch or the
        trained model's next grad-enabled forward) after a backward. Until HOLD such iterations
        passed without an optimizer they could be micro-batches, so their boundaries are held."""
        self.loop_bwd = False
        if self.manual or self.opt_steps:
            return
        if self.no_opt:
            self._end_step(t, "train", None)
            return
        self.held.append((t, list(self.acc), self.samples, self.tokens, len(self.losses)))
        if len(self.held) >= HOLD:
            self._commit_held()

    def _commit_held(self) -> None:
        """Turn the held loop boundaries into steps (their phases, samples and losses split)."""
        held, self.held = self.held, []
        self.no_opt = True
        acc, samples, tokens, losses = self.acc, self.samples, self.tokens, self.losses
        pa, ps, pt, pl = [0] * NPH, 0, 0, 0
        for t, a, s, k, nl in held:
            self.acc = [x - y for x, y in zip(a, pa, strict=True)]
            self.samples, self.tokens = s - ps, k - pt
            self.have_samples, self.have_tokens = self.samples > 0, self.tokens > 0
            self.losses = losses[pl:nl]
            self._end_step(t, "train", None)
            pa, ps, pt, pl = a, s, k, nl
        self.acc = [x - y for x, y in zip(acc, pa, strict=True)]
        self.samples, self.tokens = samples - ps, tokens - pt
        self.have_samples, self.have_tokens = self.samples > 0, self.tokens > 0
        self.losses = losses[pl:]

    def flush(self) -> None:
        """The script is ending: what is still open becomes a step (a generate call, an inference
        forward with grad on, an optimizer-free loop's last iteration). Step loop thread, or at exit."""
        if self.manual or self.disabled:
            return
        self.flushed = True
        if self.in_eval:
            self._end_eval(_perf())
        if self.tentative is not None:
            self._commit_tentative()
        if self.held:
            self._commit_held()
        if self.no_opt and self.loop_bwd and self.bwd_end:
            self.loop_bwd = False
            self._end_step(self.bwd_end, "train", None)

    # --- manual steps ------------------------------------------------------------------------

    def manual_step(self) -> None:
        """``llmtop.agent.step()``: from now on only manual calls end steps."""
        if self.disabled:
            return
        t1 = _perf()
        try:
            self.manual = True
            self.tentative = None
            if self.owner is None:
                self.owner = _ident()
            if self.win_start is None:
                # the first manual call with no activity seen: it opens the first step
                self.win_start = t1
                self.gpu.restart()
                return
            self._end_step(t1, "train" if self.training_in_step() else "infer", None)
        except Exception as exc:
            self._fail("manual step", exc)

    def training_in_step(self) -> bool:
        return self.acc[BWD] > 0 or self.acc[OPT] > 0 or bool(self.losses)

    # --- step end (hot path) ---------------------------------------------------------------------

    def _end_step(self, t_end: int, mode: str, optimizer: Any, listener: bool = False) -> None:
        """``listener``: called from a root-forward listener, whose time the layers instrument
        charges already (the root-call hooks on the bus are timed there, once).

        Hot path: it notes what the step was and starts the next; ``poll`` does the rest."""
        t_in = _perf()
        step = self.step
        evaluation = mode == "eval"  # numbered as the training step it precedes; not a step itself
        start = self.win_start
        dur = t_end - start if start is not None and t_end > start else 0
        lr = None
        if optimizer is not None:
            try:
                lr = optimizer.param_groups[0]["lr"]
                if lr.__class__ is not float:
                    lr = _lr_value(lr)  # read now: a tensor may change in place with the schedule
            except Exception:
                lr = None
        mem = NONE3
        if cuda_ready():
            self.h2d_armed = True
            mem = self.memory.at_step_end(dur)
            if evaluation:
                self.gpu.restart()  # its device time is not the training step's of that number
            else:
                self.gpu.end_step(step)
        acc, losses, grad = self.acc, self.losses, self.grad
        samples = self.samples if self.have_samples else None
        tokens = self.tokens if self.have_tokens else None
        # the next step starts now; the stack keeps frames still open (a wrapper optimizer)
        self.acc = [0] * NPH
        self.win_start = t_end
        self.losses = []
        self.grad = None
        self.samples = self.tokens = 0
        self.have_samples = self.have_tokens = False
        self.sample_module = None
        if self.gen_tokens is not None:  # a generate() call's step: its prefill and decode tokens
            split = self._gen_split
            if len(split) > 4096:  # steps folded while the agent thread was behind never claim theirs
                split.clear()
            split[t_end] = (self.gen_tokens[0], self.gen_tokens[1])
            self.gen_tokens = None
        if self.opts_seen:
            self.opts_seen = set()
        self.trained = False
        costs = core.BUS.costs
        every = costs.every  # the rate the ending step ran under (step-end listeners may change it)
        if evaluation:
            own = self.overhead + _perf() - t_in
            listeners = core.BUS.eval_end
        else:
            self.step = step + 1
            if mode == "train":
                self.train_steps += 1
            try:
                self.ctx.current_step = step + 1
            except Exception:
                pass
            own = self.overhead + (0 if listener else _perf() - t_in)
            costs.tracker_ns = own  # a fixed cost for the layers instrument's budget
            listeners = core.BUS.step_end
        self.overhead = 0
        for fn in listeners:
            try:
                fn(step, t_end)
            except Exception:
                pass
        # the layers instrument's share of the cost is added by poll (it accounts for it there)
        done = self._done
        if len(done) < self.done_max or evaluation:  # (an evaluation is never folded into steps)
            done.append((step, t_end, dur, acc, mode, losses, grad, lr, samples, tokens, mem, every, own))
            return
        # the agent thread is far behind: fold into running totals (no record lost, no loss read)
        f = self._folded
        self._folded_mode = mode
        f[0] += 1
        f[1] = step
        f[2] = t_end
        f[3] += dur
        for i in range(NPH):
            f[4 + i] += acc[i]
        f[9] += samples or 0
        f[10] += tokens or 0
        f[11] += own
