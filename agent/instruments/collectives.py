"""torch.distributed collectives: time, calls and bytes per step, and collectives that hang.

What is measured (``Step.comm_ms/comm_calls/comm_bytes``, filled by the step tracker through
``core.BUS.comm_of``):

- **Explicit collectives.** The Python functions of ``torch.distributed`` (the same objects in
  ``distributed_c10d``) listed in ``OPS`` are wrapped once ``torch.distributed`` is imported (torch
  imports it itself; a build without it has nothing to wrap). Every call counts one call and its
  bytes (``BYTES``); a blocking call adds its wall time. A call made inside another one (c10d's own
  ``work.wait()`` in a blocking ``all_reduce``, ``batch_isend_irecv`` calling ``isend``) is part of
  the outer one, never counted twice.
- **async_op=True / isend / irecv / batch_isend_irecv** return a ``Work`` at once: the call counts
  with its bytes and the time to issue it; the time blocked later is taken in ``Work.wait`` (the
  class method is wrapped, so the returned object is the same object torch made). Completion that
  is only polled (``is_completed``) or awaited through ``get_future()`` adds no time.
- **DDP's bucketed all-reduce** runs in C++ with no Python call to wrap, and a comm hook would take
  the user's one slot. Instead: a DDP forward with gradient sync arms the next backward; at its start
  (a pre-hook on the root's ``grad_fn``, removed when it returns) an autograd final callback is
  queued. Final callbacks run in the order queued, and DDP queues its ``finalize_backward`` (which
  waits for every bucket) only when the last bucket is ready, so ours runs first: the time from our
  callback to the return of ``backward`` is what the rank waited for the all-reduce after its own
  gradients were done. Calls and bytes are DDP's buckets (its logging data, read in the first
  forwards; that record lags DDP's bucket rebuild in the second iteration by one iteration, so
  that iteration's calls are the first's). On CPU (gloo) ``finalize_backward`` blocks the host, so
  this is the wait. With NCCL it only makes the compute stream wait: the host time, and so
  ``comm_ms``, is near zero there (calls and bytes are right); the device-side wait would need CUDA
  events recorded in the two callbacks. ``ProcessGroupNCCL._register_on_completion_hook`` is not
  used: it needs TORCH_NCCL_ENABLE_TIMING, takes the one hook slot a process group has, is
  deprecated with a warning printed to the script's stderr, and an exception in it aborts every
  communicator.

Hot path: ``perf_counter_ns``, one tuple per call in ``inflight`` (thread id -> (op, t0, seq, step))
for the hang watch, integer adds into a 3-list swapped at each step end (``BUS.step_end`` files it
under the step's number). Nothing reads a tensor's data, so nothing synchronizes a device. Every
wrapper fails open: an error in our part turns the instrument off (the call still runs once) and
is reported once.

Hang watch (agent thread, each tick): a call in ``inflight`` for longer than ``Options.hang_s``
(``LLMTOP_HANG_S``) is reported as ``CollectiveWait`` every tick, and once more with ``done`` when
it returns (or raises: a gloo/NCCL timeout).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from typing import Any

from llmtop.agent.instruments.patching import Patches
from llmtop.agent.runtime import core
from llmtop.protocol.events import CollectiveWait, Event

_perf = time.perf_counter_ns
_ident = threading.get_ident

T, L, P = 0, 1, 2  # what an argument holds: a tensor, a list of tensors, a list of P2POp
# Bytes a call carries, as nccl-tests sizes them: the first of these arguments that is given
# (position, keyword, kind). The full buffer: the gathered output of an all-gather, the whole
# input of a reduce-scatter / all-to-all, the list on the root of gather/scatter (other ranks: the
# tensor they send or receive).
BYTES: dict[str, tuple[tuple[int, str, int], ...]] = {
    "all_reduce": ((0, "tensor", T),),
    "all_gather": ((0, "tensor_list", L),),
    "all_gather_into_tensor": ((0, "output_tensor", T),),
    "all_gather_single": ((0, "output_tensor", T),),  # torch 2.13's name for all_gather_into_tensor
    "reduce_scatter": ((1, "input_list", L),),
    "reduce_scatter_tensor": ((1, "input", T),),
    "reduce_scatter_single": ((1, "input", T),),
    "broadcast": ((0, "tensor", T),),
    "reduce": ((0, "tensor", T),),
    "gather": ((1, "gather_list", L), (0, "tensor", T)),
    "scatter": ((1, "scatter_list", L), (0, "tensor", T)),
    "all_to_all": ((1, "input_tensor_list", L),),
    "all_to_all_single": ((1, "input", T),),
    "barrier": (),
    "send": ((0, "tensor", T),),
    "recv": ((0, "tensor", T),),
    "isend": ((0, "tensor", T),),
    "irecv": ((0, "tensor", T),),
    "batch_isend_irecv": ((0, "p2p_op_list", P),),
}
OPS = tuple(BYTES)
DDP_OP = "ddp_all_reduce"
DDP_KEY = 0  # the ``inflight`` key of DDP's wait (thread ids are never 0; the callback may run elsewhere)
KEEP = 32768  # steps filed and not yet claimed by the step tracker (it claims them each tick)
DDP_LOOKS = 3  # forwards in which DDP's bucket sizes are read (it rebuilds them after the first)


def nbytes(rule: tuple[tuple[int, str, int], ...], args: tuple, kwargs: dict) -> int:
    """Bytes of a call's data argument (see ``BYTES``); metadata only, never the data."""
    for pos, name, kind in rule:
        v = args[pos] if len(args) > pos else kwargs.get(name)
        if v is None:
            continue
        if kind == T:
            return v.nbytes
        n = 0
        if kind == L:
            for t in v:
                n += t.nbytes
        else:
            for op in v:
                n += op.tensor.nbytes
        return n
    return 0


