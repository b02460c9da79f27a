"""Mixed precision: the autocast state and each model's dtype, sampled at root forward start
(``core.BUS.root_forward_start``, detailed steps only); an event is made only on change."""

from __future__ import annotations

import sys
import time
import weakref
from typing import Any

from llmtop.agent.hf.wrapping import Patcher, config_dtype, dtype_name
from llmtop.agent.runtime import core
from llmtop.protocol.events import Metric, Span


class Precision:
    """A root-forward listener on the hot bus while transformers is in use."""

    def __init__(self, patcher: Patcher) -> None:
        self.p = patcher
        self._pending: list[Any] = []  # events made on the hot path, sent at the next poll
        self._amp_last: Any = None
        self._models_seen: weakref.WeakSet[Any] = weakref.WeakSet()
        self._bus_fn: Any = None

    def activate(self) -> None:
        self._bus_fn = self._on_root_forward_start
        core.BUS.root_forward_start.append(self._bus_fn)

    def uninstall(self) -> None:
        if self._bus_fn is not None:
            try:
                core.BUS.root_forward_start.remove(self._bus_fn)
            except ValueError:
                pass
            self._bus_fn = None

    def poll(self) -> list[Any]:
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        return pending

    def _on_root_forward_start(self, module: Any, t_start_ns: int, args: Any, kwargs: Any) -> None:
        """Hot path (root forwards of detailed steps): read the autocast state; make an event only
        on change."""
        p = self.p
        if p.off_all or not core.BUS.detail or "precision" in p.off:
            return
        try:
            torch = sys.modules["torch"]
            if torch.is_autocast_enabled("cuda"):
                amp = ("cuda", torch.get_autocast_dtype("cuda"))
            elif torch.is_autocast_enabled("cpu"):
                amp = ("cpu", torch.get_autocast_dtype("cpu"))
            else:
                amp = None
            if amp != self._amp_last:
                self._amp_last = amp
                self._pending.append(self._span(
                    "autocast", {"enabled": amp is not None, "device": amp[0] if amp else "",
                                 "dtype": dtype_name(amp[1]) if amp else ""}))
                self._pending.append(Metric(name="amp/autocast", value=1.0 if amp else 0.0,
                                            t=time.time(), step=p.step()))
            if module not in self._models_seen:
                self._models_seen.add(module)
                self._pending.append(self._span("model dtype", _model_dtypes(module)))
        except Exception as exc:
            p.fail("precision", exc)

    def _span(self, name: str, attrs: dict[str, Any]) -> Span:
        return Span(name=name, category="mixed_precision", start=time.time(), dur_ms=0.0,
                    step=self.p.step(), attrs=attrs)


def _model_dtypes(module: Any) -> dict[str, Any]:
    dtype = getattr(module, "dtype", None)
    if dtype is None or not hasattr(dtype, "is_floating_point"):
        first = next(iter(module.parameters()), None)
        dtype = first.dtype if first is not None else None
    return {"model": type(module).__name__, "dtype": dtype_name(dtype),
            "config_dtype": config_dtype(getattr(module, "config", None))}
