"""Step tracker: step boundaries, phases that sum to the step time, training signals, anomalies.

Boundaries (see docs/ARCHITECTURE.md, "Steps and phases"):

- training: the outermost optimizer ``step()`` (global optimizer step post hook) ends a step;
  gradient accumulation therefore gives one step per optimizer step;
- training with no optimizer: a backward, then the next iteration's batch fetch or the trained
  model's next grad-enabled forward, ends a step (held for HOLD iterations, which could still be
  micro-batches, until the loop shows it has no optimizer);
- inference (no backward or optimizer step seen yet): each root forward ends a step; a forward
  with grad enabled ends its step only once the next root forward starts without a backward; a
  ``generate`` call's step ends when it returns (``core.BUS.generate_end``);
- evaluation between training steps (the trained model's no-grad or eval-mode forwards, or no-grad
  forwards followed by a batch fetch) is an "eval" record: numbered as the next training step, not
  counted, not announced on ``step_end`` (``eval_end`` instead); inference records before the
  first training step were such an evaluation: training steps count from 0 again;
- manual: after the first ``llmtop.agent.step()`` only manual calls end steps.

Phases are exclusive times on the step loop's thread, innermost wins (an h2d copy inside a data
fetch is h2d): data (``DataLoader`` iterator ``__next__``), h2d (``Tensor.to``/``.cuda`` moving a CPU
tensor to another device), forward (root forwards announced on ``core.BUS``), backward
(``torch.autograd.backward``, which ``Tensor.backward`` calls), optimizer (between the optimizer
pre and post hooks); ``other`` is the remainder, so the phases sum to the step time.

Hot path: timestamps and integer adds into preallocated lists; the finished step goes into a
deque as a raw tuple; ``poll`` (agent thread) resolves loss / grad norm / GPU time without a sync,
emits ``Step`` and ``Anomaly`` events.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from typing import Any

from llmtop.agent.instruments.anomalies import AnomalyDetector
from llmtop.agent.instruments.gpu_timing import GpuStepClock, ScalarReader, cuda_ready
from llmtop.agent.instruments.memory import NONE3, StepMemory, host_rss
from llmtop.agent.instruments.patching import Patches
from llmtop.agent.runtime import core
from llmtop.protocol.events import PHASES, Event, Step

DATA, H2D, FWD, BWD, OPT = range(5)
PHASE_NAMES = PHASES[: PHASES.index("other")]  # the measured ones, in the protocol's order; "other" is the rest
NPH = 5
# Finished steps queued for the agent thread before the hot path folds further ones into running
# totals (a 0.1 ms step loop fills this in 1.6 s; each entry is a few hundred bytes)
DONE_MAX = 16384
# Iterations with a backward and no optimizer held back before the loop counts as optimizer-free
# (until then they could be gradient accumulation's micro-batches, one step once the optimizer runs)
HOLD = 16

_perf = time.perf_counter_ns
_ident = threading.get_ident


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


def _lr_value(lr: Any) -> float | None:
    """The learning rate as a float: a number, or a CPU tensor (capturable schedules; a host read)."""
    if isinstance(lr, (int, float)):
        return float(lr)
    if getattr(lr, "device", None) is not None and lr.device.type == "cpu":
        return float(lr)
    return None


def batch_dim(module: Any) -> int:
    """Where a model's inputs hold the batch: 1 when its first module with a ``batch_first`` flag
    (``nn.LSTM``/``GRU``/``RNN``, ``nn.Transformer`` and its layers, ``nn.MultiheadAttention``)
    takes sequence-first inputs, as torch's default is; else 0."""
    try:
        for m in module.modules():
            bf = getattr(m, "batch_first", None)
            if bf.__class__ is bool and m.__class__.__module__.startswith("torch.nn."):
                return 0 if bf else 1
    except Exception:
        pass
    return 0


def _input_shape(args: tuple, kwargs: dict, bdim: int = 0) -> tuple[int | None, int | None]:
    """(samples, tokens) from a root forward's inputs: ``input_ids`` or the first tensor argument.
    ``bdim``: the batch's dimension (1 for sequence-first models)."""
    tensor = _TENSOR[0]
    if tensor is None:
        torch = sys.modules.get("torch")
        if torch is None:
            return None, None
        tensor = _TENSOR[0] = torch.Tensor
    x = kwargs.get("input_ids") if kwargs else None
    if x is None and args and args[0].__class__ is tensor:
        x = args[0]  # the common case: model(x)
    elif x is None or not isinstance(x, tensor):
        x = None
        for a in args:
            if isinstance(a, tensor):
                x = a
                break
        else:
            if kwargs:
                for a in kwargs.values():
                    if isinstance(a, tensor):
                        x = a
                        break
    if x is None:
        return None, None
    shape = x.shape
    if not shape:
        return None, None
    dtype = x.dtype
    n = shape[bdim] if bdim < len(shape) else shape[0]
    if len(shape) == 2 and not dtype.is_floating_point and not dtype.is_complex and dtype is not _BOOL[0]:
        return n, shape[0] * shape[1]
    return n, None


