"""Small widgets shared by the views: a labelled sparkline row, a phase bar, a keyed-table helper."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any
from weakref import WeakKeyDictionary

from llmtop.protocol.events import PHASES
from llmtop.tui.session.fmt import DASH
from rich.cells import cell_len
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import DataTable, Label, Sparkline, Static, TabbedContent, TabPane

PHASE_GLYPHS = {"data": "▒", "h2d": "░", "forward": "█", "backward": "▓", "optimizer": "▚", "other": "·"}
PHASE_STYLES = {"data": "red", "h2d": "magenta", "forward": "green", "backward": "blue",
                "optimizer": "yellow", "other": "bright_black"}
PHASE_LABELS = {"data": "data", "h2d": "H2D", "forward": "fwd", "backward": "bwd",
                "optimizer": "optim", "other": "other"}


_SHOWN: WeakKeyDictionary[Static, tuple[Any, tuple[int, ...] | None]] = WeakKeyDictionary()


def show_text(widget: Static, content: Text | str) -> None:
    """``widget.update(content)`` for a view's frame: nothing when the content is unchanged, and no
    layout pass when its size cannot have changed. Textual lays out the whole screen after every
    ``Static.update`` by default; at 160×50 that was about a third of a frame."""
    key = _content_key(content)
    last = _SHOWN.get(widget)
    if last is not None and last[0] == key:
        return
    shape = _text_shape(widget, content)
    widget.update(content, layout=shape is None or last is None or last[1] != shape)
    _SHOWN[widget] = (key, shape)


def _content_key(content: Text | str) -> Any:
    if isinstance(content, Text):  # (Text's own == leaves out its base style and overflow)
        return (content.plain, tuple(content.spans), str(content.style), content.justify, content.overflow,
                content.no_wrap, content.end)
    return content


def _text_shape(widget: Static, content: Text | str) -> tuple[int, ...] | None:
    """What the widget's size can depend on: its line count and width, and the longest line when its
    width is auto; None when unknown (markup in a str, or a line that would wrap)."""
    if not isinstance(content, Text):
        return None
    width = widget.content_size.width
    lines = [cell_len(line) for line in content.plain.split("\n")]
    if width <= 0 or (not content.no_wrap and max(lines) > width):
        return None
    return (len(lines), width, max(lines) if widget.styles.width is None or widget.styles.width.is_auto else -1)


class ViewTabs(TabbedContent):
    """The views' tabs. Keys switch views, focus never does: TabbedContent activates the pane of a
    widget that gets focus, and a focus queued by one view key (the view's table) would otherwise
    switch back after the next key had switched away."""

    def _on_tab_pane_focused(self, event: TabPane.Focused) -> None:
        event.stop()
        event.prevent_default()  # Textual would go on to call TabbedContent's handler too


class SparkRow(Horizontal):
    """``label  ▁▂▃▅▇  value``; absent data shows an empty line and a dash, never zeros."""

    DEFAULT_CSS = """
    SparkRow { height: 1; width: 1fr; }
    SparkRow > .spark-label { width: 12; color: $text-muted; }
    SparkRow > Sparkline { width: 1fr; min-width: 8; margin: 0 1 0 0; }
    SparkRow > .spark-value { width: 20; text-align: right; }
    """

    def __init__(self, label: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.label = label
        self._last: tuple[Any, ...] | None = None
        self._pending: tuple[Sequence[float], str] | None = None

    def compose(self) -> ComposeResult:
        yield Label(self.label, classes="spark-label")
        yield Sparkline([], summary_function=max)
        yield Label(DASH, classes="spark-value")

    def on_mount(self) -> None:
        if self._pending is not None:  # data that arrived between mount() and compose
            self.show(*self._pending)

    def set_label(self, label: str) -> None:
        if label != self.label:
            self.label = label
            for widget in self.query(".spark-label").results(Label):
                widget.update(label)

    def show(self, values: Sequence[float], text: str) -> None:
        key = (len(values), values[-1] if values else None, values[0] if values else None, text)
        if key == self._last:
            return
        sparks = self.query(Sparkline)
        if not sparks:  # mounted but not composed yet: keep the data for on_mount
            self._pending = (values, text)
            return
        self._pending = None
        self._last = key
        spark = sparks.first()
        spark.data = list(values)
        spark.visible = bool(values)  # absent data is blank, not a flat line of zeros
        show_text(self.query_one(".spark-value", Label), text)


class PhaseBar(Widget):
    """A stacked bar of step phases over the recent window, with glyphs so it reads without colour."""

    DEFAULT_CSS = "PhaseBar { height: 2; width: 1fr; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.totals: dict[str, float] = {}

    def show(self, totals: dict[str, float]) -> None:
        if totals != self.totals:
            self.totals = dict(totals)
            self.refresh()

    def render(self) -> Text:
        width = max(10, self.size.width)
        total = sum(self.totals.values())
        if not total:
            return Text(f"phases {DASH} (no phase data yet)", style="dim")
        bar = Text()
        used = 0
        shares = [(p, self.totals.get(p, 0.0) / total) for p in PHASES]
        for i, (phase, share) in enumerate(shares):
            cells = round(share * width) if i < len(shares) - 1 else width - used
            cells = max(0, min(cells, width - used))
            used += cells
            bar.append(PHASE_GLYPHS[phase] * cells, style=PHASE_STYLES[phase])
        legend = Text()
        for phase, share in shares:
            if share <= 0:
                continue
            legend.append(PHASE_GLYPHS[phase], style=PHASE_STYLES[phase])
            legend.append(f" {PHASE_LABELS[phase]} {share * 100:.0f}%  ")
        return Text("\n").join([bar, legend])


def heat_style(share: float | None) -> str:
    """A colour for a share of the step: nothing below 5 %, then warm to hot."""
    if share is None or share < 0.05:
        return ""
    if share < 0.15:
        return "yellow"
    if share < 0.35:
        return "bold dark_orange"
    return "bold red"


def heat_bar(share: float | None, width: int = 5) -> str:
    """A little bar so the share also reads without colour."""
    if share is None:
        return " " * width
    eighths = round(max(0.0, min(1.0, share)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")).ljust(width)[:width]


class KeyedText(Text):
    """A first-column cell that knows its row key, so ``DataTable.sort`` can order rows by key."""

    def __init__(self, text: str | Text, row_key: str) -> None:
        if isinstance(text, Text):
            super().__init__(text.plain, style=text.style, no_wrap=True, overflow="ellipsis")
            self.spans = list(text.spans)
        else:
            super().__init__(str(text), no_wrap=True, overflow="ellipsis")
        self.row_key = row_key


class KeyedTable:
    """Keeps a DataTable in step with a keyed row set: add new keys, remove gone ones, update
    changed cells by key, reorder in place. Nothing is cleared and refilled each frame."""

    def __init__(self, table: DataTable, columns: Sequence[tuple[str, str]]) -> None:
        self.table = table
        self.columns = [key for key, _ in columns]
        self.rows: dict[str, tuple[Any, ...]] = {}
        self.order: list[str] = []
        for key, title in columns:
            table.add_column(title, key=key)

    def sync(self, rows: Iterable[tuple[Hashable, Sequence[Any]]]) -> bool:
        """Make the table show ``rows`` (key, cells) in the given order. True if the row set changed."""
        table = self.table
        wanted: dict[str, tuple[Any, ...]] = {str(k): tuple(cells) for k, cells in rows}
        changed = False
        for key in [k for k in self.rows if k not in wanted]:
            table.remove_row(key)
            del self.rows[key]
            changed = True
        first = self.columns[0]
        for key, cells in wanted.items():
            old = self.rows.get(key)
            if old is None:
                table.add_row(KeyedText(cells[0], key), *cells[1:], key=key)
                changed = True
            elif old != cells:
                for col, new, prev in zip(self.columns, cells, old, strict=True):
                    if new != prev:
                        table.update_cell(key, col, KeyedText(new, key) if col == first else new)
            self.rows[key] = cells
        order = list(wanted)
        if changed or order != self.order:
            rank = {k: i for i, k in enumerate(order)}
            table.sort(first, key=lambda cell: rank.get(getattr(cell, "row_key", ""), len(rank)))
            self.order = order
        return changed