def output_tensors(out: Any) -> list[Any]:
    """The tensors a forward returned: itself, or those in a tuple, list or mapping (a transformers
    ``ModelOutput`` is one), one level down."""
    if hasattr(out, "grad_fn"):
        return [out]
    if isinstance(out, dict):
        items = list(out.values())
    elif isinstance(out, (list, tuple)):
        items = list(out)
    else:
        return []
    return [t for t in items if hasattr(t, "grad_fn")]


def bucket_sizes(ddp: Any) -> tuple[int, int]:
    """(buckets, bytes) DDP all-reduces per backward, from its logging data (its own record of the
    buckets, rebuilt ones once rebuilt); the gradients' size in one bucket when that is missing."""
    try:
        data = ddp._get_ddp_logging_data()
        raw = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes") or ""
        sizes = [int(x) for x in str(raw).replace(",", " ").split()]
        if sizes:
            return len(sizes), sum(sizes)
    except Exception:
        pass
    n = sum(p.nbytes for p in ddp.module.parameters() if p.requires_grad)
    return 1, n


def _remove(handles: list[Any]) -> None:
    for h in handles:
        try:
            h.remove()
        except Exception:
            pass


def _never() -> bool:
    return False


def _compiling_check() -> Any:
    """``torch.compiler.is_compiling``: dynamo folds it to True while it traces, so traced code goes
    straight to torch's functions."""
    try:
        import torch

        return torch.compiler.is_compiling
    except Exception:
        return _never


