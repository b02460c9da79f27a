"""Model-root calls: the outermost module call on a thread, seen from ``nn.Module.__call__``.

The step tracker needs every root call's start and end (the forward phase, the batch shape) on
every step. Global module hooks would see them too, but while any global hook exists every module
call takes torch's slow path, and switching them off for the length of each root call (a one-shot
end hook on the root) cost tens of µs per step in situ. Instead ``nn.Module.__call__`` is replaced
by a function that does what torch's own (``_wrapped_call_impl``) does, plus a per-thread depth
count: a call at depth 0 is a root and is announced on the bus; deeper calls pay one counter.
Replacing torch's function rather than wrapping it keeps tracebacks as deep as before.

Not roots: calls while dynamo traces (they pass straight through), a forward re-run inside a
backward (activation checkpointing: that is backward time), calls inside ``muted()``, and leaf
modules of torch's with no parameters (``nn.CrossEntropyLoss()`` built and called each step: one tree,
and one root row, per step otherwise; nor is a loss call a model forward for the step tracker).

Per-layer timing (the layers instrument's sampled steps) uses the same function: while ``each`` is
set, its pre/post callbacks run around every module call, so no global hook ever sends calls
through torch's slow path (≈2 µs per call here before any timing logic).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from llmtop.agent.runtime import core

_now = time.perf_counter_ns
_TORCH_NN = "torch.nn.modules."  # torch's own module classes live here
# depth a muted() block adds: nothing inside reaches depth 0 (roots here, layer frames in layers.py)
HOLD = 1 << 40


def is_model(mod: Any) -> bool:
    """Can ``mod`` be a model root: anything but one of torch's parameter-free leaves (the test that
    ``__call__`` below makes inline)."""
    return bool(mod._modules or mod._parameters or not mod.__class__.__module__.startswith(_TORCH_NN))


class _Depth(threading.local):
    def __init__(self) -> None:
        self.d = [0]  # module calls in progress on this thread (a list: one lookup, in-place adds)
        self.root: Any = None  # the root call in progress here, and when it began
        self.t0 = 0


class RootCalls:
    """Owns the ``nn.Module.__call__`` replacement; announces root calls.

    ``on_start(module, t0)``, ``on_end(module, t0, t1)`` and ``on_error(module)`` are the
    owner's own callbacks (model discovery, OOM reports), called before the bus listeners.
    ``bus=False``: announce to the owner only (the layers instrument's calibration probe).
    """

    def __init__(self, on_start: Callable[[Any, int], None], on_end: Callable[[Any, int, int], None],
                 on_error: Callable[[Any], None], bus: bool = True) -> None:
        self.on_start = on_start
        self.on_end = on_end
        self.on_error = on_error
        self.bus = bus
        self.listeners_ns = 0  # time in the bus listeners since the owner last reset it
        self.calls = 0  # root calls announced since the owner last reset it
        self.active = False
        # (pre, post) called around every module call while set (the layers instrument's sampled
        # steps): pre(module, args); post(module, args, kwargs, output), or post(module, args,
        # kwargs) when the call raised. Neither may raise.
        self.each: tuple[Callable[..., None], Callable[..., None]] | None = None
        self._tls = _Depth()
        self._module: Any = None
        self._orig: Any = None
        self._new: Any = None

    # --------------------------------------------------------------------- per thread

    def current(self) -> tuple[Any, int]:
        """(root module, start ns) of the root call in progress on this thread; the module is None
        when there is none."""
        tls = self._tls
        return tls.root, tls.t0

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Module calls on this thread are no roots while inside. Nestable."""
        d = self._tls.d
        d[0] += HOLD
        try:
            yield
        finally:
            d[0] -= HOLD

    # --------------------------------------------------------------------- install

    def install(self, torch: Any) -> None:
        module_cls = torch.nn.Module
        orig = module_cls.__dict__["__call__"]
        comp = getattr(torch, "compiler", None)
        compiling = getattr(comp, "is_dynamo_compiling", None) or getattr(
            comp, "is_compiling", None) or torch._dynamo.is_compiling
        task_id = torch._C._current_graph_task_id
        # torch's own _wrapped_call_impl is inlined below (no extra frame in tracebacks); a
        # replacement installed before ours (another tool) is called instead, keeping it in the chain
        inline = orig is getattr(module_cls, "_wrapped_call_impl", None)
        tls = self._tls
        rc = self
        enter, leave = self._enter, self._leave

        def __call__(mod: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
            if not compiling() and rc.active:  # dynamo folds this: traced code never sees the rest
                d = tls.d
                # not nested, muted, nor re-run inside backward; and a model, not one of torch's
                # parameter-free leaves (a loss module made each step would add a tree per step)
                root = not d[0] and task_id() == -1 and (mod._modules or mod._parameters
                                                         or not mod.__class__.__module__.startswith(_TORCH_NN))
                if root:
                    t0 = enter(mod, args, kwargs)
                else:
                    d[0] += 1
                each = rc.each
                ok = False
                try:
                    if each is not None:
                        each[0](mod, args)
                    if not inline:
                        out = orig(mod, *args, **kwargs)
                    elif mod._compiled_call_impl is not None:
                        out = mod._compiled_call_impl(*args, **kwargs)
                    else:
                        out = mod._call_impl(*args, **kwargs)
                    ok = True
                finally:  # on an error sys.exc_info() holds it here, for the OOM report
                    if each is not None:
                        if ok:
                            each[1](mod, args, kwargs, out)
                        else:
                            each[1](mod, args, kwargs)
                    if root:
                        leave(mod, t0, args, kwargs, ok)
                    else:
                        d[0] -= 1
                return out
            if not inline:
                return orig(mod, *args, **kwargs)
            if mod._compiled_call_impl is not None:
                return mod._compiled_call_impl(*args, **kwargs)
            return mod._call_impl(*args, **kwargs)

        self._module, self._orig, self._new = module_cls, orig, __call__
        module_cls.__call__ = __call__
        self.active = True

    def uninstall(self) -> None:
        self.active = False  # a replacement someone wrapped since stays, passing straight through
        if self._module is not None and self._module.__dict__.get("__call__") is self._new:
            self._module.__call__ = self._orig
        self._module = None

    # --------------------------------------------------------------------- the root call

    def _enter(self, mod: Any, args: tuple, kwargs: dict) -> int:
        """A root call begins: announce it; returns its start. Never raises into the call."""
        t0 = _now()
        try:
            tls = self._tls
            tls.d[0] = 1
            tls.root, tls.t0 = mod, t0
            self.calls += 1
            self.on_start(mod, t0)
        except Exception:
            pass
        if self.bus:
            listeners = core.BUS.root_forward_start
            if listeners:
                for fn in listeners:
                    try:
                        fn(mod, t0, args, kwargs)
                    except Exception:
                        pass
                self.listeners_ns += _now() - t0
        return t0

    def _leave(self, mod: Any, t0: int, args: tuple, kwargs: dict, ok: bool) -> None:
        """The root call returned (``ok``) or raised (then sys.exc_info() holds the error).
        Never raises into the call."""
        t1 = _now()
        try:
            tls = self._tls
            tls.d[0] = 0
            tls.root = None
            if ok:
                self.on_end(mod, t0, t1)
            else:
                self.on_error(mod)
        except Exception:
            pass
        if ok and self.bus:
            listeners = core.BUS.root_forward
            if listeners:
                for fn in listeners:
                    try:
                        fn(mod, t0, t1, args, kwargs)
                    except Exception:
                        pass
                self.listeners_ns += _now() - t1
