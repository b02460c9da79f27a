"""Guarded wrappers around transformers' functions, shared by every integration in this package.

A ``Patcher`` replaces a function on its owner with a wrapper and puts the original back at
uninstall. Every wrapper passes the call's arguments, result and exception through unchanged; an
error in the integration's own code (``before``/``after``) disables that part and is reported with
``ctx.warn``. One patcher per ``TransformersInstrument``: it is the integrations' shared context.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from llmtop.agent.runtime import api, core
from llmtop.protocol.events import Span


class _PerThread(threading.local):
    """Busy parts, generate stack, pipeline stack of one thread. The attributes exist from the
    start: a missing one costs ``getattr`` an exception, and the step tracker asks for ``gen`` on
    every root forward."""

    def __init__(self) -> None:
        self.busy: dict | None = None
        self.gen: list | None = None
        self.pipe: list | None = None


tl = _PerThread()


def is_tensor(x: Any) -> bool:
    return hasattr(x, "element_size") and hasattr(x, "numel")


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else ""


def config_dtype(config: Any) -> str:
    # ``config.torch_dtype`` warns in transformers 5; read the stored attribute without the property.
    d = getattr(config, "__dict__", {})
    value = d.get("dtype", d.get("torch_dtype"))
    return dtype_name(value) if value is not None else ""


def _busy() -> dict[str, int]:
    b = getattr(tl, "busy", None)
    if b is None:
        b = tl.busy = {}
    return b


def _enter_depth() -> int:
    """Share span nesting depth with ``llmtop.agent.span`` so user and integration spans nest."""
    d = getattr(api._depth, "n", 0)
    api._depth.n = d + 1
    return d


def _exit_depth() -> None:
    api._depth.n = max(0, getattr(api._depth, "n", 1) - 1)


class Patcher:
    """Wraps transformers' functions for the integrations and restores them; off as a whole
    (``off_all``: uninstalled, or a forked child) or per part after an error (``off``)."""

    def __init__(self) -> None:
        self.ctx: Any = None
        self.off_all = False
        self.off: set[str] = set()  # parts disabled after an error
        self._patched: list[tuple[Any, str, Any, Any]] = []  # (owner, attr, original, wrapper)

    # -- reporting -----------------------------------------------------------------------------

    def warn(self, part: str, exc: BaseException) -> None:
        core.warn_safely(self.ctx, f"transformers.{part}", f"{type(exc).__name__}: {exc}")

    def fail(self, part: str, exc: BaseException) -> None:
        self.off.add(part)
        self.warn(part, exc)

    def step(self) -> int | None:
        return getattr(self.ctx, "current_step", None)

    def emit(self, event: Any) -> None:
        self.ctx.emit(event)

    def span(self, name: str, category: str, wall0: float, dur_ns: int, depth: int,
             attrs: dict[str, Any]) -> Span:
        return Span(name=name, category=category, start=wall0, dur_ms=dur_ns / 1e6, depth=depth,
                    step=self.step(), attrs=attrs)

    # -- patching ------------------------------------------------------------------------------

    def replace(self, owner: Any, attr: str, wrapper: Any) -> None:
        original = owner.__dict__[attr]
        setattr(owner, attr, wrapper)
        self._patched.append((owner, attr, original, wrapper))

    def restore(self) -> None:
        for owner, attr, original, wrapper in reversed(self._patched):
            # Leave a later patch by someone else in place; ours passes through once off.
            if owner.__dict__.get(attr) is wrapper:
                setattr(owner, attr, original)
        self._patched.clear()

    def wrap(self, part: str, fn: Callable[..., Any],
             before: Callable[[tuple, dict], Any],
             after: Callable[[Any, Any, BaseException | None, float, int, int], None],
             reentrant: bool = False) -> Callable[..., Any]:
        """A guarded wrapper: ``before(args, kwargs)`` → state (None: skip this call), then the call,
        then ``after(state, result, error, wall0, dur_ns, depth)``. Our errors disable ``part``."""
        instr = self

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if instr.off_all or part in instr.off:
                return fn(*args, **kwargs)
            busy = _busy()
            if not reentrant and busy.get(part):
                return fn(*args, **kwargs)
            try:
                state = before(args, kwargs)
            except Exception as exc:
                instr.fail(part, exc)
                return fn(*args, **kwargs)
            if state is None:
                return fn(*args, **kwargs)
            busy[part] = busy.get(part, 0) + 1
            depth = _enter_depth()
            wall0 = time.time()
            t0 = time.perf_counter_ns()
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args, **kwargs)
                return result
            except BaseException as err:
                error = err
                raise  # unchanged, after ``after`` has seen it (below)
            finally:
                dur = time.perf_counter_ns() - t0
                _exit_depth()
                busy[part] -= 1
                try:
                    after(state, result, error, wall0, dur, depth)
                except Exception as exc:
                    instr.fail(part, exc)

        wrapper.__llmtop_wrapped__ = fn  # type: ignore[attr-defined]
        wrapper.__llmtop_owner__ = self  # type: ignore[attr-defined]
        return wrapper

    def wrap_classmethod(self, owner: Any, attr: str, part: str, before: Any, after: Any) -> None:
        raw = owner.__dict__.get(attr)
        if not isinstance(raw, classmethod):
            return
        self.replace(owner, attr, classmethod(self.wrap(part, raw.__func__, before, after)))

    def wrap_method(self, owner: Any, attr: str, part: str, before: Any, after: Any,
                    reentrant: bool = False) -> None:
        raw = owner.__dict__.get(attr)
        if raw is None or not callable(raw):
            return
        self.replace(owner, attr, self.wrap(part, raw, before, after, reentrant))

    def owns(self, fn: Any) -> bool:
        """``fn`` is one of this patcher's wrappers (not a copy made under an earlier agent)."""
        return getattr(fn, "__llmtop_owner__", None) is self
