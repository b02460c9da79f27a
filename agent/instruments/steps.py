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

The tracker is split by what each part holds: ``StepInstrument`` here (state, install, the
exclusive-time stack) is built from mixins: the hooks (step_hooks.py), the step boundaries and the
step end (step_boundaries.py), the agent thread's side (step_completion.py); its plain data is in
step_records.py and what a forward's inputs say (samples, tokens) in step_inputs.py.
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
from llmtop.agent.instruments.memory import StepMemory
from llmtop.agent.instruments.patching import Patches
from llmtop.agent.instruments.step_boundaries import StepBoundaries
from llmtop.agent.instruments.step_completion import StepCompletion
from llmtop.agent.instruments.step_hooks import StepHooks
from llmtop.agent.instruments.step_inputs import _BOOL, _TENSOR
from llmtop.agent.instruments.step_records import NPH, _Frame, _Raw
from llmtop.agent.runtime import core

# Finished steps queued for the agent thread before the hot path folds further ones into running
# totals (a 0.1 ms step loop fills this in 1.6 s; each entry is a few hundred bytes)
DONE_MAX = 16384

_perf = time.perf_counter_ns
_ident = threading.get_ident


class StepInstrument(StepHooks, StepBoundaries, StepCompletion):
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
        # generate() steps: end time (ns) -> (prefill tokens, decode tokens), noted by _end_step for
        # poll (a side table, not the queued tuple: only inference steps of generate calls have one)
        self._gen_split: dict[int, tuple[int, int]] = {}

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
        # tokens of this step's forwards inside generate(): [prefill, decode]; None outside generate
        self.gen_tokens: list[int] | None = None
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
