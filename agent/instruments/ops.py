"""Hot aten ops: a profiler window of one step in N, processed off the hot path.

On the user's thread the instrument only starts the profiler at one step boundary and stops it at
the next (``core.BUS.step_end``); everything else (parsing the events, grouping by op and input
shapes, FLOPs from ``flops.FORMULAS``) runs on the agent thread in ``poll()``, keeps the top K rows
and drops the trace. On CPU the autograd profiler records CPU ops only (``use_kineto=False``, still
Kineto underneath in torch 2.x); with CUDA, Kineto records device time as well. See
``OpsInstrument`` for why one window at a time, and ``_kineto_env`` for why the first on the main
thread.

Profiles are of training steps, never of evaluations: an evaluation between training steps ends
(``core.BUS.eval_end``) just as the training step it precedes starts, so a window open across it
is dropped and opened again there; and when the step tracker counts from 0 again (training after
inference records, which were an evaluation before training) a window opened before is dropped.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

from llmtop.agent.flops.op_formulas import PARENT_OPS, has_formula, op_flops
from llmtop.agent.instruments.budget import OPS_RESERVE
from llmtop.agent.runtime import core
from llmtop.protocol.events import Event, Ops

TOP_K = 30
FIRST_STEP = 2  # profile an early step too, so the Ops view fills before step N
# Share of the agent's overhead budget that op profiles may use (the layers' budget keeps it free,
# see agent/instruments/budget.py). On short steps "one step in N" alone would profile many times a second (a
# window costs the profiled step's slowdown plus parsing its trace), so a window also waits until
# the previous one's cost fits this share.
BUDGET_SHARE = OPS_RESERVE
_now = time.perf_counter_ns


class OpsInstrument:
    """Op profile windows whose lifetime is safe by construction.

    Kineto must not have a window recording while a finished window's result is read or freed on
    another thread: freeing a ``ProfilerResult`` while the next window records corrupts the heap
    (SIGSEGV in ``~MemoryTraceLogger``, ``free(): invalid next size``). So one token (a lock that
    is only ever tried, never waited for) is held from a window's start until the agent thread
    has read its events and freed its result: a window cannot open before the previous one is
    gone. A window that falls due while the token is held opens at the first step end after.
    """

    name = "ops"

    def __init__(self, options: core.Options | None = None) -> None:
        self.options = options or core.Options()
        self.every = int(self.options.ops_every or 0)
        self.top_k = int(self.options.ops_top_k or TOP_K)
        self.ctx: Any = None
        self._prof: Any = None  # the window in progress (user's thread owns start/stop)
        self._prof_step = -1
        self._prof_era = 0
        self._thread = 0
        # the token: held from a window's start until its result is read and freed (or dropped)
        self._token = threading.Lock()
        self._ready: tuple[int, Any, int] | None = None  # the closed window and its era, for poll() (token held)
        # step numbers start again from 0 once, when training follows inference records (an
        # evaluation before training): windows of the earlier era are dropped unread
        self._era = 0
        self._last_step: int | None = None
        self._due = False  # a window fell due while the token was held: open at the next chance
        self._dead = False
        self.windows = 0
        # budget: cost of the last window (ns, user thread + agent thread) and when the next may open
        self.share = max(1e-4, float(self.options.budget_pct) / 100.0 * BUDGET_SHARE)
        self._t_start = 0
        self.last_cost_ns = 0
        self.next_ok_ns = 0
        self.costs: deque[tuple[int, int]] = deque(maxlen=64)  # (window start ns, cost ns), for tests

    # --- Instrument contract ---------------------------------------------------------------------
    def install(self, ctx: core.Context) -> None:
        self.ctx = ctx
        if self.every <= 0:
            return
        import torch

        self._torch = torch
        _LIVE.add(self)
        _register_fork_hooks()
        core.BUS.step_end.append(self._on_step_end)
        core.BUS.eval_end.append(self._on_eval_end)

    def uninstall(self) -> None:
        self._dead = True
        if self._prof is not None and threading.get_ident() != self._thread:
            # A window is open on the step's thread: the profiler is stopped there, at its next
            # step end (stopping it from another thread would leave that thread recording).
            return
        self._close()

    def _close(self) -> None:
        """Unhook, and stop and free an open window: only on the window's own thread."""
        for lst, fn in ((core.BUS.step_end, self._on_step_end), (core.BUS.eval_end, self._on_eval_end)):
            try:
                lst.remove(fn)
            except ValueError:
                pass
        prof, self._prof = self._prof, None
        if prof is not None:
            try:
                prof.__exit__(None, None, None)
            except Exception:
                pass
            _free(prof)  # no window of ours can be open: the token is held until here
            self._token.release()

    def poll(self, now: float) -> list[Event]:
        out: list[Event] = []
        ready, self._ready = self._ready, None
        if ready is None:
            return out
        step, prof, era = ready
        t0 = _now()
        try:
            # summarizing a trace takes a while: the script's exit must not wait (it is dropped);
            # a window of the era before training started again from step 0 was an evaluation's
            if not getattr(self.ctx, "stopping", False) and era == self._era:
                out.append(summarize_window(prof, step, self.top_k))
        finally:
            _free(prof)  # read and freed before any other window may open: then the token goes
            del prof, ready
            self._token.release()
            t1 = _now()
            self._charge(t1 - t0, t1)
        return out

    def _charge(self, cost_ns: int, at_ns: int) -> None:
        """Add cost to the current window's bill; the next window waits until it fits the share."""
        self.last_cost_ns += cost_ns
        self.next_ok_ns = max(self.next_ok_ns, at_ns + int(self.last_cost_ns / self.share))
        if self.costs:
            self.costs[-1] = (self.costs[-1][0], self.last_cost_ns)

    # --- hot path: one start and one stop per window ---------------------------------------------
    def _on_step_end(self, step: int, t_end_ns: int) -> None:
        if self._dead:
            if self._prof is not None and threading.get_ident() == self._thread:
                self._close()
            return
        try:
            if step == 0 and self._last_step is not None:
                # the tracker counts from 0 again (only then does a step 0 follow another step end):
                # what was profiled before was no training
                self._era += 1
            self._last_step = step
            if self._prof is not None:
                if threading.get_ident() != self._thread:
                    return  # another thread's step: the window belongs to the starting thread
                prof, self._prof = self._prof, None
                prof.__exit__(None, None, None)
                # the agent thread reads, frees, and frees the token
                self._ready = (self._prof_step, prof, self._prof_era)
                self.windows += 1
                t = _now()
                # the whole profiled step counts: it ran slower under the profiler
                self.last_cost_ns = 0
                self.costs.append((self._t_start, 0))
                self._charge(t - self._t_start, t)
            nxt = step + 1
            if nxt == FIRST_STEP or (nxt % self.every == 0 and _now() >= self.next_ok_ns):
                self._due = True
            if self._due and not getattr(self.ctx, "stopping", False) and self._token.acquire(False):
                # (not while the agent stops: nobody would summarize the window)
                self._due = False
                try:
                    started = self._start(nxt)
                except BaseException:
                    self._token.release()
                    raise
                if not started:
                    self._token.release()
                    self._due = self._due or not _kineto_ready  # another thread may start Kineto
        except Exception as exc:  # fail open: disable, never raise into the step
            self._dead = True
            if threading.get_ident() == self._thread:
                self._close()
            self._warn(f"profiler window failed: {type(exc).__name__}: {exc}")

    def _start(self, step: int) -> bool:
        from torch.autograd import profiler

        self._t_start = _now()
        if self._torch.autograd._profiler_enabled():  # the user is profiling: stay out of the way
            return False
        first = not _kineto_ready
        if first and threading.current_thread() is not threading.main_thread():
            return False  # Kineto starts on the main thread (see _kineto_env)
        if self._torch.cuda.is_initialized():  # the script uses the GPU: record device time
            prof = profiler.profile(record_shapes=True, use_device="cuda", use_kineto=True)
        else:
            prof = profiler.profile(record_shapes=True, use_kineto=False)
        with _kineto_env(first):
            prof.__enter__()
        _started_kineto()
        self._prof, self._prof_step, self._thread = prof, step, threading.get_ident()
        self._prof_era = self._era
        if getattr(_THREAD, "closer", None) is None:
            # A thread that ends with a window open (its last step end opened one) would take the
            # profiler's thread state down with it, still recording, and the process dies at exit:
            # this object is dropped on the ending thread itself, and stops the window there.
            _THREAD.closer = _ThreadEnd()
        return True

    def _on_eval_end(self, step: int, t_end_ns: int) -> None:
        """An evaluation between training steps ended and training step ``step`` starts (the step
        tracker, on the step loop's thread): a window open since the last step end holds the
        evaluation's ops. It is dropped and opened again now, so the profile is the training step's."""
        if self._dead or self._prof is None or threading.get_ident() != self._thread:
            return
        try:
            self._before_fork()  # stop and free it here, then give the token back
            if self._token.acquire(False):
                try:
                    started = self._start(step)
                except BaseException:
                    self._token.release()
                    raise
                if not started:
                    self._token.release()
                    self._due = True
            else:
                self._due = True
        except Exception as exc:  # fail open: disable, never raise into the step
            self._dead = True
            self._warn(f"profiler window failed: {type(exc).__name__}: {exc}")

    def _before_fork(self) -> None:
        """On the forking thread: a window open here is stopped and dropped, so that the child
        (a DataLoader worker) does not start life inside a profiler it can never stop."""
        if self._prof is not None and threading.get_ident() == self._thread:
            prof, self._prof = self._prof, None
            try:
                prof.__exit__(None, None, None)
            except Exception:
                pass
            _free(prof)
            self._token.release()

    def _after_fork_in_child(self) -> None:
        self._dead = True  # the child has no agent; a window open on another thread is not here
        self._prof = self._ready = None

    def _warn(self, message: str) -> None:
        core.warn_safely(self.ctx, self.name, message)


