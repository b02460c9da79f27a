"""Per-layer forward/backward time and memory around every module call (no user code change).

Hot path (every module call on a sampled step): ``_pre``/``_post``, called around each call by
``nn.Module.__call__`` as agent/roots.py replaces it (no torch hook: any global module hook would
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
"""

from __future__ import annotations

import contextlib
import functools
import operator
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

from llmtop.agent.instruments.budget import MAX_EVERY, Budget
from llmtop.agent.instruments.roots import RootCalls
from llmtop.agent.runtime import core
from llmtop.protocol.events import Anomaly, Event, LayerStats, Metric, ModelTree

_now = time.perf_counter_ns
_by_seq = operator.attrgetter("seq")
_HOLD = 1 << 40  # mute depth a muted() block adds: pre/post pairs inside never reach zero
_SLOT = "llmtop.layers"  # our key in autograd nodes' metadata
# until calibrated: a root call of an unsampled step (agent/roots.py), torch calling a Python hook
_ROOT_CALL_NS = 8000
_HOOK_CALL_NS = 1500
_OWN_KEPT = 4096  # accounted steps' costs kept for the step tracker
_ACCOUNT_NS = 20_000_000  # the longest the sampling rate waits for the agent thread's accounting


class _Acc:
    """One step's per-module accumulators, indexed by global module id."""

    __slots__ = ("fwd", "fwd_self", "calls", "bwd", "bwd_self", "act", "bwd_seen")

    def __init__(self, n: int) -> None:
        self.fwd = [0] * n
        self.fwd_self = [0] * n
        self.calls = [0] * n
        self.bwd = [0] * n
        self.bwd_self = [0] * n
        self.act = [0] * n
        self.bwd_seen = False

    def grow(self, n: int) -> None:
        extra = n - len(self.fwd)
        if extra > 0:
            for arr in (self.fwd, self.fwd_self, self.calls, self.bwd, self.bwd_self, self.act):
                arr.extend([0] * extra)


class _ThreadState:
    __slots__ = ("stack", "mute", "hold", "gen")

    def __init__(self, gen: int) -> None:
        self.stack: list[list[Any]] = []  # frames: [gid, t0, child_ns, mem0, rec, module]
        self.mute = 0  # >0 inside a forward re-run by autograd (activation checkpointing)
        self.hold = 0  # LayersInstrument.muted() depth on this thread
        self.gen = gen


class _Rec:
    """One module call's backward bookkeeping; referenced only by its autograd hooks."""

    __slots__ = ("gid", "parent", "seq", "start", "end", "kid_start", "kid_end", "kids", "task", "params")

    def __init__(self, gid: int, parent: _Rec | None, seq: int) -> None:
        self.gid = gid
        self.parent = parent
        self.seq = seq
        self.task = -2  # start, end, kid_start, kid_end and kids are set when its backward starts
        self.params = False  # end also waits for this module's own parameter gradients


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


