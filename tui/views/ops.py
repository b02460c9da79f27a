"""Ops: the hot aten ops of the latest profiled training step (self time, calls, shapes, FLOPs).

The % column is each row's share of the profiled step's op time, every op of the step counted (the
agent sends the top K rows and that total), so the shown rows sum to the part of the step they cover.
"""

from __future__ import annotations

from llmtop.tui.session import fmt
from llmtop.tui.session.model import SessionModel
from llmtop.tui.views.widgets import KeyedTable, show_text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

COLUMNS = (("name", "op"), ("self", "self ms"), ("share", "%"), ("calls", "calls"), ("flops", "FLOPs"),
           ("rate", "FLOP/s"), ("shapes", "shapes"))


class OpsView(Vertical):
    DEFAULT_CSS = """
    OpsView #ops-info { height: 1; color: $text-muted; padding: 0 1; }
    OpsView DataTable { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        yield Static(id="ops-info")
        yield DataTable(id="ops-table", cursor_type="row")

    def on_mount(self) -> None:
        self._keyed = KeyedTable(self.query_one(DataTable), COLUMNS)

    def refresh_view(self, model: SessionModel, window_s: float) -> None:
        if model.ops_step is None:
            info = "no op profile yet (the agent profiles one step in N)"
        else:
            info = f"profile of step {model.ops_step} · {len(model.ops)} ops"
            if model.ops_rows > len(model.ops) and model.ops_total_ms:
                shown = sum(op.self_ms for op in model.ops) / model.ops_total_ms
                info += f" of {model.ops_rows} ({shown * 100:.0f} % of the step's {fmt.ms(model.ops_total_ms)} ms)"
            if model.ops_coverage is not None:
                info += f" · FLOP formulas cover {model.ops_coverage * 100:.0f} % of op time"
            if model.ops and not any(op.shapes for op in model.ops):
                info += " · input shapes not recorded in this profile"
        show_text(self.query_one("#ops-info", Static), info)
        # the step's op time (older recordings: the rows')
        total = model.ops_total_ms or sum(op.self_ms for op in model.ops) or 1.0
        self._keyed.sync(
            (op.name,
             (op.name, fmt.ms(op.self_ms, 2), f"{op.self_ms / total * 100:.1f}", str(op.calls), fmt.flops(op.flops),
              fmt.flops(op.flops / (op.self_ms / 1000.0)) if op.flops and op.self_ms > 0 else fmt.DASH,
              op.shapes or fmt.DASH))
            for op in model.ops
        )