class _ThreadEnd:
    """Kept in a ``threading.local``: freed on its thread when the thread ends."""

    def __del__(self) -> None:
        for inst in list(_LIVE):
            try:
                if inst._prof is not None and threading.get_ident() == inst._thread:
                    inst._before_fork()  # the same: stop and drop this thread's window
            except Exception:
                pass


_THREAD = threading.local()


def _free(prof: Any) -> None:
    """Free a finished window's native result now, on this thread: a profile object caught in a
    reference cycle would otherwise be freed by the garbage collector at any time, on any thread,
    maybe while another window records."""
    try:
        prof.kineto_results = None
        prof._function_events = prof._old_function_events = None
    except Exception:
        pass


# Instruments with live windows, for the fork hooks (registered once: they cannot be removed).
_LIVE: weakref.WeakSet[OpsInstrument] = weakref.WeakSet()
_fork_hooks = False
_kineto_ready = False


def _register_fork_hooks() -> None:
    global _fork_hooks
    if _fork_hooks:
        return
    _fork_hooks = True
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _before_fork() -> None:
    for inst in list(_LIVE):
        try:
            inst._before_fork()
        except Exception:
            pass


def _after_fork_in_child() -> None:
    for inst in list(_LIVE):
        inst._after_fork_in_child()


@contextlib.contextmanager
def _kineto_env(first: bool) -> Iterator[None]:
    """Around the first window, the one that starts Kineto (on the main thread, the one that
    imported torch: from another thread Kineto prints "External init callback must run in same
    thread as registerClient" on stderr). Kineto reads KINETO_LOG_LEVEL once, as it starts: set
    then, it keeps the "profiler_start/stop" lines of every later window off stderr, and no later
    window touches the environment (setenv racing getenv on another thread can crash)."""
    added = first and "KINETO_LOG_LEVEL" not in os.environ
    if added:
        os.environ["KINETO_LOG_LEVEL"] = "6"
    try:
        yield
    finally:
        if added:
            os.environ.pop("KINETO_LOG_LEVEL", None)