class LayersInstrument:
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
        extra = self.options.extra
        self.call_cost_ns = float(extra.get("layer_call_ns", 0) or 0)  # one module call, sampled
        self.root_call_ns = float(extra.get("root_call_ns", 0) or _ROOT_CALL_NS)  # one root call, unsampled
        self.hook_call_ns = float(extra.get("hook_call_ns", 0) or _HOOK_CALL_NS)  # torch calling a hook
        self.budget = Budget(self.options.budget_pct)
        self.tracker_ns = 0  # the step tracker's own cost in the step now ending (it sets this)
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

    def module_ids(self) -> weakref.WeakKeyDictionary:
        """``nn.Module -> global id`` for every module seen so far (live modules only)."""
        out: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        for gid, ref in enumerate(list(self._mods)):
            mod = ref()
            if mod is not None:
                out[mod] = gid
        return out

    def module_paths(self) -> dict[int, str]:
        """``global id -> module path`` (path inside its model, "" for a root)."""
        return dict(enumerate(list(self._paths)))

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Module calls on this thread are not seen while inside (another instrument running a
        copy of a model, e.g. on meta tensors, on the agent thread). Nestable."""
        try:
            st = self._tls.st
        except AttributeError:
            st = self._state()
        st.hold += 1
        st.mute += _HOLD
        try:
            with self._rc.muted():
                yield
        finally:
            st.hold -= 1
            st.mute = max(st.hold * _HOLD, st.mute - _HOLD)

    def overhead_ns_last_step(self) -> int:
        """The hooks' estimated cost in the last step accounted (agent thread, at each ``poll``)."""
        return self._overhead_last

    def step_overhead_ns(self, step: int) -> int:
        """Agent thread: the hooks' estimated cost in step ``step`` (0 if it was never noted)."""
        with self._account_lock:
            self._account()
            return self._own_by_step.pop(step, 0)

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
        try:
            core.BUS.step_end.remove(self._on_step_end)
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
        """Per-layer timing on: ``_pre``/``_post`` around every module call (agent/roots.py)."""
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
            st.mute = st.hold * _HOLD
            st.gen = self._gen
        if st.mute:
            st.mute += 1
            return None
        stack = st.stack
        if stack:
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
            gid = self._new_root(module)
        return gid

    # ----------------------------------------------------------------- root calls (agent/roots.py)

    def _root_start(self, module: Any, t0: int) -> None:
        """Every root call, sampled or not: a model seen for the first time sends its tree."""
        if self._dead or id(module) in self._by_addr:
            return
        try:
            self._new_root(module)
        except Exception as exc:
            self._fail("root call", exc)

    def _root_done(self, module: Any, t0: int, t1: int) -> None:
        if self._dirty and not self._dead:
            gid = self._by_addr.get(id(module))
            if gid in self._dirty:
                self._dirty.discard(gid)
                try:
                    self._emit_tree(gid, module)
                except Exception as exc:
                    self._fail("root call", exc)

    def _root_error(self, module: Any) -> None:
        """A root call raised: an out-of-memory error is reported with the root, unless a module
        inside it (a sampled step) named it already."""
        gid = self._by_addr.get(id(module))
        if gid is not None and not self._dead:
            self._on_forward_error(module, gid)

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

    # ----------------------------------------------------------------- model discovery

    def _assign(self, module: Any, path: str, root_gid: int) -> int:
        gid = self._n
        self._n += 1
        addr = id(module)
        by_addr = self._by_addr

        def gone(_ref: Any, addr: int = addr, gid: int = gid) -> None:
            if by_addr.get(addr) == gid:
                del by_addr[addr]

        self._mods.append(weakref.ref(module, gone))
        self._paths.append(path)
        self._classes.append(type(module).__name__)
        self._root_of.append(root_gid if root_gid >= 0 else gid)
        self._param_end.append(0)
        by_addr[addr] = gid
        self._acc.grow(self._n)
        return gid

    def _new_module(self, module: Any, parent_gid: int, root_gid: int) -> int:
        """A module called inside a model but not in its tree (created late or held elsewhere)."""
        name = f"{self._paths[parent_gid]}.({type(module).__name__})".lstrip(".")
        gid = self._assign(module, name, root_gid)
        self._extra.setdefault(root_gid, []).append(gid)
        self._extra_parent[gid] = parent_gid
        self._dirty.add(root_gid)
        return gid

    def _new_root(self, module: Any) -> int:
        gid = self._by_addr.get(id(module))
        known = gid is not None  # part of a model already sent: no second tree for it
        if gid is None:
            gid = self._assign(module, "", -1)
        self._roots[gid] = self._next_model
        self._next_model += 1
        if not self._private and not known:
            self._emit_tree(gid, module)
        return gid

    def _emit_tree(self, root_gid: int, root: Any) -> None:
        # no torch.compile'd module can exist before dynamo is imported (importing it takes seconds)
        optimized = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", ())

        ids: list[int] = []
        paths: list[str] = []
        classes: list[str] = []
        params: list[int] = []
        parents: list[int] = []
        trainable: list[bool] = []
        dtypes: list[str] = []
        compiled: list[bool] = []
        by_path: dict[str, int] = {}
        for path, mod in root.named_modules():
            gid = self._by_addr.get(id(mod))
            if gid is None:
                gid = self._assign(mod, path, root_gid)
            elif gid in self._extra_parent and path:
                # first seen being called before it was in the tree: now it has a real path
                del self._extra_parent[gid]
                for extras in self._extra.values():
                    if gid in extras:
                        extras.remove(gid)
                self._paths[gid] = path
            by_path[path] = gid
            parent = -1 if path == "" else by_path.get(path.rpartition(".")[0], root_gid)
            own = list(mod.parameters(recurse=False))
            sizes: dict[str, int] = {}
            for p in own:
                key = str(p.dtype).removeprefix("torch.")
                sizes[key] = sizes.get(key, 0) + p.numel()
            # torch.compile(module) wraps it; module.compile() compiles it in place
            is_compiled = isinstance(mod, optimized) or getattr(mod, "_compiled_call_impl", None) is not None
            self._compiled_seen = self._compiled_seen or is_compiled
            ids.append(gid)
            paths.append(path)
            classes.append(type(mod).__name__)
            params.append(sum(p.numel() for p in own))
            parents.append(parent)
            trainable.append(any(p.requires_grad for p in own))
            dtypes.append(max(sizes, key=sizes.__getitem__) if sizes else "")
            compiled.append(is_compiled)
        for gid in self._extra.get(root_gid, []):
            if gid in ids:
                continue
            ids.append(gid)
            paths.append(self._paths[gid])
            classes.append(self._classes[gid])
            params.append(0)
            parents.append(self._extra_parent.get(gid, root_gid))
            trainable.append(False)
            dtypes.append("")
            compiled.append(False)
        self.ctx.emit(
            ModelTree(
                model=self._roots[root_gid],
                name=type(root).__name__,
                ids=ids,
                paths=paths,
                classes=classes,
                params=params,
                parents=parents,
                trainable=trainable,
                dtypes=dtypes,
                compiled=compiled,
            )
        )

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
        try:
            if self.ctx is not None:
                self.ctx.warn("layers", f"per-layer hooks disabled after an error in the {where}: {exc!r}")
        except Exception:
            pass

    # ----------------------------------------------------------------- steps and sampling

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
            marks.append((step, t_end_ns, acc, rc.calls, rc.listeners_ns, fired[0], self.tracker_ns,
                          self._extra_ns))
            rc.calls = rc.listeners_ns = fired[0] = self._extra_ns = self.tracker_ns = 0
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
                # root-call detection (agent/roots.py); parameter hooks exist only while timing is
                # on: a late backward of a sampled step
                roots = int(calls * self.root_call_ns)
                self.budget.observe(step_ns, fixed + roots + params, False)
                own = shared + roots + params
            self._overhead_last = own_by_step[step] = own + self.agent_ns
            if self._auto and self.budget.due(acc is not None):
                self.current_every = self.budget.update()
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

    def _cuda_ready(self) -> bool:
        try:
            return bool(self._torch.cuda.is_initialized())
        except Exception:
            return False

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

    def _compile_metrics(self, now: float) -> list[Event]:
        """torch.compile's total compile time and recompilations (frames compiled again)."""
        try:
            from torch._dynamo.utils import compilation_time_metrics
        except Exception:
            return []
        compile_s = float(sum(sum(v) for v in list(compilation_time_metrics.values())))
        try:  # per-frame compile counts: a count above one is a recompilation
            from torch._dynamo.convert_frame import FRAME_COMPILE_COUNTER

            recompiles = float(sum(n - 1 for n in list(FRAME_COMPILE_COUNTER.values()) if n > 1))
        except Exception:
            recompiles = -1.0
        if (compile_s, recompiles) == self._compile_last:
            return []
        self._compile_last = (compile_s, recompiles)
        step = self._ctx_step()
        out: list[Event] = [Metric(name="compile_time_s", value=compile_s, t=now, step=step)]
        if recompiles >= 0:
            out.append(Metric(name="recompilations", value=recompiles, t=now, step=step))
        return out

    def _calibrate(self) -> tuple[float, float, float]:
        """What these hooks cost on this machine, in ns, from paired runs of a tiny model:
        (one module call on a sampled step, forward and backward; one root call on an unsampled
        step; torch calling one Python hook). CPU time of this thread, so other programs on the
        machine do not count; each side keeps its fastest run."""
        import torch

        probe = LayersInstrument(self.options, _private=True)
        model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(16)])
        one = torch.nn.Linear(4, 4)
        x = torch.randn(2, 4, requires_grad=True)
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
