"""Layers: the module tree as a table: expand/collapse, sort by any column, filter by name, heat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmtop.tui.session import fmt
from llmtop.tui.session.layers import Layer
from llmtop.tui.session.model import SessionModel
from llmtop.tui.views.tree_table import Column, TreeTable
from llmtop.tui.views.widgets import heat_bar, heat_style, show_text
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Static

COLUMNS = (
    Column("name", "module"),
    Column("class", "class"),
    Column("params", "params", "right"),
    Column("fwd", "fwd ms", "right"),
    Column("bwd", "bwd ms", "right"),
    Column("share", "% step"),
    Column("calls", "calls", "right"),
    Column("act", "act mem", "right"),
    Column("flops", "FLOPs", "right"),
    Column("achieved", "FLOP/s", "right"),
    Column("bound", "bound"),
)
TITLES = {c.key: c.title for c in COLUMNS}
SORTS = ("tree",) + tuple(c.key for c in COLUMNS)
CONTAINERS = {"ModuleList", "Sequential", "ModuleDict"}  # expanded by default: they only hold blocks

SortKey = Callable[[Layer, SessionModel], Any]
SORT_KEYS: dict[str, SortKey] = {
    "name": lambda la, m: la.path,
    "class": lambda la, m: la.cls,
    "params": lambda la, m: la.total_params,
    "fwd": lambda la, m: la.fwd_ema or 0.0,
    "bwd": lambda la, m: la.bwd_ema or 0.0,
    "share": lambda la, m: la.time_ms or 0.0,
    "calls": lambda la, m: la.calls or 0,
    "act": lambda la, m: la.act_ema or 0.0,
    "flops": lambda la, m: la.step_flops or 0.0,
    "achieved": lambda la, m: la.achieved_flops or 0.0,
    "bound": lambda la, m: la.bound or "",
}
DESCENDING = {"params", "fwd", "bwd", "share", "calls", "act", "flops", "achieved"}


def display_name(layer: Layer, layers: dict[int, Layer]) -> str:
    """Short name; numbered children of a list show as ``h.0`` rather than a bare ``0``."""
    if not layer.path:
        return layer.cls
    name = layer.name
    if name.isdigit():
        parent = layers.get(layer.parent)
        if parent is not None and parent.path:
            return f"{parent.name}.{name}"
    return name


class LayersView(Vertical):
    BINDINGS = [
        Binding("space", "toggle", "Expand", id="layers.toggle"),
        Binding("x", "expand_hottest", "Expand hottest", id="layers.expand_hottest"),
        Binding("s", "cycle_sort", "Sort", id="layers.sort", tooltip="Sort by the next column"),
        Binding("r", "reverse_sort", "Reverse", id="layers.reverse", show=False),
        Binding("c", "collapse_all", "Collapse all", id="layers.collapse", show=False),
    ]
    DEFAULT_CSS = """
    LayersView #layers-filter { display: none; height: 3; }
    LayersView.filtering #layers-filter { display: block; }
    LayersView #layers-info { height: 1; color: $text-muted; padding: 0 1; }
    LayersView TreeTable { height: 1fr; }
    """

    class Open(Message):
        """A layer was chosen for the detail screen."""

        def __init__(self, layer_id: int) -> None:
            super().__init__()
            self.layer_id = layer_id

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.expanded: set[int] = set()
        self.sort = "tree"
        self.reverse = False
        self.filter = ""
        self._tree_version = -1
        self._model: SessionModel | None = None
        self.dirty = True  # a structural change (expand, sort, filter) waiting for the next frame
        self._info = ""

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter modules by name (esc closes)", id="layers-filter")
        yield Static(id="layers-info")
        yield TreeTable(COLUMNS, id="layers-table")

    # --- actions -------------------------------------------------------------------------------

    def _cursor_id(self) -> int | None:
        key = self.query_one(TreeTable).cursor_key
        return int(key) if key is not None else None

    def _changed(self) -> None:
        self.dirty = True
        if self._model is not None:
            with self._model.lock:
                self.refresh_view(self._model, 0.0)

    def action_toggle(self) -> None:
        mid = self._cursor_id()
        if mid is None:
            return
        if mid in self.expanded:
            self.expanded.discard(mid)
        else:
            self.expanded.add(mid)
        self._changed()

    def action_expand_hottest(self) -> None:
        model = self._model
        if model is None:
            return
        with model.lock:
            for layer in model.hottest_layers(5):
                parent = model.layers.get(layer.parent)
                while parent is not None:
                    self.expanded.add(parent.id)
                    parent = model.layers.get(parent.parent)
            hottest = model.hottest_layers(1)
        self._changed()
        if hottest:
            self.move_to(hottest[0].id)

    def action_collapse_all(self) -> None:
        self.expanded.clear()
        self._changed()

    def action_cycle_sort(self) -> None:
        self.set_sort(SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)])

    def action_reverse_sort(self) -> None:
        self.reverse = not self.reverse
        self._changed()

    def set_sort(self, key: str) -> None:
        if key == self.sort:
            self.reverse = not self.reverse
        else:
            self.sort, self.reverse = key, False
        self._changed()

    def move_to(self, layer_id: int) -> None:
        self.query_one(TreeTable).move_to_key(str(layer_id))

    def open_filter(self) -> None:
        self.add_class("filtering")
        self.query_one("#layers-filter", Input).focus()

    def close_filter(self) -> bool:
        """esc: close the filter box (keeping its text); a second esc clears it. True if handled."""
        box = self.query_one("#layers-filter", Input)
        if box.has_focus:
            self.query_one(TreeTable).focus()
            if not box.value:
                self.remove_class("filtering")
            return True
        if self.filter:
            box.value = ""
            self.remove_class("filtering")
            return True
        return False

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "layers-filter":
            self.filter = event.value.strip().lower()
            self._changed()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(TreeTable).focus()

    def on_tree_table_row_selected(self, event: TreeTable.RowSelected) -> None:
        event.stop()
        self.post_message(self.Open(int(event.key)))

    def on_tree_table_header_selected(self, event: TreeTable.HeaderSelected) -> None:
        event.stop()
        self.set_sort(event.column)

    def selected(self) -> int | None:
        return self._cursor_id()

    # --- frame ---------------------------------------------------------------------------------

    def refresh_view(self, model: SessionModel, window_s: float) -> None:
        self._model = model
        if model.tree_version != self._tree_version:
            self._tree_version = model.tree_version
            self._default_expansion(model)
        rows = [(str(layer.id), self._cells(layer, depth, model)) for layer, depth in self.visible(model)]
        self.query_one(TreeTable).sync(rows)
        self.dirty = False
        sort = "tree order" if self.sort == "tree" else f"sorted by {TITLES[self.sort]}"
        if self.sort != "tree" and self.reverse:
            sort += " (reversed)"
        info = f" · {sort}"
        if self.filter:
            info += f" · filter “{self.filter}”: {len(rows)} shown"
        if model.flops_signature:
            info += f" · FLOPs for {model.flops_signature}"
            if model.flops_method and model.flops_method != "meta":
                info += f" ({model.flops_method})"
        stale = model.layers_stale
        if stale:
            info += f" · ⚠ {stale}"
        if model.last_step is not None and model.last_step.layer_every > 1:
            info += f" · timed every {model.last_step.layer_every} steps"
        self._info = info
        self._show_info()

    def _show_info(self) -> None:
        """The info line, ending with the full path of the row under the cursor."""
        model, mid = self._model, self._cursor_id()
        if model is None or not model.layers:
            show_text(self.query_one("#layers-info", Static), "waiting for a model tree…")
            return
        text = f"{len(model.layers)} modules"
        if mid is not None and mid in model.layers:
            text += f" · ▸ {model.layers[mid].path or model.layers[mid].cls}"
        show_text(self.query_one("#layers-info", Static), text + self._info)

    def on_tree_table_row_highlighted(self, event: TreeTable.RowHighlighted) -> None:
        event.stop()
        if self._model is not None:
            with self._model.lock:
                self._show_info()

    def _default_expansion(self, model: SessionModel) -> None:
        for layer in model.layers.values():
            if layer.depth <= 1 or layer.cls in CONTAINERS:
                self.expanded.add(layer.id)

    def visible(self, model: SessionModel) -> list[tuple[Layer, int]]:
        """Rows to show, in display order: the expanded tree (or filter matches with their
        ancestors), siblings ordered by the sort column."""
        layers = model.layers
        keep: set[int] | None = None
        if self.filter:
            keep = set()
            for layer in layers.values():
                if self.filter in layer.path.lower() or self.filter in layer.cls.lower():
                    mid: int | None = layer.id
                    while mid is not None and mid in layers and mid not in keep:
                        keep.add(mid)
                        mid = layers[mid].parent
        key = SORT_KEYS.get(self.sort)
        descending = (self.sort in DESCENDING) != self.reverse

        def ordered(ids: list[int]) -> list[int]:
            if key is None:
                return list(reversed(ids)) if self.reverse and self.sort != "tree" else ids
            return sorted(ids, key=lambda i: key(layers[i], model), reverse=descending)

        out: list[tuple[Layer, int]] = []
        stack = [(mid, 0) for mid in reversed(ordered([r for r in model.roots if r in layers]))]
        while stack:
            mid, depth = stack.pop()
            if keep is not None and mid not in keep:
                continue
            layer = layers[mid]
            out.append((layer, depth))
            if layer.children and (keep is not None or mid in self.expanded):
                stack.extend((c, depth + 1) for c in reversed(ordered(layer.children)))
        return out

    def _cells(self, layer: Layer, depth: int, model: SessionModel) -> tuple[Any, ...]:
        if layer.children:
            open_ = self.filter or layer.id in self.expanded
            marker = "▾ " if open_ else "▸ "
        else:
            marker = "  "
        name = Text("  " * depth + marker + display_name(layer, model.layers), no_wrap=True)
        if self.filter and self.filter in layer.path.lower():
            name.stylize("bold")
        share = model.layer_share(layer)
        heat = heat_style(share)
        return (
            name,
            Text(layer.cls, style="dim"),
            fmt.count(layer.total_params) if layer.total_params else fmt.DASH,
            Text(fmt.ms(layer.fwd_ema), style=heat),
            fmt.ms(layer.bwd_ema),
            Text(f"{fmt.pct(share):>6} {heat_bar(share)}", style=heat),
            fmt.DASH if layer.calls is None else str(layer.calls),
            fmt.nbytes(layer.act_ema),
            fmt.flops(layer.step_flops),  # the timed step's own calls, never per-call × calls
            _achieved_cell(layer),
            layer.bound or fmt.DASH,
        )


def _achieved_cell(layer: Layer) -> Text | str:
    """FLOP/s of the timed step, or a dim "—" when it is unknown or impossible (the reason is in the
    layer's detail screen)."""
    value = layer.achieved_flops
    if value is None:
        return Text(fmt.DASH, style="dim") if layer.achieved_note else fmt.DASH
    return fmt.flops(value)