class CollectivesInstrument:
    """Implements ``core.Instrument``. One per process; the wrappers are global."""

    name = "collectives"

    def __init__(self, options: core.Options | None = None) -> None:
        self.options = options or core.Options()
        self.ctx: Any = None
        self.disabled = False
        self._patches = Patches()
        self._installed = False
        self._wrapped = False  # the c10d functions are wrapped (once torch.distributed is there)
        self._ddp = False  # DDP's forward is wrapped
        self.acc = [0, 0, 0]  # ns blocked, calls, bytes since the last step end (swapped there)
        self.totals = [0, 0, 0]  # the same since install, never reset (benchmarks, tests)
        self.seq = 0  # collectives started by this process (DDP's buckets included)
        self.inflight: dict[int, tuple[str, int, int, int]] = {}  # thread id -> (op, t0 ns, seq, step)
        self._steps: dict[int, list[int]] = {}  # step -> its acc (hot path files, agent thread claims)
        self._evals: dict[int, list[int]] = {}
        self._reported: dict[tuple[int, int, int], tuple[str, int, int, int]] = {}
        self._active = False  # a process group exists or a collective ran: steps say comm_ms
        self._c10d: Any = None
        # DDP modules whose last forward (with gradient sync) prepared a reduction: id -> (buckets,
        # bytes, pre-hooks on its outputs' grad_fn); a module's next forward replaces its entry (a
        # forward never backpropagated reduces nothing), the backward's callbacks take them all
        self._armed: dict[int, tuple[int, int, list[Any]]] = {}
        self._ddp_seen: dict[int, list[int]] = {}  # id(DDP module) -> [forwards looked at, calls, bytes]
        self._task = -1  # the backward (graph task) whose DDP wait is being measured
        self._cb_t = 0  # when that backward's gradients were all computed
        self._engine: Any = None
        self._task_id: Any = None
        self._grad_enabled: Any = None
        self._compiling: Any = _never
        self._pc0 = _perf()
        self._wall0 = time.time()

    # --- install / uninstall -----------------------------------------------------------------------

    def install(self, ctx: core.Context) -> None:
        self.ctx = ctx
        self._pc0, self._wall0 = _perf(), time.time()
        core.BUS.step_end.append(self._on_step_end)
        core.BUS.eval_end.append(self._on_eval_end)
        core.BUS.comm_of = self.comm_of
        self._installed = True
        try:
            os.register_at_fork(after_in_child=self._after_fork)
        except Exception:
            pass
        self._try_wrap()

    def uninstall(self) -> None:
        self._patches.undo()
        self._disarm()
        self.disabled = True  # a wrapper someone still holds goes straight to the original
        self._wrapped = self._ddp = False
        for lst, fn in ((core.BUS.step_end, self._on_step_end), (core.BUS.eval_end, self._on_eval_end)):
            try:
                lst.remove(fn)
            except ValueError:
                pass
        if getattr(core.BUS, "comm_of", None) == self.comm_of:
            core.BUS.comm_of = None
        self._installed = False

    def _after_fork(self) -> None:
        self.disabled = True  # a forked child (DataLoader worker) measures nothing

    def _fail(self, where: str, exc: BaseException) -> None:
        """Fail open: every wrapper passes straight through from now on; said once."""
        if self.disabled:
            return
        self.disabled = True
        core.warn_safely(self.ctx, self.name, f"collective timing disabled after an error in {where}: {exc!r}")

    def _try_wrap(self) -> None:
        """Wrap what the script has imported: never import torch.distributed ourselves."""
        if self.disabled:
            return
        c10d = sys.modules.get("torch.distributed.distributed_c10d")
        dist = sys.modules.get("torch.distributed")
        if not self._wrapped and c10d is not None and dist is not None:
            self._c10d = c10d
            self._compiling = _compiling_check()
            for op in OPS:
                fn = getattr(c10d, op, None)
                if fn is None:
                    continue
                self._patches.patch_same(dist, c10d, op, self._wrapper_factory(op))
            work = getattr(c10d, "Work", None)
            if work is not None and "wait" in getattr(work, "__dict__", {}):
                self._patches.patch(work, "wait", self._wrap_wait)
            self._wrapped = True
        ddp_mod = sys.modules.get("torch.nn.parallel.distributed")
        if not self._ddp and ddp_mod is not None and self._wrapped:
            import torch  # already imported: torch.nn.parallel.distributed is

            self._engine = torch.autograd.Variable._execution_engine
            self._task_id = torch._C._current_graph_task_id
            self._grad_enabled = torch.is_grad_enabled
            self._patches.patch(ddp_mod.DistributedDataParallel, "forward", self._wrap_ddp_forward)
            self._ddp = True

    # --- the wrappers (hot path) -------------------------------------------------------------------

    def _wrapper_factory(self, op: str) -> Any:
        def factory(orig: Any) -> Any:
            rule = BYTES[op]
            me = self

            def collective(*args: Any, **kwargs: Any) -> Any:
                if me.disabled or me._compiling():  # dynamo folds this: traced code calls torch's
                    return orig(*args, **kwargs)
                tid = _ident()
                fl = me.inflight
                if tid in fl:  # inside one of ours: part of that call
                    return orig(*args, **kwargs)
                try:
                    try:
                        nb = nbytes(rule, args, kwargs)
                    except Exception:
                        nb = 0  # not tensors: torch itself will say what is wrong with the call
                    me.seq = seq = me.seq + 1
                    t0 = _perf()
                    fl[tid] = (op, t0, seq, me.ctx.current_step)
                except Exception as exc:
                    me._fail(op, exc)
                    return orig(*args, **kwargs)
                try:
                    return orig(*args, **kwargs)
                finally:
                    dt = _perf() - t0
                    fl.pop(tid, None)
                    a, tot = me.acc, me.totals
                    a[0] += dt
                    a[1] += 1
                    a[2] += nb
                    tot[0] += dt
                    tot[1] += 1
                    tot[2] += nb
            # torch's name, signature and docstring (``inspect.signature`` follows ``__wrapped__``)
            return functools.update_wrapper(collective, orig)
        return factory

    def _wrap_wait(self, orig: Any) -> Any:
        me = self

        def wait(work: Any, *args: Any, **kwargs: Any) -> Any:
            if me.disabled or me._compiling():
                return orig(work, *args, **kwargs)
            tid = _ident()
            fl = me.inflight
            if tid in fl:  # a blocking collective's own wait: its time is that call's
                return orig(work, *args, **kwargs)
            try:
                t0 = _perf()
                fl[tid] = ("wait", t0, me.seq, me.ctx.current_step)
            except Exception as exc:
                me._fail("Work.wait", exc)
                return orig(work, *args, **kwargs)
            try:
                return orig(work, *args, **kwargs)
            finally:
                dt = _perf() - t0
                fl.pop(tid, None)
                me.acc[0] += dt
                me.totals[0] += dt
        return wait

    def _wrap_ddp_forward(self, orig: Any) -> Any:
        me = self

        def forward(ddp: Any, *args: Any, **kwargs: Any) -> Any:
            out = orig(ddp, *args, **kwargs)
            if me.disabled or me._compiling():
                return out
            try:
                # DDP prepares a reduction for the next backward exactly when this holds
                if ddp.require_backward_grad_sync and me._grad_enabled():
                    me._arm(ddp, out)
            except Exception as exc:
                me._fail("DistributedDataParallel.forward", exc)
            return out
        return forward

    def _arm(self, ddp: Any, out: Any) -> None:
        """A DDP forward with gradient sync: the backward through ``out`` will all-reduce its buckets.
        A pre-hook on each output's ``grad_fn`` (removed in that backward) starts the measurement."""
        if self._cb_t:  # the last backward raised between our two callbacks (a timeout): it is over
            self.inflight.pop(DDP_KEY, None)
            self._cb_t = 0
            self._disarm()
        old = self._armed.pop(id(ddp), None)
        if old is not None:  # its last forward was never backpropagated
            _remove(old[2])
        handles = [fn.register_prehook(self._backward_reaches_output)
                   for fn in {id(t.grad_fn): t.grad_fn for t in output_tensors(out) if t.grad_fn is not None}.values()]
        if not handles:  # no output needs a gradient: no backward will reduce through it
            return
        seen = self._ddp_seen.get(id(ddp))
        if seen is None or seen[0] < DDP_LOOKS:
            calls, nb = bucket_sizes(ddp)
            seen = self._ddp_seen[id(ddp)] = [(seen[0] if seen else 0) + 1, calls, nb]
        self._armed[id(ddp)] = (seen[1], seen[2], handles)

    def _disarm(self) -> tuple[int, int]:
        """Take every armed reduction: their pre-hooks removed; returns (buckets, bytes) in all."""
        armed = list(self._armed.values())
        self._armed.clear()
        calls = nb = 0
        for c, b, handles in armed:
            calls += c
            nb += b
            _remove(handles)
        return calls, nb

    def _backward_reaches_output(self, grad_outputs: Any) -> None:
        """Pre-hook of a DDP output's node, in the backward (before any parameter's gradient, so
        before DDP queues its finalize). Queue our final callback, once per backward."""
        try:
            task = self._task_id()
            if task != self._task:
                self._task = task
                self._engine.queue_callback(self._gradients_done)
        except Exception as exc:
            self._fail("backward pre-hook", exc)
        return None

    def _gradients_done(self) -> None:
        """First final callback: this rank's gradients are computed; DDP's finalize, queued after
        this, waits for the buckets' all-reduce. A callback queued now runs after it."""
        t = _perf()
        try:
            self._cb_t = t
            self.seq += sum(a[0] for a in self._armed.values())
            self.inflight[DDP_KEY] = (DDP_OP, t, self.seq, self.ctx.current_step)
            self._engine.queue_callback(self._ddp_done)
        except Exception as exc:
            self.inflight.pop(DDP_KEY, None)
            self._fail("backward callback", exc)

    def _ddp_done(self) -> None:
        """Second final callback, after DDP's finalize: the wait is over."""
        t1 = _perf()
        self.inflight.pop(DDP_KEY, None)
        try:
            dt = t1 - self._cb_t
            calls, nb = self._disarm()
            a, tot = self.acc, self.totals
            a[0] += dt
            a[1] += calls
            a[2] += nb
            tot[0] += dt
            tot[1] += calls
            tot[2] += nb
            self._cb_t = 0
        except Exception as exc:
            self._fail("backward callback", exc)

    # --- step ends (hot path, the step loop's thread) ------------------------------------------------

    def _on_step_end(self, step: int, t_end_ns: int) -> None:
        self._file(self._steps, step)

    def _on_eval_end(self, step: int, t_end_ns: int) -> None:
        self._file(self._evals, step)

    def _file(self, where: dict[int, list[int]], step: int) -> None:
        a = self.acc
        self.acc = [0, 0, 0]
        old = where.get(step)
        if old is not None:  # the same number again (training restarts numbering after inference)
            for i in range(3):
                a[i] += old[i]
        where[step] = a
        if len(where) > KEEP:  # nobody claims them (no step tracker): keep memory flat
            del where[next(iter(where))]

    # --- agent thread ------------------------------------------------------------------------------

    def comm_of(self, step: int, mode: str, merged: int = 1) -> tuple[float, int, int] | None:
        """(ms, calls, bytes) of step ``step`` (of the ``merged`` steps ending there when folded), or
        None while this process has no collectives to speak of (no process group, none called)."""
        where = self._evals if mode == "eval" else self._steps
        ns = calls = nb = 0
        for s in range(step - max(1, merged) + 1, step + 1):
            a = where.pop(s, None)
            if a is not None:
                ns += a[0]
                calls += a[1]
                nb += a[2]
        if not self._active:
            self._active = calls > 0 or self._initialized()
            if not self._active:
                return None
        return ns / 1e6, calls, nb

    def _initialized(self) -> bool:
        c10d = self._c10d
        try:
            return bool(c10d is not None and c10d.is_initialized())
        except Exception:
            return False

    def poll(self, now: float) -> list[Event]:
        if not self._wrapped or not self._ddp:
            try:
                self._try_wrap()
            except Exception as exc:
                self._fail("install", exc)
        if not self._active and self._initialized():
            self._active = True
        return self._hangs(now)

    def _hangs(self, now: float) -> list[Event]:
        """``CollectiveWait`` for every call in progress longer than ``hang_s``, and ``done`` for those
        reported before that have returned."""
        events: list[Event] = []
        limit = float(getattr(self.options, "hang_s", 5.0)) * 1e9
        t_now = _perf()
        stopping = bool(getattr(self.ctx, "stopping", False))
        ddp = self.inflight.get(DDP_KEY)
        if ddp is not None and (stopping or ddp[3] < getattr(self.ctx, "current_step", 0)):
            # DDP's wait whose backward raised (a timeout: the final callbacks stop at the first
            # error, ours after DDP's never runs): the script has moved on, or is ending
            self.inflight.pop(DDP_KEY, None)
        # the script is ending: nothing it waits in outlives it (the ``done`` precedes ``End``)
        live = [] if stopping else list(self.inflight.items())
        seen: set[tuple[int, int, int]] = set()
        for key, (op, t0, seq, step) in live:
            if t_now - t0 < limit:
                continue
            ident = (key, seq, t0)
            seen.add(ident)
            self._reported[ident] = (op, t0, seq, step)
            events.append(CollectiveWait(t=now, op=op, since=self._wall(t0), seq=seq, step=step))
        for ident in [i for i in self._reported if i not in seen]:
            op, t0, seq, step = self._reported.pop(ident)
            events.append(CollectiveWait(t=now, op=op, since=self._wall(t0), seq=seq, step=step, done=True))
        return events

    def _wall(self, t_ns: int) -> float:
        return self._wall0 + (t_ns - self._pc0) / 1e9