def _started_kineto() -> None:
    global _kineto_ready
    _kineto_ready = True


def summarize_window(prof: Any, step: int, top_k: int = TOP_K) -> Ops:
    """A finished window's Ops. A CPU-only window is read straight from the profiler's raw events
    (about 10x cheaper than torch building its ``FunctionEvent`` tree: 19 ms against 200 ms for a
    GPT-2 training step's 3 000 events here, all of it agent-thread time that holds the GIL while
    the script waits for it); a window with device events goes through torch's own parse."""
    raw = getattr(prof, "kineto_results", None)
    if raw is not None:
        try:
            rows = cpu_op_rows(raw.events())
        except Exception:  # another torch's raw event API: torch's parse below
            rows = None
        if rows is not None:
            return summarize_rows(rows, step, top_k)
    return summarize(prof.function_events, step, top_k)


def cpu_op_rows(events: Any) -> list[tuple[str, float, list, list]] | None:
    """(name, self µs, input shapes, concrete inputs) of each aten op in raw profiler events, or
    None when any event is not a CPU one (device time needs torch's correlation of kernels).

    Self time is the op's duration less its direct children's, children being the events that
    start and end inside it on the same thread, as torch computes ``self_cpu_time_total``; and as
    torch does, an op whose only child has its own name (an overload calling another) is one op.
    """
    spans: list[tuple[int, int, int, int, Any]] = []  # (thread, start, -duration, index, event)
    for i, e in enumerate(events):
        if e.device_type().name != "CPU":
            return None
        if e.is_async():
            continue
        spans.append((e.start_thread_id(), e.start_ns(), -e.duration_ns(), i, e))
    spans.sort(key=lambda x: x[:4])  # a parent before the children it contains
    n = len(spans)
    names = [sp[4].name() for sp in spans]
    self_ns = [-sp[2] for sp in spans]
    parent = [-1] * n
    kids = [0] * n
    stack: list[tuple[int, int, int]] = []  # (thread, end, position) of the open ancestors
    for j, (tid, start, neg_dur, _, _) in enumerate(spans):
        while stack and (stack[-1][0] != tid or stack[-1][1] <= start):
            stack.pop()
        if stack:
            p = parent[j] = stack[-1][2]
            self_ns[p] += neg_dur
            kids[p] += 1
        stack.append((tid, start - neg_dur, j))
    gone = [False] * n
    for j in range(n - 1, -1, -1):  # deepest first, so chains fold into their top
        p = parent[j]
        if p >= 0 and kids[p] == 1 and names[p] == names[j]:
            self_ns[p] += self_ns[j]
            kids[p] = kids[j]
            gone[j] = True
    rows = []
    for j, sp in enumerate(spans):
        if not gone[j] and names[j].startswith("aten::"):
            e = sp[4]
            rows.append((names[j], max(0, self_ns[j]) / 1e3, e.shapes() or [], e.concrete_inputs() or []))
    return rows


