"""Live per-layer FLOPs and bytes: once per model and input-shape signature, off the hot path;
and the FLOPs of exactly the calls each sampled step timed.

Hot path (``core.BUS.root_forward_start``, at the start of each model-root call, on detailed steps
only): the input shapes, dtypes and plain values are turned into a hashable signature (a
transformers KV cache by its per-layer key/value shapes, its past length bucketed: see
``agent/flops/signatures.py``); the call is noted (start time, model, signature) and a new
signature is queued with a weak reference to the model. No tensor is copied or kept. Step ends
(``BUS.step_end``) are noted too.

Agent thread (``poll``): the model is deep-copied with every parameter and buffer replaced by a
meta tensor (no weights copied), run once on meta inputs of the queued shapes (both rebuilt by
``agent/flops/meta_rebuild.py``) under the counters of ``agent/flops/counting.py``, and the
per-module costs are joined to the layers instrument's module ids into one ``LayerFlops`` event
(``method="meta"``). When the meta copy cannot run (a kernel hub layer, data-dependent code), the
next detailed call with that signature is counted as it runs on the script's thread
(``method="sampled-forward"``): the dispatch-mode counter only observes, so results, RNG and grad
are untouched; that one call is slower.

Then each ended step with noted calls gets a ``StepFlops`` event: per module, the sum over its
calls of their own signature's counted FLOPs, so FLOP/s = those FLOPs / that step's timed forward
(the viewer divides, by the same step's ``LayerStats``). Peaks come from ``roofline.py``.

Calls of an evaluation between training steps (``BUS.eval_end``) are no step's: they are dropped,
and the next step's time starts where the evaluation ended, as its ``Step`` does. When the step
tracker counts from 0 again (training after inference records: an evaluation before training),
steps of the earlier numbering still waiting for a count are dropped, so no ``StepFlops`` of that
evaluation comes after the first training step with a number a training step has too.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from typing import Any

from llmtop.agent.flops.meta_rebuild import _rebuild, meta_copy, unwrap
from llmtop.agent.flops.signatures import autocast_dtype, describe, signature
from llmtop.agent.runtime import core
from llmtop.protocol.events import Event, LayerFlops, StepFlops

MAX_SIGNATURES = 64  # per model: prompts of new lengths and decode past-length buckets, then it stops
MIN_INTERVAL_S = 1.0  # at most one count per second: each holds the GIL on the agent thread
COUNTED_KEPT = 256  # counted (model, signature) tables kept for the per-step sums
CALLS_KEPT = 8192  # noted root calls not yet given to a step
PENDING_STEPS = 32  # ended steps waiting for their signatures to be counted
BACKWARD_FACTOR = 2.0  # backward FLOPs per forward FLOP (dgrad + wgrad: the usual 6N convention)


def _layers_instrument() -> Any:
    """The running layers instrument (``layers.LayersInstrument``), found on the agent."""
    agent = core.ACTIVE
    for inst in list(getattr(agent, "_instruments", []) or []):
        if getattr(inst, "name", "") == "layers" and hasattr(inst, "module_ids"):
            return inst
    return None


class _Counted:
    """One counted (model, signature): per module id, its FLOPs and bytes in one root call."""

    __slots__ = ("flops", "bytes", "root_flops", "method")

    def __init__(self, flops: dict[int, float], nbytes: dict[int, float], root_flops: float,
                 method: str) -> None:
        self.flops, self.bytes, self.root_flops, self.method = flops, nbytes, root_flops, method


class FlopsInstrument:
    name = "flops"

    def __init__(self, options: core.Options | None = None, layers: Any = None) -> None:
        self.options = options or core.Options()
        self.layers = layers  # the layers instrument; found on the running agent when None
        self.ctx: Any = None
        self._seen: dict[int, set] = {}  # id(model) -> signatures queued
        self._refused: set[tuple[int, tuple]] = set()  # (id(model), signature) beyond MAX_SIGNATURES
        self._queue: deque[tuple[Any, tuple]] = deque(maxlen=64)
        self._dead = False
        self._installed = False
        self.computed = 0
        self._torch: Any = None
        self.min_interval_s = MIN_INTERVAL_S
        self._last = -1e9
        self._peaks_known = False  # the CPU's peaks measured or read at the first tick
        self.device: Any = None  # overrides the device lookup (tests, --device)
        # per-step sums: root calls noted on the hot path, step ends, counted tables
        self._calls: deque[tuple[int, int, tuple, bool]] = deque(maxlen=CALLS_KEPT)  # t0, id, sig, train
        # (step, t_end_ns); step None: an evaluation ended there
        self._ends: deque[tuple[int | None, int]] = deque(maxlen=CALLS_KEPT)
        self._prev_end = 0
        self._last_step: int | None = None  # the last step summed (then a step 0: numbering restarted)
        self._pending: deque[dict] = deque()
        self._counted: OrderedDict[tuple[int, tuple], _Counted] = OrderedDict()
        self._failed: dict[tuple[int, tuple], str] = {}  # meta and sampled forward both failed
        self._gids: dict[int, int] = {}  # id(model) -> root module id
        self._peak: dict[int, float | None] = {}  # id(model) -> peak FLOP/s used for it
        # the sampled-forward fallback: signatures the meta copy could not run, the live session
        self._want_live: dict[tuple[int, tuple], Any] = {}  # (id(model), sig) -> weakref to the model
        self._live: Any = None  # (thread id, model, sig, Counting) while one real call is counted
        self._live_done: deque[tuple[Any, tuple, Any, str]] = deque()  # (ref, sig, profile|None, error)
        self.steps_emitted = 0

    # --- Instrument contract ---------------------------------------------------------------------
    def install(self, ctx: core.Context) -> None:
        self.ctx = ctx
        if not self.options.flops:
            return
        import torch

        self._torch = torch
        core.BUS.root_forward_start.append(self._on_root_start)
        core.BUS.root_forward.append(self._on_root)
        core.BUS.step_end.append(self._on_step_end)
        core.BUS.eval_end.append(self._on_eval_end)
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            for lst, fn in ((core.BUS.root_forward_start, self._on_root_start),
                            (core.BUS.root_forward, self._on_root), (core.BUS.step_end, self._on_step_end),
                            (core.BUS.eval_end, self._on_eval_end)):
                try:
                    lst.remove(fn)
                except ValueError:
                    pass
            self._installed = False
            self._end_live(None)

    def poll(self, now: float) -> list[Event]:
        """Count at most one queued signature per call, and at most once per MIN_INTERVAL_S; take
        in sampled-forward counts; sum the FLOPs of the steps that ended."""
        out: list[Event] = []
        if not self._peaks_known and "torch" in sys.modules:  # the script has imported torch
            self._peaks_known = True
            self._know_cpu_peaks()
        while self._live_done:
            out.extend(self._take_live(*self._live_done.popleft()))
        # a count holds the GIL for a while: the script's exit must not wait for it
        if self._queue and time.monotonic() - self._last >= self.min_interval_s and not self.ctx.stopping:
            out.extend(self._count_one())
        out.extend(self._steps())
        return out

    def _count_one(self) -> list[Event]:
        retry = []
        out: list[Event] = []
        while self._queue and not out:
            ref, sig = self._queue.popleft()
            model = ref()
            if model is None:
                continue
            self._last = time.monotonic()
            try:
                ev = self.compute(model, sig)
            except Exception as exc:  # cannot run on meta: count the next real call of this shape
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                self._want_live[(id(model), sig)] = ref
                self._warn(f"FLOPs for {type(model).__name__} ({describe(sig)}) on meta failed ({why}); "
                           "counting one real forward of that shape instead")
                continue
            if ev is None:
                retry.append((ref, sig))  # the layers instrument has not named its modules yet
                self._last = -1e9  # nothing was counted: try again at the next tick, not a second later
                break
            out.append(ev)
        self._queue.extendleft(reversed(retry))
        return out

    # --- hot path --------------------------------------------------------------------------------
    def _on_root_start(self, module: Any, t0: int, args: tuple, kwargs: dict) -> None:
        # BUS.root_forward_start, only on detailed steps: the step is known to be timed, and the
        # inputs (a KV cache before this call appends to it) are what the call runs on.
        if self._dead or not core.BUS.detail:
            return
        try:
            torch = self._torch
            sig = signature(args, kwargs, autocast_dtype(torch) if torch else None)
            key = id(module)
            train = bool(torch is not None and torch.is_grad_enabled() and getattr(module, "training", False))
            seen = self._seen.get(key)
            if seen is None:
                if len(self._seen) >= 1024:  # many short-lived roots: start over rather than grow
                    self._seen.clear()
                seen = self._seen[key] = set()
                weakref.finalize(module, self._seen.pop, key, None)  # ids are reused
            if sig not in seen:
                if len(seen) < MAX_SIGNATURES:
                    seen.add(sig)
                    self._queue.append((weakref.ref(module), sig))
                elif len(self._refused) < 1024:
                    self._refused.add((key, sig))
            elif self._want_live and self._live is None and (key, sig) in self._want_live:
                self._start_live(module, sig)
            # noted last: the agent thread may sum this call's step as soon as it is noted, and
            # must find its signature queued by then
            self._calls.append((t0, key, sig, train))
        except Exception as exc:  # fail open
            self._dead = True
            self._warn(f"signature capture failed: {type(exc).__name__}: {exc}")

    def _on_root(self, module: Any, t_start_ns: int, t_end_ns: int, args: tuple, kwargs: dict) -> None:
        live = self._live
        if live is not None and live[1] is module and live[0] == threading.get_ident():
            self._end_live(None)

    def _on_step_end(self, step: int, t_end_ns: int) -> None:
        self._ends.append((step, t_end_ns))
        live = self._live
        if live is not None and live[0] == threading.get_ident():
            self._end_live("the call raised")  # its root never returned: never leave the modes on

    def _on_eval_end(self, step: int, t_end_ns: int) -> None:
        self._ends.append((None, t_end_ns))  # the calls until now were an evaluation's
        live = self._live
        if live is not None and live[0] == threading.get_ident():
            self._end_live("the call raised")

    # --- sampled forward (script's thread) -------------------------------------------------------
    def _start_live(self, module: Any, sig: tuple) -> None:
        from llmtop.agent.flops import counting as F

        key = (id(module), sig)
        ref = self._want_live.pop(key)
        session = F.Counting(module, observing=True)  # the script's own call, counted as it runs
        layers = self.layers or _layers_instrument()
        self._live = (threading.get_ident(), module, ref, sig, session, layers)
        try:
            session.enter()  # roots.py wraps Module.__call__: the root's own hooks still run
        except Exception as exc:
            self._live = None
            session.exit()
            self._failed[key] = f"{type(exc).__name__}: {exc}"[:200]

    def _end_live(self, error: str | None) -> None:
        live, self._live = self._live, None
        if live is None:
            return
        _tid, _module, ref, sig, session, _layers = live
        try:
            session.exit()
        except Exception as exc:
            error = error or f"{type(exc).__name__}: {exc}"
        prof = None
        if error is None:
            try:
                prof = session.profile()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        self._live_done.append((ref, sig, prof, error or ""))

    def _take_live(self, ref: Any, sig: tuple, prof: Any, error: str) -> list[Event]:
        model = ref()
        if model is None:
            return []
        if prof is None:
            self._failed[(id(model), sig)] = error
            self._warn(f"FLOPs for {type(model).__name__} ({describe(sig)}): sampled forward failed: {error}")
            return []
        ev = self._event(model, sig, prof, "", "sampled-forward")
        return [ev] if ev is not None else []

    # --- agent thread ----------------------------------------------------------------------------
    def compute(self, model: Any, sig: tuple) -> LayerFlops | None:
        import torch
        from llmtop.agent.flops import counting as F

        layers = self.layers or _layers_instrument()
        if layers is None:
            return None  # no module ids to join the counts to
        ids = layers.module_ids()
        if ids.get(model) is None:
            return None
        args_spec, kwargs_spec, autocast = sig
        args = []
        for s in args_spec:
            ok, v = _rebuild(s, torch, autocast)
            args.append(v if ok else None)
        kwargs = {}
        for k, s in kwargs_spec:
            ok, v = _rebuild(s, torch, autocast)
            if ok:
                kwargs[k] = v
        inner, prefix = unwrap(model)
        clone = meta_copy(inner)
        # eval mode set on each module, not through ``clone.eval()``: transformers' override re-runs
        # `kernels`' kernelize on a mode change, which refuses a meta model ("Unsupported device type")
        for mod in clone.modules():
            mod.training = False
        if autocast is not None:
            # autocast runs the matmuls (most of the FLOPs and weight traffic) in its dtype; norms
            # and softmax stay fp32 in reality, a small part of the bytes
            clone = clone.to(autocast)
        # The layers instrument must not see the meta copy's module calls.
        with layers.muted():
            prof = F.count(clone, tuple(args), kwargs)
        return self._event(model, sig, prof, prefix, "meta", layers, ids)

    def _event(self, model: Any, sig: tuple, prof: Any, prefix: str, method: str, layers: Any = None,
               ids: Any = None) -> LayerFlops | None:
        """The ``LayerFlops`` event of one counted pass, and its per-call table kept for step sums."""
        if ids is None:
            layers = layers or self.layers or _layers_instrument()
            if layers is None:
                return None
            ids = layers.module_ids()
        originals = dict(model.named_modules())
        out_ids: list[int] = []
        fl: list[float] = []
        by: list[float] = []
        total_f: dict[int, float] = {}
        total_b: dict[int, float] = {}
        for cost in prof.modules:
            if not cost.calls:
                continue
            paths = [prefix + cost.path] if cost.path else ([prefix[:-1], ""] if prefix else [""])
            for path in paths:  # a wrapper's root gets its wrapped model's figures too
                orig = originals.get(path)
                gid = ids.get(orig) if orig is not None else None
                if gid is not None:
                    out_ids.append(gid)
                    fl.append(cost.flops / cost.calls)
                    by.append(cost.bytes / cost.calls)
                    total_f[gid] = cost.flops  # all its calls inside one root call
                    total_b[gid] = cost.bytes
        dev, dtype = self._device(model)
        if sig[2] is not None:
            dtype = str(sig[2])
        peak = dev.peak(dtype) if dev is not None else None
        root_gid = ids.get(model)
        key = (id(model), sig)
        self._counted[key] = _Counted(total_f, total_b, total_f.get(root_gid, prof.flops) if root_gid is not None
                                      else prof.flops, method)
        self._counted.move_to_end(key)
        while len(self._counted) > COUNTED_KEPT:
            (old_model, old_sig), _ = self._counted.popitem(last=False)
            self._seen.get(old_model, set()).discard(old_sig)  # counted again if it comes back
        if root_gid is not None:
            self._gids[id(model)] = root_gid
        self._peak[id(model)] = peak
        self.computed += 1
        return LayerFlops(
            signature=describe(sig), ids=out_ids, flops=fl, bytes=by,
            peak_flops=peak,
            peak_bw=dev.bandwidth if dev is not None else None,
            device=dev.name if dev is not None else "", method=method,
            peak_source=dev.sources() if dev is not None else "",
        )

    def _steps(self) -> list[Event]:
        """Give the noted calls to the steps that ended; emit each step whose calls are all counted."""
        calls, ends = self._calls, self._ends
        while ends:
            step, t_end = ends.popleft()
            mine = []
            # an evaluation ends as the training step's first forward starts (at that very t0)
            while calls and (calls[0][0] <= t_end if step is not None else calls[0][0] < t_end):
                mine.append(calls.popleft())
            if step is None:  # an evaluation: its calls are dropped; the next step starts at its end
                self._prev_end = t_end
                continue
            if step == 0 and self._last_step is not None:  # (only then does a step 0 follow another)
                # training after inference records: those were an evaluation before training, and
                # their numbers are the training steps' now: what still waits of them is dropped
                self._pending.clear()
            self._last_step = step
            start = self._prev_end or (mine[0][0] if mine else 0)
            self._prev_end = t_end
            if mine:
                self._pending.append({"step": step, "calls": mine, "dur_ns": t_end - start})
        out: list[Event] = []
        while self._pending:
            p = self._pending[0]
            ev = self._step_event(p, final=len(self._pending) > PENDING_STEPS)
            if ev is None:
                break  # the oldest waits for a count: later ones wait behind it (order kept)
            self._pending.popleft()
            out.append(ev)
        return out

    def _step_event(self, p: dict, final: bool) -> StepFlops | None:
        """The step's sums, None while a signature may still be counted (unless ``final``)."""
        per_f: dict[int, float] = {}
        per_b: dict[int, float] = {}
        roots: dict[int, int] = {}
        fwd = 0.0
        methods = set()
        train = False
        note = ""
        peak = None
        for _t0, mid, sig, tr in p["calls"]:
            key = (mid, sig)
            counted = self._counted.get(key)
            if counted is None:
                if key in self._failed:
                    note = f"not counted: {describe(sig)} could not be run ({self._failed[key]})"
                    continue
                if key in self._refused:
                    note = f"not counted: more than {MAX_SIGNATURES} input signatures for this model"
                    continue
                if not final:
                    return None
                note = f"not counted yet: {describe(sig)}"
                continue
            methods.add(counted.method)
            train = train or tr
            fwd += counted.root_flops
            for gid, f in counted.flops.items():
                per_f[gid] = per_f.get(gid, 0.0) + f
            for gid, b in counted.bytes.items():
                per_b[gid] = per_b.get(gid, 0.0) + b
            gid = self._gids.get(mid)
            if gid is not None:
                roots[gid] = roots.get(gid, 0) + 1
            peak = self._peak.get(mid, peak)
        method = methods.pop() if len(methods) == 1 else ("mixed" if methods else "")
        ev = StepFlops(step=p["step"], method=method, peak_flops=peak)
        ev.dur_ms = p["dur_ns"] / 1e6 if p["dur_ns"] > 0 else None
        if note:  # a call is missing: no per-module or step figure may be shown for this step
            ev.note = note
            self.steps_emitted += 1
            return ev
        ids = sorted(per_f)
        ev.ids, ev.flops, ev.bytes = ids, [per_f[g] for g in ids], [per_b.get(g, 0.0) for g in ids]
        ev.roots, ev.root_calls = list(roots), list(roots.values())
        ev.fwd_flops = fwd
        ev.flops_total = fwd * (1.0 + BACKWARD_FACTOR) if train else fwd
        if ev.dur_ms:
            achieved = ev.flops_total / (ev.dur_ms / 1000.0)
            if peak and achieved > peak:
                ev.note = (f"{achieved / 1e9:.1f} GFLOP/s would exceed the device peak "
                           f"{peak / 1e9:.1f}: the count or the step time is wrong")
            else:
                ev.achieved_flops = achieved
                ev.mfu = achieved / peak if peak else None
        self.steps_emitted += 1
        return ev

    def _know_cpu_peaks(self) -> None:
        """Measure (or read from the cache) the CPU's peaks at the first tick, not at the first count:
        the run's start is when the agent thread has time, and a short run may end before its first
        count. Not when the script uses CUDA (its peaks come from the datasheet)."""
        torch = sys.modules["torch"]
        if self.device is not None or self.ctx.stopping or torch.cuda.is_initialized():
            return
        try:
            from llmtop.agent.flops import roofline

            roofline.device_for("cpu")  # measured once per processor and thread count, then cached
        except Exception:
            pass  # the first count tries again and reports what fails

    def _device(self, model: Any) -> tuple[Any, str]:
        from llmtop.agent.flops import roofline

        p = next(iter(model.parameters()), None)
        dtype = str(p.dtype) if p is not None else "float32"
        if self.device is not None:
            return self.device, dtype
        try:
            if p is not None and p.device.type == "cuda":
                import torch

                if dtype == "torch.float32" and torch.backends.cuda.matmul.allow_tf32:
                    dtype = "tf32"  # fp32 matmuls run on tensor cores
                dev = roofline.lookup(torch.cuda.get_device_name(p.device))
                return (roofline.with_overrides(dev) if dev is not None else None), dtype
            return roofline.device_for("cpu"), dtype
        except Exception:
            return None, dtype

    def _warn(self, message: str) -> None:
        core.warn_safely(self.ctx, self.name, message)
