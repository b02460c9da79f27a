"""``Trainer``: ``LlmtopCallback`` is added to every Trainer; it turns Trainer's logs into
``trainer/*`` metrics and marks evaluation with an ``evaluate`` span.

``LlmtopCallback`` is built on first access so that importing this module never imports
transformers.
"""

from __future__ import annotations

import time
from typing import Any

from llmtop.agent.hf.wrapping import Patcher
from llmtop.agent.runtime import core
from llmtop.protocol.events import Metric, Span


class Trainer:
    """Wraps ``Trainer.__init__`` to add ``LlmtopCallback`` once."""

    def __init__(self, patcher: Patcher) -> None:
        self.p = patcher

    def patch(self, module: Any) -> None:
        cls = module.Trainer

        def before(args: tuple, kwargs: dict) -> Any:
            return args[0]

        def after(trainer: Any, result: Any, err: Any, wall0: float, dur: int, depth: int) -> None:
            if err is not None:
                return
            callback_cls = _callback_class()
            handler = getattr(trainer, "callback_handler", None)
            if handler is None:
                return
            if not any(isinstance(cb, callback_cls) for cb in handler.callbacks):
                trainer.add_callback(callback_cls())

        self.p.wrap_method(cls, "__init__", "trainer", before, after)


# --- Trainer callback (built lazily: transformers is imported only when it is asked for) ----------

_CALLBACK: type | None = None


def _emitter() -> Any:
    """Where the callback sends events: the installed instrument's context, else the running agent."""
    from llmtop.agent.hf.instrument import current  # the coordinator, which imports this module

    instr = current()
    if instr is not None and instr.ctx is not None and not instr.patcher.off_all:
        return instr.ctx
    return core.ACTIVE


def _callback_class() -> type:
    global _CALLBACK
    if _CALLBACK is not None:
        return _CALLBACK
    from transformers.trainer_callback import TrainerCallback

    class LlmtopCallback(TrainerCallback):
        """Sends Trainer's logs to llmtop as ``trainer/<key>`` metrics (loss, learning_rate,
        grad_norm, epoch, eval_* …) at Trainer's global step, and marks evaluations and the
        training run as spans. Harmless when no agent runs."""

        def __init__(self) -> None:
            self._eval_start: tuple[float, int] | None = None
            self._train_start: tuple[float, int] | None = None

        def _send(self, event: Any) -> None:
            sink = _emitter()
            if sink is not None:
                try:
                    sink.emit(event)
                except Exception:
                    pass

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._train_start = (time.time(), time.perf_counter_ns())

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self._train_start is None:
                return
            wall0, t0 = self._train_start
            self._train_start = None
            self._send(Span(name="train", category="training_loop", start=wall0,
                            dur_ms=(time.perf_counter_ns() - t0) / 1e6, step=state.global_step,
                            attrs={"global_step": state.global_step, "epoch": state.epoch,
                                   "max_steps": state.max_steps,
                                   "grad_accum": getattr(args, "gradient_accumulation_steps", 1)}))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if not logs:
                return
            now = time.time()
            for key, value in logs.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._send(Metric(name=f"trainer/{key}", value=float(value), t=now,
                                      step=state.global_step))

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self._eval_start is None:
                self._eval_start = (time.time(), time.perf_counter_ns())

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None,
                        **kwargs: Any) -> None:
            start = self._eval_start or (time.time(), time.perf_counter_ns())
            self._eval_start = None
            attrs: dict[str, Any] = {"global_step": state.global_step}
            for key, value in (metrics or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    attrs[key] = float(value)
            self._send(Span(name="evaluate", category="model_inference", start=start[0],
                            dur_ms=(time.perf_counter_ns() - start[1]) / 1e6, step=state.global_step,
                            attrs=attrs))

    _CALLBACK = LlmtopCallback
    return _CALLBACK


def __getattr__(name: str) -> Any:
    if name == "LlmtopCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