_TENSOR: list[Any] = [None]
_BOOL: list[Any] = [None]


class StepInstrument:
    """Implements ``core.Instrument``. One per process; hooks are global."""

    name = "steps"

    def __init__(self, options: core.Options | None = None) -> None:
        self.options = options or core.Options()
        self.ctx: Any = None
        self._handles: list[Any] = []
        self._patches = Patches()
        self._installed = False
        self.disabled = False
        self._reset_state()
        self._done: deque[tuple] = deque()  # hot path -> poll; at most done_max, then folded
        self.done_max = DONE_MAX
        # steps folded while ``_done`` was full, as running totals the hot path only adds to:
        # [count, last step, last end, dur, 5 phases, samples, tokens, overhead]; poll emits the
        # difference from what it saw last, so count and totals stay exact
        self._folded = [0] * 12
        self._folded_seen = [0] * 12
        self._folded_mode = "train"
        self._waiting: deque[_Raw] = deque()  # poll only
        self.detector = AnomalyDetector()
        self.scalars = ScalarReader()
        self.gpu = GpuStepClock()
        self.memory = StepMemory()
        # torch calling one of our hooks or wrappers, outside the time they measure themselves
        # (calibrated by the layers instrument, shared through core.BUS.costs)
        self.hook_ns = core.BUS.costs.hook_ns
        self.h2d_armed = False  # see _arm_h2d
        self._other_device = False  # a non-CUDA accelerator (MPS, XLA) is present
        self.flushed = False
        self._bdim: dict[int, int] = {}  # root module id -> its batch dimension (see batch_dim)

    # --- state ----------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self.step = 0
        self.owner: int | None = None  # thread id of the step loop
        self.stack: list[_Frame] = []
        self.acc = [0] * NPH
        self.win_start: int | None = None  # None: no step in progress (idle until the first activity)
        self.training = False  # a backward or an optimizer step was seen
        self.manual = False
        # a no-grad root forward ran since the last training activity (a grad-enabled forward, a
        # backward or an optimizer step, which clear it): only a batch fetched while it is set marks
        # an evaluation, so a no-grad forward followed directly by training (a frozen teacher) stays
        # in its step (see the data loader hook)
        self.eval_pending = False
        self.losses: list[Any] = []
        self.grad: Any = None
        self.samples = 0
        self.tokens = 0
        self.have_samples = False
        self.have_tokens = False
        self.sample_module: int | None = None
        self.overhead = 0
        self.opt_depth = 0
        self.boundary_opt: int | None = None
        self.opts_seen: set[int] = set()
        self.tentative: tuple | None = None  # an inference step waiting to learn it was not training
        self.fwd_gen: str | None = None  # generate() phase when the running root forward started
        self.bwd_depth = 0
        self.scaled: tuple[int, Any] | None = None  # (id of GradScaler output, unscaled tensor)
        self.opt_steps = 0
        # evaluation between training steps: no-grad or eval-mode forwards of the trained model, or
        # no-grad forwards followed by a batch fetch, make an "eval" record of their own (see _end_eval)
        self.grad_root: int | None = None  # root module of the last grad-enabled forward
        self.train_root: int | None = None  # the root module whose forward fed a backward
        self.trained = False  # training activity in the step window now open
        self.in_eval = False
        self.eval_fwd_end = 0  # end of the last no-grad forward while training
        self.eval_fetch: tuple[int, int] | None = None  # (start, duration) of the last batch fetched in eval
        self.train_steps = 0
        # loops with no optimizer: a step per backward, ending where the next iteration starts
        self.loop_bwd = False  # a backward ended since the last loop boundary
        self.no_opt = False  # the loop showed it has no optimizer (HOLD iterations without one)
        self.held: list[tuple] = []  # boundaries held while that is not yet known
        self.bwd_end = 0

    # --- install / uninstall ------------------------------------------------------------------

    def install(self, ctx: core.Context) -> None:
        import torch
        import torch.utils.data.dataloader as dl

        self.ctx = ctx
        self._grad_enabled = torch.is_grad_enabled
        _BOOL[0] = torch.bool
        _TENSOR[0] = torch.Tensor
        self._pc0 = _perf()
        self._wall0 = time.time()
        self.hook_ns = core.BUS.costs.hook_ns
        try:
            mps = getattr(torch.backends, "mps", None)
            self._other_device = bool(mps is not None and mps.is_available()) or "torch_xla" in sys.modules
        except Exception:
            self._other_device = True
        self._arm_h2d()
        import torch.optim.optimizer as opt
        self._handles.append(opt.register_optimizer_step_pre_hook(self._opt_pre))
        self._handles.append(opt.register_optimizer_step_post_hook(self._opt_post))
        self._patches.patch(dl._BaseDataLoaderIter, "__next__", self._wrap_next)
        self._patches.patch(torch.Tensor, "to", self._wrap_to)
        self._patches.patch(torch.Tensor, "cuda", self._wrap_to)
        # Tensor.backward calls torch.autograd.backward through the module attribute: one wrapper
        # there sees both (a second one on Tensor.backward cost a hook entry per step)
        self._patches.patch(torch.autograd, "backward", self._wrap_backward)
        import torch.nn.utils as nnu
        import torch.nn.utils.clip_grad as cg

        self._patches.patch_same(nnu, cg, "clip_grad_norm_", self._wrap_clip)
        try:
            from torch.amp.grad_scaler import GradScaler

            self._patches.patch(GradScaler, "scale", self._wrap_scale)
            self._patches.patch(GradScaler, "step", self._wrap_scaler_step)
        except Exception:
            pass
        core.BUS.root_forward_start.append(self._on_root_start)
        core.BUS.root_forward.append(self._on_root_end)
        core.BUS.generate_end.append(self._on_generate_end)
        try:
            ctx.set_manual_step(self.manual_step)
        except Exception:
            pass
        try:
            os.register_at_fork(after_in_child=self._after_fork)
        except Exception:
            pass
        self._installed = True

    def uninstall(self) -> None:
        if not self.disabled and not self.flushed:
            try:
                self.flush()
            except Exception:
                pass
        for h in self._handles:
            try:
                h.remove()
            except Exception:
                pass
        self._handles.clear()
        self._patches.undo()
        self.disabled = True  # wrappers still referenced elsewhere go straight to the originals
        for lst, fn in ((core.BUS.root_forward_start, self._on_root_start),
                        (core.BUS.root_forward, self._on_root_end),
                        (core.BUS.generate_end, self._on_generate_end)):
            try:
                lst.remove(fn)
            except ValueError:
                pass
        self._installed = False

    def _after_fork(self) -> None:
        # a forked child (DataLoader worker) measures nothing: its hooks go straight to the originals
        self.disabled = True

    def _fail(self, where: str, exc: BaseException) -> None:
        """Fail open: turn the tracker off, tell the user through a warning event."""
        if self.disabled:
            return
        self.disabled = True
        try:
            self.ctx.warn(self.name, f"step tracking disabled after an error in {where}: {exc!r}")
        except Exception:
            pass

    # --- the exclusive-time stack (step loop thread only) ----------------------------------------

    def _own(self, claim: bool) -> bool:
        """Is the current thread the step loop's? ``claim``: training activity moves ownership here."""
        tid = _ident()
        if tid == self.owner:
            return True
        if self.owner is None or (claim and not self.stack):
            self.owner = tid
            self.stack = []
            return True
        return False

    def _push(self, phase: int, t0: int) -> _Frame:
        if self.win_start is None:
            self.win_start = t0
            self._arm_h2d()
            self.gpu.restart()
        f = _Frame(phase, t0)
        self.stack.append(f)
        return f

    def _pop(self, f: _Frame, t1: int) -> int:
        """Close frame ``f`` at ``t1``; returns its inclusive duration."""
        st = self.stack
        if st and st[-1] is f:
            st.pop()
        elif f in st:  # inner frames never closed (an exception skipped their hooks): drop them
            del st[st.index(f):]
        else:
            return 0
        dur = t1 - f.t0
        if st:
            st[-1].child += dur
        self.acc[f.phase] += dur - f.child
        return dur

    def _arm_h2d(self) -> None:
        """Time ``Tensor.to`` only while a device is in use; on CPU-only runs h2d is 0 for free."""
        self.h2d_armed = self.h2d_armed or self._other_device or cuda_ready()

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
        return Step(step=r.step, t=wall, dur_ms=dur_ms, mode=r.mode, phases=ph, loss=r.loss_value,
                    grad_norm=r.grad_value, lr=r.lr, samples=r.samples, tokens=r.tokens,
                    overhead_us=r.overhead_ns / 1e3, layer_every=r.layer_every,
                    cuda_allocated=alloc, cuda_reserved=reserved, cuda_peak=peak, gpu_ms=r.gpu_ms,
                    merged=r.merged, losses=r.micro)


def _compiling_check() -> Any:
    """A cheap ``is_compiling()`` so that dynamo traces straight through our wrappers."""
    try:
        import torch

        fn = torch.compiler.is_compiling
        return fn
    except Exception:
        return lambda: False
