"""A light keyed table for the layer tree: one Text per row, rendered only when that row changed.

Textual's DataTable re-renders every visible cell whenever any cell changes; with 160 modules whose
times all move each step that costs tens of milliseconds a frame. Here each row is cached as one
strip, ``sync`` replaces only the rows whose cells changed and refreshes just those lines, and only
visible lines are drawn (Textual's line API). The first column stays put when scrolling sideways.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

GAP = 2


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    justify: str = "left"  # left | right


class TreeTable(ScrollView, can_focus=True):
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "jump(0)", "Top", show=False),
        Binding("end", "jump(-1)", "Bottom", show=False),
        Binding("enter", "select", "Open", show=False),
        Binding("left", "scroll_left", show=False),
        Binding("right", "scroll_right", show=False),
    ]
    COMPONENT_CLASSES = {"tree-table--header", "tree-table--cursor"}
    DEFAULT_CSS = """
    TreeTable { height: 1fr; background: $surface; }
    TreeTable > .tree-table--header { text-style: bold; background: $panel; }
    TreeTable > .tree-table--cursor { background: $block-cursor-blurred-background; }
    TreeTable:focus > .tree-table--cursor { background: $block-cursor-background;
        color: $block-cursor-foreground; }
    """

    class RowHighlighted(Message):
        def __init__(self, table: TreeTable, key: str | None) -> None:
            super().__init__()
            self.table = table
            self.key = key

    class RowSelected(Message):
        def __init__(self, table: TreeTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

    class HeaderSelected(Message):
        def __init__(self, table: TreeTable, column: str) -> None:
            super().__init__()
            self.table = table
            self.column = column

    def __init__(self, columns: Sequence[Column], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.columns = list(columns)
        self.widths = [len(c.title) for c in self.columns]
        self.rows: dict[str, tuple[Any, ...]] = {}
        self.order: list[str] = []
        self._index: dict[str, int] = {}
        self._cache: dict[str, Strip] = {}
        self._header: Strip | None = None
        self.cursor_row = 0

    # --- data ------------------------------------------------------------------------------------

    def sync(self, rows: Iterable[tuple[Hashable, Sequence[Any]]]) -> bool:
        """Show ``rows`` (key, cells) in this order; redraw only what changed. True if the row set or
        order changed."""
        order: list[str] = []
        changed: list[str] = []
        widened = False
        for raw_key, raw_cells in rows:
            key = str(raw_key)
            cells = tuple(raw_cells)
            order.append(key)
            if self.rows.get(key) != cells:
                self.rows[key] = cells
                changed.append(key)
                for i, cell in enumerate(cells):
                    n = cell.cell_len if isinstance(cell, Text) else len(str(cell))
                    if n > self.widths[i]:
                        self.widths[i] = n
                        widened = True
        structural = order != self.order
        if structural:
            keep = set(order)
            for key in [k for k in self.rows if k not in keep]:
                del self.rows[key]
                self._cache.pop(key, None)
            current = self.cursor_key
            self.order = order
            self._index = {k: i for i, k in enumerate(order)}
            if current in self._index:
                self.cursor_row = self._index[current]
            self.cursor_row = max(0, min(self.cursor_row, len(order) - 1))
        for key in changed:
            self._cache.pop(key, None)
        if widened:
            self._cache.clear()
            self._header = None
        if structural or widened:
            self.virtual_size = Size(self._line_width(), len(self.order) + 1)
            self.refresh()
        else:
            for key in changed:
                self.refresh_line(self._index[key] + 1)
        return structural

    @property
    def row_count(self) -> int:
        return len(self.order)

    @property
    def cursor_key(self) -> str | None:
        if 0 <= self.cursor_row < len(self.order):
            return self.order[self.cursor_row]
        return None

    def get_column(self, key: str) -> list[Any]:
        """The cells of one column in display order."""
        i = [c.key for c in self.columns].index(key)
        return [self.rows[k][i] for k in self.order]

    def move_cursor(self, row: int) -> None:
        if not self.order:
            return
        old = self.cursor_row
        self.cursor_row = max(0, min(row, len(self.order) - 1))
        self._scroll_to_cursor()
        self.refresh_line(old + 1)
        self.refresh_line(self.cursor_row + 1)
        self.post_message(self.RowHighlighted(self, self.cursor_key))

    def move_to_key(self, key: str) -> None:
        if key in self._index:
            self.move_cursor(self._index[key])

    # --- drawing ---------------------------------------------------------------------------------

    def _line_width(self) -> int:
        return 1 + sum(self.widths) + GAP * (len(self.widths) - 1) + 1

    def _render_row(self, cells: Sequence[Any], style: Style | None = None) -> Strip:
        line = Text(" ", no_wrap=True, end="")
        for i, (col, cell) in enumerate(zip(self.columns, cells, strict=True)):
            text = cell.copy() if isinstance(cell, Text) else Text(str(cell), no_wrap=True)
            text.truncate(self.widths[i], overflow="ellipsis", pad=False)
            pad = self.widths[i] - text.cell_len
            if col.justify == "right":
                line.append(" " * pad)
                line.append_text(text)
            else:
                line.append_text(text)
                line.append(" " * pad)
            if i < len(self.columns) - 1:
                line.append(" " * GAP)
        line.append(" ")
        strip = Strip(list(line.render(self.app.console, end="")), line.cell_len)
        return strip.apply_style(style) if style is not None else strip

    def _visible(self, strip: Strip) -> Strip:
        """Crop sideways, keeping the first column in place."""
        width = self.size.width
        scroll_x = self.scroll_offset.x
        if not scroll_x:
            return strip.crop_extend(0, width, self.rich_style)
        fixed = 1 + self.widths[0] + GAP
        left = strip.crop(0, fixed)
        right = strip.crop(fixed + scroll_x, fixed + scroll_x + max(0, width - fixed))
        return Strip.join([left, right]).crop_extend(0, width, self.rich_style)

    def render_line(self, y: int) -> Strip:
        base = self.rich_style
        if y == 0:
            if self._header is None:
                header_style = self.get_component_rich_style("tree-table--header")
                self._header = self._render_row([c.title for c in self.columns], base + header_style)
            return self._visible(self._header)
        index = self.scroll_offset.y + y - 1
        if index >= len(self.order):
            return Strip.blank(self.size.width, base)
        key = self.order[index]
        strip = self._cache.get(key)
        if strip is None:
            strip = self._cache[key] = self._render_row(self.rows[key], base)
        if index == self.cursor_row:
            strip = strip.apply_style(self.get_component_rich_style("tree-table--cursor"))
        return self._visible(strip)

    def on_resize(self, event: events.Resize) -> None:
        self._cache.clear()
        self._header = None

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._cache.clear()
        self._header = None

    # --- moving --------------------------------------------------------------------------------

    def _page(self) -> int:
        return max(1, self.scrollable_content_region.height - 2)

    def _scroll_to_cursor(self) -> None:
        top = self.scroll_offset.y
        rows_visible = max(1, self.scrollable_content_region.height - 1)
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False, immediate=True)
        elif self.cursor_row >= top + rows_visible:
            self.scroll_to(y=self.cursor_row - rows_visible + 1, animate=False, immediate=True)

    def action_cursor(self, delta: int) -> None:
        self.move_cursor(self.cursor_row + int(delta))

    def action_page(self, direction: int) -> None:
        self.move_cursor(self.cursor_row + int(direction) * self._page())

    def action_jump(self, where: int) -> None:
        self.move_cursor(len(self.order) - 1 if int(where) < 0 else 0)

    def action_select(self) -> None:
        key = self.cursor_key
        if key is not None:
            self.post_message(self.RowSelected(self, key))

    def on_click(self, event: events.Click) -> None:
        if event.y == 0:
            x = event.x + (self.scroll_offset.x if event.x > 1 + self.widths[0] + GAP else 0) - 1
            for col, width in zip(self.columns, self.widths, strict=True):
                if x < width + GAP:
                    self.post_message(self.HeaderSelected(self, col.key))
                    return
                x -= width + GAP
            return
        row = self.scroll_offset.y + event.y - 1
        if 0 <= row < len(self.order):
            self.move_cursor(row)
            if event.chain >= 2:
                self.action_select()
