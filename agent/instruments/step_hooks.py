"""The step tracker's hooks: what it patches into torch and listens to on ``core.BUS``.

``StepHooks`` is a mixin of ``StepInstrument`` (agent/instruments/steps.py): its state lives in the
instrument's ``_reset_state``. The data loader's ``__next__``, ``Tensor.to``/``.cuda``,
``torch.autograd.backward``, ``clip_grad_norm_``, ``GradScaler`` and the global optimizer step hooks
time their phases on the exclusive-time stack and capture the loss and the gradient norm; the
root-forward listeners time forwards, count samples and tokens, and tell training, evaluation and
inference apart. Hot path: timestamps and integer adds; each hook fails open (``_fail``).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from llmtop.agent.instruments.step_inputs import _TENSOR, _input_shape, batch_dim
from llmtop.agent.instruments.step_records import BWD, DATA, FWD, H2D, OPT, _Frame
from llmtop.agent.runtime import core

_perf = time.perf_counter_ns
_ident = threading.get_ident


class StepHooks:
    """The data, copy, backward, optimizer and root-forward hooks (mixin)."""

    # --- hooks: data loader ---------------------------------------------------------------------

    def _wrap_next(self, orig: Any) -> Any:
        tr = self

        def __next__(it: Any) -> Any:  # noqa: N807
            if tr.disabled or not tr._own(False):
                return orig(it)
            t0 = _perf()
            if tr.loop_bwd and not tr.stack:
                tr._loop_boundary(t0)  # no optimizer: the next batch starts the next iteration
            f = tr._push(DATA, t0)
            ok = False
            try:
                out = orig(it)
                ok = True
                return out
            finally:
                t1 = _perf()
                try:
                    dur = tr._pop(f, t1)
                    if ok and (tr.in_eval or tr.eval_pending) and tr.training and not tr.manual:
                        # a batch fetched after no-grad forwards: an evaluation's (its loader) or
                        # the next training step's; the last one before training resumes is the latter
                        tr.in_eval = True
                        tr.eval_fetch = (t0, dur)
                    tr.overhead += _perf() - t1 + tr.hook_ns
                except Exception as exc:
                    tr._fail("data loader hook", exc)

        return __next__

    # --- hooks: host-to-device copies ------------------------------------------------------------

    def _wrap_to(self, orig: Any) -> Any:
        tr = self
        compiling = _compiling_check()

        def to(t: Any, *args: Any, **kwargs: Any) -> Any:
            if not tr.h2d_armed or tr.disabled or not t.is_cpu or tr.win_start is None or compiling():
                # no device in use, already on a device, no step in progress, or traced by dynamo
                return orig(t, *args, **kwargs)
            t0 = _perf()
            out = orig(t, *args, **kwargs)
            t1 = _perf()
            try:
                if not out.is_cpu and _ident() == tr.owner:
                    # a copy is a leaf: nothing we measure runs inside it, so no frame is needed
                    dur = t1 - t0
                    st = tr.stack
                    if st:
                        st[-1].child += dur
                    tr.acc[H2D] += dur
                tr.overhead += _perf() - t1 + tr.hook_ns
            except Exception as exc:
                tr._fail("tensor copy hook", exc)
            return out

        return to

    # --- hooks: backward, loss, gradient norm ---------------------------------------------------

    def _wrap_backward(self, orig: Any) -> Any:
        tr = self

        def backward(*args: Any, **kwargs: Any) -> Any:
            if tr.disabled or tr.bwd_depth or (_ident() != tr.owner and not tr._own(True)):
                # nested (Tensor.backward calls torch.autograd.backward): the outer call times it
                return orig(*args, **kwargs)
            t0 = _perf()
            f = None
            try:
                tr._on_backward_start(t0, args[0] if args else kwargs.get("tensors"))
                f = _Frame(BWD, t0)
                tr.stack.append(f)
            except Exception as exc:
                tr._fail("backward hook", exc)
            tr.bwd_depth += 1
            t1 = _perf()
            try:
                return orig(*args, **kwargs)
            finally:
                t2 = _perf()
                tr.bwd_depth -= 1
                if f is not None and not tr.disabled:
                    try:
                        tr._pop(f, t2)
                        tr.bwd_end = t2
                        tr.loop_bwd = not tr.opt_steps and not tr.manual
                        tr.overhead += (t1 - t0) + (_perf() - t2) + tr.hook_ns
                    except Exception as exc:
                        tr._fail("backward hook", exc)

        return backward

    def _on_backward_start(self, t0: int, tensor: Any) -> None:
        """A backward begins: it is training, and its tensor is the loss. Opens the step window
        if none is open (the frame is pushed by the caller)."""
        if self.in_eval:
            self._end_eval(t0)
        if not self.training:
            self._training_begins()
            self.tentative = None  # the forward before this backward was training, not inference
        self.eval_pending = False  # training activity
        self.trained = True
        if self.grad_root is not None:
            self.train_root = self.grad_root
        if self.win_start is None:
            self.win_start = t0
            self._arm_h2d()
            self.gpu.restart()
        if tensor.__class__ is not _TENSOR[0]:  # a Parameter, a subclass, a sequence of tensors
            if isinstance(tensor, (tuple, list)) and len(tensor) == 1:
                tensor = tensor[0]
            if not isinstance(tensor, _TENSOR[0]):
                return
        if len(self.losses) < 256:
            sc = self.scaled
            if sc is not None:
                if sc[0] == id(tensor):
                    tensor = sc[1]  # GradScaler: report the unscaled loss
                self.scaled = None
            h = self.scalars.capture(tensor)  # None unless it holds one value
            if h is not None:
                self.losses.append(h)

    def _wrap_clip(self, orig: Any) -> Any:
        tr = self

        def clip_grad_norm_(*args: Any, **kwargs: Any) -> Any:
            out = orig(*args, **kwargs)
            if not tr.disabled:
                t0 = _perf()
                try:
                    torch = sys.modules["torch"]
                    if isinstance(out, torch.Tensor) and _ident() == tr.owner:
                        tr.grad = tr.scalars.capture(out)
                    tr.overhead += _perf() - t0 + tr.hook_ns
                except Exception as exc:
                    tr._fail("clip_grad_norm_ hook", exc)
            return out

        return clip_grad_norm_

    def _wrap_scale(self, orig: Any) -> Any:
        tr = self

        def scale(scaler: Any, outputs: Any) -> Any:
            out = orig(scaler, outputs)
            if not tr.disabled and out is not outputs:
                torch = sys.modules["torch"]
                if isinstance(outputs, torch.Tensor) and isinstance(out, torch.Tensor):
                    tr.scaled = (id(out), outputs.detach())
            return out

        return scale

    def _wrap_scaler_step(self, orig: Any) -> Any:
        tr = self

        def step(scaler: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            before = tr.opt_steps
            out = orig(scaler, optimizer, *args, **kwargs)
            if not tr.disabled and tr.opt_steps == before and not tr.manual and _ident() == tr.owner:
                # GradScaler skipped the optimizer (inf/NaN gradients): the iteration still ends a step
                try:
                    tr._end_step(_perf(), "train", optimizer)
                except Exception as exc:
                    tr._fail("GradScaler hook", exc)
            return out

        return step

    # --- hooks: optimizer ----------------------------------------------------------------------

    def _opt_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.disabled or not self._own(True):
            return
        t0 = _perf()
        try:
            if self.opt_depth == 0:
                if self.in_eval:
                    self._end_eval(t0)
                if not self.training:
                    self._training_begins()
                self.tentative = None
                self.eval_pending = False  # training activity
                self.trained = True
                self.loop_bwd = self.no_opt = False  # an optimizer after all: it ends the steps
                self.held = []  # (boundaries held so far were micro-batches of this step)
            self.opt_depth += 1
            self._push(OPT, t0)
            self.overhead += _perf() - t0 + self.hook_ns
        except Exception as exc:
            self._fail("optimizer pre hook", exc)

    def _opt_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.disabled or _ident() != self.owner:
            return
        t1 = _perf()
        try:
            st = self.stack
            if st and st[-1].phase == OPT:
                f = st[-1]
            else:
                f = next((x for x in reversed(st) if x.phase == OPT), None)
            if f is not None:
                self._pop(f, t1)
            self.opt_depth = max(0, self.opt_depth - 1)
            if self.opt_depth:
                return  # a wrapper optimizer (accelerate, ZeRO) is still inside its step
            self.opt_steps += 1
            if self.manual:
                self.overhead += _perf() - t1 + self.hook_ns
                return
            oid = id(optimizer)
            if self.boundary_opt is None:
                self.boundary_opt = oid
            elif oid != self.boundary_opt:
                if oid not in self.opts_seen:
                    # another optimizer in the same iteration (GAN): its time is optimizer time
                    self.opts_seen.add(oid)
                    self.overhead += _perf() - t1 + self.hook_ns
                    return
                self.boundary_opt = oid  # stepped twice without the old one: it replaced it
            self.overhead += _perf() - t1 + self.hook_ns
            self._end_step(t1, "train", optimizer)
        except Exception as exc:
            self._fail("optimizer post hook", exc)

    # --- hooks: root forwards (from the layers instrument) -----------------------------------------

    def _on_root_start(self, module: Any, t0: int, args: Any, kwargs: Any) -> None:
        if self.disabled:
            return
        grad = self._grad_enabled()
        if _ident() != self.owner and not self._own(True):
            return
        try:
            st = self.stack
            while st and st[-1].phase == FWD:
                st.pop()  # a previous root forward raised: its end never came
            # "prefill"/"decode" inside transformers' generate(), read at the start: the call
            # updates it at the end
            gen = self.fwd_gen = core.BUS.generation_phase()
            if self.tentative is not None and not self.manual and gen != "decode":
                self._commit_tentative()  # (a decode forward continues its generate() step)
            if self.training and not self.manual:
                if grad and module.training:
                    if self.in_eval:
                        self._end_eval(t0)
                    elif self.loop_bwd and id(module) == self.train_root and not st:
                        self._loop_boundary(t0)  # no optimizer: the next forward starts the next iteration
                    self.grad_root = id(module)
                    self.eval_pending = False  # training activity
                    self.trained = True
                elif not self.in_eval and not self.trained and id(module) == self.train_root:
                    self.in_eval = True  # the trained model, no grad or eval mode, between steps
            elif grad:
                self.grad_root = id(module)
                if self.training:
                    self.eval_pending = False  # training activity
            if self.win_start is None:
                self._push(FWD, t0)
            else:
                st.append(_Frame(FWD, t0))
        except Exception as exc:
            self._fail("root forward hook", exc)

    def _on_root_end(self, module: Any, t0: int, t1: int, args: Any, kwargs: Any) -> None:
        if self.disabled or _ident() != self.owner:
            return
        try:
            grad = self._grad_enabled()
            st = self.stack
            f = st[-1] if st and st[-1].phase == FWD and st[-1].t0 == t0 else None
            if f is None:  # no start announced: account the forward as a leaf
                if self.win_start is None:
                    self.win_start = t0
                    self.gpu.restart()
                f = _Frame(FWD, t0)
                st.append(f)
            self._pop(f, t1)
            counts = grad or not self.training or self.in_eval
            gen = self.fwd_gen if not self.training else None
            self.fwd_gen = None
            if counts and self.sample_module in (None, id(module)):
                self.sample_module = id(module)
                bdim = self._bdim.get(id(module))
                if bdim is None:  # once per model root
                    if len(self._bdim) > 256:
                        self._bdim.clear()
                    bdim = self._bdim[id(module)] = batch_dim(module)
                samples, tokens = _input_shape(args, kwargs, bdim)
                if gen == "decode":
                    samples = None  # the batch was counted by the prefill forward
                if samples is not None:
                    self.samples += samples
                    self.have_samples = True
                if tokens is not None:
                    self.tokens += tokens
                    self.have_tokens = True
                    if gen is not None:  # prefill and decode tokens counted apart
                        split = self.gen_tokens
                        if split is None:
                            split = self.gen_tokens = [0, 0]
                        split[gen == "decode"] += tokens
            if self.manual:
                pass
            elif self.training:
                if self.in_eval or not grad:
                    self.eval_fwd_end = t1
                    self.eval_pending = True  # evaluation (or a no-grad teacher) forward
            elif gen is not None:
                # inside generate(): the whole call is one inference step; it ends at the last
                # forward, committed when the next call (or any other root forward) starts
                self.tentative = (t1, list(self.acc), self.samples, self.tokens,
                                  self.have_samples, self.have_tokens)
            elif not grad:
                self._end_step(t1, "infer", None, listener=True)
                return
            else:
                # grad enabled but no backward yet: inference unless a backward follows
                self.tentative = (t1, list(self.acc), self.samples, self.tokens,
                                  self.have_samples, self.have_tokens)
        except Exception as exc:
            self._fail("root forward hook", exc)


def _compiling_check() -> Any:
    """A cheap ``is_compiling()`` so that dynamo traces straight through our wrappers."""
    try:
        import torch

        fn = torch.compiler.is_compiling
        return fn
    except Exception:
        return lambda: False
