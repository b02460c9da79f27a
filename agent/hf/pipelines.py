"""``Pipeline.__call__``: one span per call with preprocess/forward/postprocess children; a pipeline
consumed lazily (over a dataset or generator) is summed per tick."""

from __future__ import annotations

import time
from typing import Any

from llmtop.agent.hf.wrapping import Patcher, tl
from llmtop.protocol.events import Span

PHASE_CATEGORY = {"preprocess": "text_preprocessing", "forward": "model_inference",
                  "postprocess": "model_inference"}


class _PipeAcc:
    """Summed phase times of one pipeline call (or of a lazily consumed pipeline over one tick)."""

    __slots__ = ("pipe", "wall0", "t0", "phases", "items")

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.wall0 = time.time()
        self.t0 = time.perf_counter_ns()
        # phase → [calls, total ns, wall-clock start of the first call]
        self.phases: dict[str, list[Any]] = {}
        self.items = 0

    def add(self, phase: str, wall0: float, dur_ns: int) -> None:
        acc = self.phases.get(phase)
        if acc is None:
            self.phases[phase] = [1, dur_ns, wall0]
        else:
            acc[0] += 1
            acc[1] += dur_ns
        if phase == "postprocess":
            self.items += 1


class Pipelines:
    """Wraps ``Pipeline.__call__`` and each concrete pipeline's phases."""

    def __init__(self, patcher: Patcher) -> None:
        self.p = patcher
        self._classes: set[type] = set()
        self._stream: dict[int, _PipeAcc] = {}

    def patch(self, module: Any) -> None:
        cls = module.Pipeline

        def before_call(args: tuple, kwargs: dict) -> Any:
            pipe = args[0]
            self._patch_class(type(pipe), cls)
            acc = _PipeAcc(pipe)
            stack = getattr(tl, "pipe", None)
            if stack is None:
                stack = tl.pipe = []
            stack.append(acc)
            inputs = args[1] if len(args) > 1 else kwargs.get("inputs", kwargs.get("text_inputs"))
            batch = kwargs.get("batch_size") or getattr(pipe, "_batch_size", None) or 1
            return acc, inputs, batch

        def after_call(state: Any, result: Any, err: Any, wall0: float, dur: int, depth: int) -> None:
            acc, inputs, batch = state
            stack = tl.pipe
            if stack and stack[-1] is acc:
                stack.pop()
            if err is not None:
                return
            if not acc.phases:  # a lazy iterator: its phases run later and are summed per tick
                return
            items = acc.items or (len(inputs) if isinstance(inputs, (list, tuple)) else 1)
            for ev in self._spans(acc, depth, wall0=wall0, dur=dur, items=items, batch=batch):
                self.p.emit(ev)

        self.p.wrap_method(cls, "__call__", "pipeline", before_call, after_call, reentrant=True)
        self._wrap_phase(cls, "forward")

    def poll(self) -> list[Span]:
        """Agent thread, every tick: the spans of pipelines consumed lazily since the last tick."""
        if not self._stream:
            return []
        events: list[Span] = []
        stream, self._stream = self._stream, {}
        for acc in stream.values():
            events.extend(self._spans(acc, 0, streamed=True))
        return events

    def _patch_class(self, klass: type, base: type) -> None:
        # Concrete pipelines define their own preprocess/postprocess: patch the defining class once.
        if klass in self._classes:
            return
        self._classes.add(klass)
        for phase in ("preprocess", "postprocess"):
            for owner in klass.__mro__:
                if phase in owner.__dict__:
                    if owner is not base and not self.p.owns(owner.__dict__[phase]):
                        self._wrap_phase(owner, phase)
                    break

    def _wrap_phase(self, owner: type, phase: str) -> None:
        def before(args: tuple, kwargs: dict) -> Any:
            return args[0] if args else None

        def after(pipe: Any, result: Any, err: Any, wall0: float, dur: int, depth: int) -> None:
            stack = getattr(tl, "pipe", None)
            for acc in reversed(stack or ()):
                if acc.pipe is pipe:
                    acc.add(phase, wall0, dur)
                    return
            # Outside a call: a pipeline over a dataset or generator, consumed lazily.
            acc = self._stream.get(id(pipe))
            if acc is None:
                acc = self._stream[id(pipe)] = _PipeAcc(pipe)
            acc.add(phase, wall0, dur)

        self.p.wrap_method(owner, phase, f"pipeline_{phase}", before, after)

    def _spans(self, acc: _PipeAcc, depth: int, wall0: float | None = None,
               dur: int | None = None, items: int | None = None, batch: int | None = None,
               streamed: bool = False) -> list[Span]:
        pipe = acc.pipe
        if dur is None:
            dur = sum(ph[1] for ph in acc.phases.values())
        if wall0 is None:
            wall0 = min(ph[2] for ph in acc.phases.values())
        items = acc.items if items is None else items
        attrs: dict[str, Any] = {"task": str(getattr(pipe, "task", "") or ""),
                                 "class": type(pipe).__name__, "items": items,
                                 "batch_size": batch or getattr(pipe, "_batch_size", None) or 1}
        if dur > 0:
            attrs["items_per_s"] = items / (dur / 1e9)
        if streamed:
            attrs["summed"] = True
        events: list[Span] = []
        for phase in ("preprocess", "forward", "postprocess"):
            ph = acc.phases.get(phase)
            if ph is None:
                continue
            attrs[f"{phase}_ms"] = ph[1] / 1e6
            events.append(self.p.span(phase, PHASE_CATEGORY[phase], ph[2], ph[1], depth + 1,
                                      {"phase": phase, "calls": ph[0]}))
        attrs["forward_calls"] = acc.phases.get("forward", [0])[0]
        name = f"pipeline {attrs['task'] or attrs['class']}"
        events.append(self.p.span(name, "model_inference", wall0, dur, depth, attrs))
        return events
