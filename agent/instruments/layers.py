"""Per-layer forward/backward time and memory around every module call (no user code change).

Hot path (every module call on a sampled step): ``_pre``/``_post``, called around each call by
``nn.Module.__call__`` as agent/instruments/roots.py replaces it (no torch hook: any global module hook would
send every call through torch's slow path), take a ``perf_counter_ns`` timestamp, push/pop a
per-thread stack of small frames and add into preallocated per-module lists indexed by global
module id. Nothing is locked, encoded or sent.

Backward: when grad is enabled, the forward pre-hook puts an autograd node pre-hook on the
``grad_fn`` of every input that needs grad (the module's backward *ends* when that node is about
to run, i.e. the input's gradient is complete), and the forward post-hook puts one on the
``grad_fn`` of every output that needs grad (its backward *starts* when the first of those runs).
Hooking the nodes captured before the forward ran keeps this right with in-place ops
(``ReLU(inplace=True)`` rewrites its input's ``grad_fn``; the node captured earlier is still in
the graph), and needs no ``BackwardHookFunction`` wrapper (full backward hooks break on in-place
ops and register state even under ``no_grad``). Modules whose inputs need no grad end when
their own parameters' gradients arrive (one hook per parameter while timing is on) or their
last child ends. One record per module call lives only in its nodes' slots, so it dies with the
graph; at the end of each backward (``queue_callback``) the records of that graph task are turned
into inclusive and self times. See docs/ARCHITECTURE.md, "Layer hooks".

Sampling: per-layer timing is taken on every Nth step; on the other steps module calls cost only
roots.py's depth count. Root calls, on every step, are announced on the bus by roots.py. Nothing
stays registered on the user's modules, so copying or pickling a model is unaffected.

Split by concern: this module is the instrument and its hot path (forward frames, autograd node
hooks, the backward's records); the module registry and model trees are in layer_registry.py, cost
accounting, sampling and calibration in layer_costs.py (both mixins of ``LayersInstrument``), the
accumulators and records in layer_state.py. It stays above 500 lines because the forward and
backward halves are one hot path sharing one thread state and one record per call: split, every
per-call hook would read its state through one more object.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from llmtop.agent.instruments import layer_costs
from llmtop.agent.instruments.budget import Budget
from llmtop.agent.instruments.gpu_timing import cuda_ready
from llmtop.agent.instruments.layer_costs import _HOOK_CALL_NS, _ROOT_CALL_NS, LayerCosts
from llmtop.agent.instruments.layer_registry import LayerRegistry
from llmtop.agent.instruments.layer_state import _Acc, _Rec, _ThreadState
from llmtop.agent.instruments.roots import HOLD, RootCalls, is_model
from llmtop.agent.runtime import core
from llmtop.protocol.events import Anomaly, Event, LayerStats

_now = time.perf_counter_ns
_by_seq = operator.attrgetter("seq")
_SLOT = "llmtop.layers"  # our key in autograd nodes' metadata

_Tensor: Any = type(None)  # torch.Tensor once installed (torch is imported lazily)


def _grad_nodes(obj: Any, out: list[Any], depth: int = 0) -> None:
    """Collect distinct ``grad_fn`` nodes of tensors that need grad in args/outputs.

    Looks through tuples, lists and dicts (HF ``ModelOutput`` is a dict) a few levels deep.
    """
    if isinstance(obj, _Tensor):
        if obj.requires_grad:
            fn = obj.grad_fn
            if fn is not None and fn not in out:
                out.append(fn)
    elif depth < 3:
        if isinstance(obj, (tuple, list)):
            for item in obj:
                _grad_nodes(item, out, depth + 1)
        elif isinstance(obj, dict):
            for item in obj.values():
                _grad_nodes(item, out, depth + 1)


def _child_of(parent: Any, module: Any) -> bool:
    """Is ``module`` registered under ``parent`` (not a module the forward builds and drops)?"""
    return any(m is module for m in parent._modules.values())


class LayersInstrument(LayerRegistry, LayerCosts):
    """Global module hooks: model trees, per-layer forward/backward time, activation memory."""

    name = "layers"

    def __init__(self, options: core.Options | None = None, *, _private: bool = False) -> None:
        self.options = options or core.Options()
        self._private = _private  # calibration instance: no bus, no events
        self.ctx: Any = None
        self._dead = False
        self._installed = False
        # module registry (ids unique across every model of the session)
        self._by_addr: dict[int, int] = {}  # id(module) -> gid, entries dropped when it dies
        self._mods: list[Any] = []  # gid -> weakref to the module
        self._paths: list[str] = []  # gid -> path inside its model ("" for a root)
        self._classes: list[str] = []
        self._root_of: list[int] = []  # gid -> gid of the root it was first seen under
        self._n = 0
        self._roots: dict[int, int] = {}  # gid of a root -> model id
        self._rc = RootCalls(self._root_start, self._root_done, self._root_error, bus=not _private)
        self._dirty: set[int] = set()  # root gids whose tree changed
        self._extra: dict[int, list[int]] = {}  # root gid -> modules called but not in named_modules
        self._extra_parent: dict[int, int] = {}
        self._next_model = 0
        self._param_hooked: set[int] = set()
        self._param_handles: list[Any] = []
        self._param_end: list[int] = []
        self._compiled_seen = False
        self._compile_last: tuple[float, float] = (-1.0, -1.0)
        # hooks and steps
        self._tls = threading.local()
        self._gen = 0
        self._timing = False
        self._acc = _Acc(0)
        self._ready: deque[tuple[int, _Acc, bool]] = deque()
        self._tasks: dict[int, list[_Rec]] = {}
        self._seq = 0
        self._sampled = True
        self._steps_seen = 0
        self._last_end_ns = 0
        self._cuda = False
        self._oom_seen: int | None = None
        # cost accounting (ns); the costs are calibrated at install (see _calibrate)
        opts = self.options
        self.call_cost_ns = float(opts.layer_call_ns or 0)  # one module call, sampled
        self.root_call_ns = float(opts.root_call_ns or _ROOT_CALL_NS)  # one root call, unsampled
        self.hook_call_ns = float(opts.hook_call_ns or _HOOK_CALL_NS)  # torch calling a hook
        self.budget = Budget(self.options.budget_pct)
        self.agent_ns = 0  # the agent thread's CPU time per step (per tick, smoothed over ticks)
        self._agent_mark = (0, 0.0)  # (steps seen, agent thread CPU seconds) at the last tick seen
        self._param_fired = [0]  # calls of the parameter hooks since the last step end
        self._extra_ns = 0
        self._overhead_last = 0
        # steps ended and not yet accounted: the hot path only notes them (_on_step_end); the
        # agent thread feeds the budget and works out each step's cost (_account)
        self._marks: deque[tuple] = deque()
        self._own_by_step: dict[int, int] = {}  # accounted steps' cost, until the step tracker asks
        self._account_lock = threading.Lock()  # the step loop's thread or the agent thread accounts
        fixed = int(self.options.layer_every or 0)
        self._auto = fixed <= 0
        self.current_every = 1 if self._auto else fixed

    # ----------------------------------------------------------------- public, for other helpers

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Module calls on this thread are not seen while inside (another instrument running a
        copy of a model, e.g. on meta tensors, on the agent thread). Nestable."""
        try:
            st = self._tls.st
        except AttributeError:
            st = self._state()
        st.hold += 1
        st.mute += HOLD
        try:
            with self._rc.muted():
                yield
        finally:
            st.hold -= 1
            st.mute = max(st.hold * HOLD, st.mute - HOLD)
    # ----------------------------------------------------------------- Instrument contract

    def install(self, ctx: core.Context) -> None:
        import torch

        global _Tensor
        _Tensor = torch.Tensor
        self._torch = torch
        self._nnm = torch.nn.modules.module
        self._grad_enabled = torch.is_grad_enabled
        self._task_id = torch._C._current_graph_task_id
        self._engine = torch.autograd.Variable._execution_engine
        self._oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(
            torch.cuda, "OutOfMemoryError", RuntimeError
        )
        self.ctx = ctx
        if not self._private and not self.call_cost_ns:
            self.call_cost_ns, self.root_call_ns, self.hook_call_ns = self._calibrate()
        self._cuda = self._cuda_ready()
        if not self._private:
            core.BUS.step_end.append(self._on_step_end)
            core.BUS.detail = self._sampled
            costs = core.BUS.costs
            costs.every, costs.hook_ns = self.current_every, int(self.hook_call_ns)
            costs.of_step = self.step_overhead_ns
            core.BUS.eval_end.append(self._on_eval_end)
        self._installed = True
        self._rc.install(torch)
        if self._sampled:
            self._timing_on()

    def uninstall(self) -> None:
        self._installed = False
        self._unhook()
        self._rc.uninstall()
        if not self._private:
            core.BUS.detail = True
            core.BUS.costs.of_step = None
        try:
            core.BUS.step_end.remove(self._on_step_end)
        except ValueError:
            pass
        try:
            core.BUS.eval_end.remove(self._on_eval_end)
        except ValueError:
            pass

    def _unhook(self) -> None:
        """Per-layer timing off for good. Root calls are still announced (the step tracker needs
        them) and the bus listener stays."""
        self._timing_off()

    def poll(self, now: float) -> list[Event]:
        events: list[Event] = []
        with self._account_lock:
            self._account()
        if not (self._steps_seen or core.BUS.root_forward or self._dead) and any(self._acc.calls):
            # Nobody will end steps (no step tracker listening, none ever ended): flush per tick.
            acc, self._acc = self._acc, _Acc(self._n)
            self._ready.append((self._ctx_step(), acc, self._cuda))
        while self._ready:
            step, acc, cuda = self._ready.popleft()
            ev = self._table(step, acc, cuda)
            if ev is not None:
                events.append(ev)
        if self._compiled_seen:
            events.extend(self._compile_metrics(now))
        return events

    # ----------------------------------------------------------------- per-call timing on/off

    def _timing_on(self) -> None:
        """Per-layer timing on: ``_pre``/``_post`` around every module call (agent/instruments/roots.py)."""
        if self._timing or self._dead or not self._installed:
            return
        self._gen += 1  # frames left by an earlier period are stale
        self._timing = True
        self._rc.each = (self._pre, self._post)

    def _timing_off(self) -> None:
        """Per-layer timing off: module calls cost only root detection, and the parameter hooks
        go too (torch would call them on every unsampled backward); sampled steps re-add them."""
        if not self._timing:
            return
        self._timing = False
        self._rc.each = None
        for h in self._param_handles:
            h.remove()
        self._param_handles.clear()
        self._param_hooked.clear()

    def _state(self) -> _ThreadState:
        st = _ThreadState(self._gen)
        self._tls.st = st
        return st

    def _pre(self, module: Any, args: tuple) -> None:
        try:
            try:
                st = self._tls.st
            except AttributeError:
                st = self._state()
            if not self._sampled:
                return  # per-layer timing went off as this call began
            stack = st.stack
            gid = self._by_addr.get(id(module))
            if gid is None or not stack or st.mute or st.gen != self._gen:
                gid = self._pre_slow(module, args, st, gid)
                if gid is None:
                    return
            rec = None
            if self._grad_enabled():
                self._seq += 1
                rec = _Rec(gid, stack[-1][4] if stack else None, self._seq)
                if len(args) == 1 and isinstance(args[0], _Tensor):
                    # the common case inline: one tensor, whose node the previous call's
                    # post-hook has usually hooked already
                    fn = args[0].grad_fn
                    if fn is None:
                        self._need_params(module, gid, rec)
                    else:
                        slot = fn.metadata.get(_SLOT)
                        if slot is None:
                            slot = self._new_slot(fn)
                        slot[1].append(rec)
                else:
                    self._track(module, gid, rec, args)
            frame = [gid, 0, 0, self._torch.cuda.memory_allocated() if self._cuda else -1, rec, module]
            stack.append(frame)
            frame[1] = _now()  # last, so this hook's own work is not charged to the module
        except Exception as exc:  # fail open
            self._fail("forward pre-hook", exc)

    def _pre_slow(self, module: Any, args: tuple, st: _ThreadState, gid: int | None) -> int | None:
        """New module, model root, stale or muted thread state. None: do not time this call."""
        if st.gen != self._gen:  # hooks were re-added: frames of the old period are stale
            st.stack.clear()
            st.mute = st.hold * HOLD
            st.gen = self._gen
        if st.mute:
            st.mute += 1
            return None
        stack = st.stack
        if stack:
            if gid is None and not is_model(module) and not _child_of(stack[-1][5], module):
                st.mute = 1  # a loss module made in each forward: no tree row per call (agent/instruments/roots.py)
                return None
            return self._new_module(module, stack[-1][0], stack[0][0]) if gid is None else gid
        root, rt0 = self._rc.current()
        if root is not None and root is not module:
            # Inside a root whose call began before these hooks were added (a step ended as
            # this root started): open the root's frame from its own start, so this step's
            # forward is timed after all (the root gets no backward row).
            rgid = self._by_addr.get(id(root))
            if rgid is None:
                return None
            stack.append([rgid, rt0, 0, -1, None, root])
            return self._new_module(module, rgid, rgid) if gid is None else gid
        if self._task_id() != -1:
            # a forward re-run inside backward (activation checkpointing): its cost belongs to
            # the enclosing module's backward, not to a new model
            st.mute = 1
            return None
        if gid is None or gid not in self._roots:
            if not is_model(module):
                st.mute = 1  # a loss module called on its own: no model, no tree (agent/instruments/roots.py)
                return None
            gid = self._new_root(module)
        return gid
    # ----------------------------------------------------------------- per-layer records

    def _track(self, module: Any, gid: int, rec: _Rec, args: tuple) -> None:
        """Grad is on: hook this call's record on its inputs' nodes (any arguments)."""
        nodes: list[Any] = []
        for a in args:
            _grad_nodes(a, nodes)
        if nodes:
            self._hook_nodes(nodes, rec, 1)
        else:
            self._need_params(module, gid, rec)

    def _post(self, module: Any, args: tuple, *rest: Any) -> None:
        t1 = _now()
        try:
            try:
                st = self._tls.st
            except AttributeError:
                return
            if st.gen != self._gen or not self._sampled:
                return
            if st.mute:
                st.mute -= 1
                return
            stack = st.stack
            if not stack:
                return
            if stack[-1][5] is not module and not self._resync(stack, module):
                return
            gid, t0, kids, mem0, rec, _ = stack.pop()
            dt = t1 - t0
            acc = self._acc
            acc.fwd[gid] += dt
            acc.fwd_self[gid] += dt - kids
            acc.calls[gid] += 1
            if stack:
                stack[-1][2] += dt
            if mem0 >= 0:
                acc.act[gid] += self._torch.cuda.memory_allocated() - mem0
            if len(rest) == 1:  # forward raised
                self._on_forward_error(module, gid)
                return
            if rec is None:
                return
            out = rest[1]
            if isinstance(out, _Tensor):  # the common case inline
                fn = out.grad_fn
                if fn is None:
                    return
                slot = fn.metadata.get(_SLOT)
                if slot is None:
                    slot = self._new_slot(fn)
                slot[0].append(rec)
                nodes: list[Any] = [fn]
            else:
                nodes = []
                _grad_nodes(out, nodes)
                if not nodes:
                    return
                self._hook_nodes(nodes, rec, 0)
            if rec.params and rest[0]:
                self._hook_kwargs(rec, rest[0], nodes)
        except Exception as exc:
            self._fail("forward hook", exc)

    def _hook_kwargs(self, rec: _Rec, kwargs: dict, out_nodes: list[Any]) -> None:
        """Inputs passed by keyword are only visible after the call (the pre-hook gets no
        kwargs): hook them late rather than not at all."""
        nodes: list[Any] = []
        _grad_nodes(kwargs, nodes)
        nodes = [n for n in nodes if n not in out_nodes]
        if nodes:
            rec.params = False
            self._hook_nodes(nodes, rec, 1)

    def _resync(self, stack: list[list[Any]], module: Any) -> bool:
        """The top frame is not this module's (a hook was skipped): drop frames above its own."""
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][5] is module:
                del stack[i + 1 :]
                return True
        return False

    # ----------------------------------------------------------------- backward

    def _hook_nodes(self, nodes: list[Any], rec: _Rec, kind: int) -> None:
        """Attach ``rec`` to autograd nodes; one pre-hook per node, whatever many modules use it.

        Every module whose boundary is at a node sees the same timestamp (the end of one module
        and the start of the next are the same instant), so sibling windows never overlap.
        The per-node slot lives in the node's own ``metadata`` and dies with the graph.
        ``kind`` 0: the module's backward starts at these nodes; 1: it ends there.
        """
        for node in nodes:
            slot = node.metadata.get(_SLOT)
            if slot is None:
                slot = self._new_slot(node)
            slot[kind].append(rec)

    def _new_slot(self, node: Any) -> tuple[list[_Rec], list[_Rec]]:
        """The node's (starts, ends) records, kept in its own metadata, and its one pre-hook."""
        slot: tuple[list[_Rec], list[_Rec]] = ([], [])
        node.metadata[_SLOT] = slot
        node.register_prehook(functools.partial(self._on_node, slot))
        return slot

    def _on_node(self, slot: tuple[list[_Rec], list[_Rec]], grad_outputs: Any) -> None:
        """Autograd is about to run a hooked node: records ending here end, those starting start."""
        t = _now()
        try:
            if self._dead:
                return
            starts, ends = slot
            for r in ends:
                r.end = t
            if starts:
                tid = self._task_id()
                for r in starts:
                    if r.task == tid:
                        continue
                    r.task = tid
                    r.start = t
                    r.end = r.kid_start = r.kid_end = r.kids = 0
                    lst = self._tasks.get(tid)
                    if lst is None:
                        lst = self._tasks[tid] = []
                        self._engine.queue_callback(lambda: self._finish_task(tid))
                    lst.append(r)
        except Exception as exc:
            self._fail("backward hook", exc)

    def _need_params(self, module: Any, gid: int, rec: _Rec) -> None:
        """No input needs grad: this call's backward ends with its own parameters' gradients."""
        if gid not in self._param_hooked:
            self._param_hooked.add(gid)
            for p in module.parameters(recurse=False):
                if p.requires_grad and p.grad_fn is None:
                    self._param_handles.append(p.register_hook(self._param_hook(gid)))
        rec.params = True

    def _param_hook(self, gid: int) -> Any:
        param_end = self._param_end
        fired = self._param_fired  # torch's calls of these hooks are counted for the budget

        def hook(grad: Any) -> None:
            param_end[gid] = _now()
            fired[0] += 1

        return hook

    def _finish_task(self, tid: int) -> None:
        """End of one backward: turn its module-call records into inclusive and self times."""
        t0 = _now()
        try:
            recs = self._tasks.pop(tid, None)
            if not recs or self._dead:
                return
            acc = self._acc
            acc.grow(self._n)
            acc.bwd_seen = True
            param_end = self._param_end
            recs.sort(key=_by_seq, reverse=True)  # children before their parents
            for r in recs:
                # A parent's window covers its children's: a child's output is often the very
                # tensor the parent returns, and its hook on that node ran first.
                start = min(r.start, r.kid_start) if r.kid_start else r.start
                end = max(r.end, r.kid_end)
                if r.params:
                    pe = param_end[r.gid]
                    if pe > r.start:
                        end = max(end, pe)
                if end == 0 and r.parent is None:
                    end = t0  # a root with no end signal of its own (compiled): the task's end
                if end < start:
                    end = start
                incl = end - start
                acc.bwd[r.gid] += incl
                acc.bwd_self[r.gid] += incl - r.kids
                p = r.parent
                if p is not None and p.task == tid:
                    p.kids += incl
                    if end > p.kid_end:
                        p.kid_end = end
                    if not p.kid_start or start < p.kid_start:
                        p.kid_start = start
        except Exception as exc:
            self._fail("backward", exc)
        finally:
            self._extra_ns += _now() - t0
    # ----------------------------------------------------------------- errors

    def _on_forward_error(self, module: Any, gid: int) -> None:
        exc = sys.exc_info()[1]
        if exc is None or not isinstance(exc, self._oom_type) or self._private:
            return
        if self._oom_seen == id(exc):  # the innermost module already named it
            return
        self._oom_seen = id(exc)
        root = self._root_of[gid]
        path = self._paths[gid] or type(module).__name__
        model = type(self._mods[root]() or module).__name__ if root != gid else ""
        where = f"{model}.{path}" if model else path
        self.ctx.emit(
            Anomaly(
                t=time.time(),
                what="oom",
                message=f"out of memory in {where} ({type(module).__name__}): {str(exc).splitlines()[0][:200]}",
                step=self._ctx_step(),
                severity="error",
            )
        )

    def _fail(self, where: str, exc: BaseException) -> None:
        if self._dead:
            return
        self._dead = True
        try:
            # not uninstall(): the bus may be iterating its listeners right now (a step end)
            self._unhook()
        except Exception:
            pass
        core.warn_safely(self.ctx, "layers", f"per-layer hooks disabled after an error in the {where}: {exc!r}")

    def _cuda_ready(self) -> bool:
        return cuda_ready()

    def _ctx_step(self) -> int:
        return int(getattr(self.ctx, "current_step", 0) or 0)

    # ----------------------------------------------------------------- agent-thread work

    def _table(self, step: int, acc: _Acc, cuda: bool) -> LayerStats | None:
        n = min(len(acc.calls), self._n)
        ids = [g for g in range(n) if acc.calls[g] or acc.bwd[g]]
        if not ids:
            return None
        bwd = acc.bwd_seen
        return LayerStats(
            step=step,
            ids=ids,
            fwd_ms=[acc.fwd[g] / 1e6 for g in ids],
            fwd_self_ms=[acc.fwd_self[g] / 1e6 for g in ids],
            calls=[acc.calls[g] for g in ids],
            bwd_ms=[acc.bwd[g] / 1e6 for g in ids] if bwd else [],
            bwd_self_ms=[acc.bwd_self[g] / 1e6 for g in ids] if bwd else [],
            act_bytes=[acc.act[g] for g in ids] if cuda else [],
        )


layer_costs.LayersInstrument = LayersInstrument  # the calibration runs a private one
