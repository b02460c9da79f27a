"""Spans: user and integration spans grouped by category and name."""

from __future__ import annotations

from llmtop.tui.session import fmt
from llmtop.tui.session.model import SessionModel
from llmtop.tui.views.widgets import KeyedTable, show_text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

COLUMNS = (("category", "category"), ("name", "name"), ("count", "count"), ("total", "total ms"),
           ("mean", "mean ms"), ("p95", "p95 ms"), ("last", "last ms"))


class SpansView(Vertical):
    DEFAULT_CSS = """
    SpansView #spans-info { height: 1; color: $text-muted; padding: 0 1; }
    SpansView DataTable { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        yield Static(id="spans-info")
        yield DataTable(id="spans-table", cursor_type="row")

    def on_mount(self) -> None:
        self._keyed = KeyedTable(self.query_one(DataTable), COLUMNS)

    def refresh_view(self, model: SessionModel, window_s: float) -> None:
        rows = model.span_rows()
        total = sum(s.count for s in rows)
        info = f"{len(rows)} span names · {total} spans" if rows else \
            "no spans yet (llmtop.agent.span(...) and the integrations send them)"
        if model.span_overflow:
            info += f" · {model.span_overflow} beyond the {len(rows)}-name limit not kept"
        show_text(self.query_one("#spans-info", Static), info)
        self._keyed.sync(
            (f"{s.category}\x1f{s.name}",
             (s.category, s.name, str(s.count), fmt.ms(s.total_ms), fmt.ms(s.mean_ms), fmt.ms(s.p95_ms),
              fmt.ms(s.last_ms)))
            for s in rows
        )