def summarize(events: Any, step: int, top_k: int = TOP_K) -> Ops:
    """Ops from torch's parsed ``FunctionEvent`` list (device self time when it has some)."""
    rows = []
    for e in events:
        name = e.name
        if not name.startswith("aten::"):
            continue
        dev_us = getattr(e, "self_device_time_total", 0) or 0
        rows.append((name, float(dev_us or e.self_cpu_time_total), e.input_shapes or [],
                     list(getattr(e, "concrete_inputs", None) or [])))
    return summarize_rows(rows, step, top_k)


def summarize_rows(ops: list[tuple[str, float, list, list]], step: int, top_k: int = TOP_K) -> Ops:
    """Group a window's aten ops by (op, input shapes): self time, calls, FLOPs; top K by time."""
    rows: dict[tuple[str, str], list[Any]] = {}
    total = covered = 0.0
    for name, self_us, input_shapes, values in ops:
        shapes = [list(s) if s else None for s in input_shapes]
        key = (name, "; ".join("x".join(map(str, s)) for s in shapes if s))
        row = rows.get(key)
        if row is None:
            row = rows[key] = [0.0, 0, 0.0]
        row[0] += self_us
        row[1] += 1
        if name not in PARENT_OPS:
            fl = op_flops(name, [s if s else None for s in shapes], list(values))
            row[2] += fl or 0.0
        total += self_us
        if has_formula(name):
            covered += self_us
    top = sorted(rows.items(), key=lambda kv: -kv[1][0])[:top_k]
    return Ops(
        step=step,
        total_ms=total / 1e3,
        rows=len(rows),
        names=[k[0] for k, _ in top],
        self_ms=[v[0] / 1e3 for _, v in top],
        calls=[v[1] for _, v in top],
        flops=[v[2] for _, v in top],
        shapes=[k[1] for k, _ in top],
        coverage=covered / total if total else None,
    )
