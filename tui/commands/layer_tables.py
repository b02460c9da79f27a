"""A step's layer tables merged per module, for the tools that read recordings (report, export).

The agent sends what it measured each tick, so one step's modules may come in several ``LayerStats``
tables (forward in one tick, backward in the next); ``LayerMerger`` sums them into one table per step.
"""

from __future__ import annotations

from typing import Any

from llmtop.protocol.events import LayerStats


class LayerMerger:
    """Per-step layer tables. The agent sends what it measured each tick, so one step's modules may
    come in several tables (forward in one, backward in the next): they are summed per module.
    ``add`` buffers; ``ready(step)`` returns merged tables of steps up to ``step``."""

    def __init__(self) -> None:
        self.pending: dict[int, dict[int, list[Any]]] = {}

    def add(self, e: LayerStats) -> None:
        rows = self.pending.setdefault(e.step, {})
        n = len(e.ids)
        has_bwd = len(e.bwd_ms) == n
        for i, mid in enumerate(e.ids):
            row = rows.get(mid)
            if row is None:
                row = rows[mid] = [0.0, 0.0, 0, None, None, None]  # fwd, fwd_self, calls, bwd, bwd_self, act
            row[0] += e.fwd_ms[i]
            row[1] += e.fwd_self_ms[i] if i < len(e.fwd_self_ms) else 0.0
            row[2] += e.calls[i] if i < len(e.calls) else 0
            if has_bwd:
                row[3] = (row[3] or 0.0) + e.bwd_ms[i]
                row[4] = (row[4] or 0.0) + (e.bwd_self_ms[i] if i < len(e.bwd_self_ms) else 0.0)
            if len(e.act_bytes) == n:
                row[5] = (row[5] or 0) + e.act_bytes[i]

    def ready(self, step: int | None = None) -> list[LayerStats]:
        done = sorted(s for s in self.pending if step is None or s <= step)
        return [self._table(s, self.pending.pop(s)) for s in done]

    @staticmethod
    def _table(step: int, rows: dict[int, list[Any]]) -> LayerStats:
        ids = list(rows)
        vals = [rows[i] for i in ids]
        has_bwd = any(v[3] is not None for v in vals)
        has_act = any(v[5] is not None for v in vals)
        return LayerStats(step=step, ids=ids, fwd_ms=[v[0] for v in vals], fwd_self_ms=[v[1] for v in vals],
                          calls=[v[2] for v in vals],
                          bwd_ms=[v[3] or 0.0 for v in vals] if has_bwd else [],
                          bwd_self_ms=[v[4] or 0.0 for v in vals] if has_bwd else [],
                          act_bytes=[v[5] or 0 for v in vals] if has_act else [])
