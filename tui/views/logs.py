"""Logs: the script's stdout and stderr, ANSI colours kept, ``\\r`` progress lines collapsed (the
model already replaces them), bounded by the model's ring, with a search box."""

from __future__ import annotations

from llmtop.tui.session.model import LogEntry, SessionModel
from llmtop.tui.views.widgets import show_text
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Input, Static

STDERR_STYLE = Style(color="red")


class LogPane(ScrollView, can_focus=True):
    """Renders only the visible lines; follows the tail unless scrolled up."""

    DEFAULT_CSS = "LogPane { height: 1fr; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.lines: list[Text] = []
        self._cache: dict[int, Text] = {}  # entry seq → parsed text (ANSI decoded once)

    def set_entries(self, entries: list[LogEntry], search: str) -> None:
        follow = self.scroll_y >= self.max_scroll_y - 1
        cache: dict[int, Text] = {}
        lines: list[Text] = []
        needle = search.lower()
        for entry in entries:
            text = self._cache.get(entry.seq)
            if text is None:
                text = Text.from_ansi(entry.text, no_wrap=True, end="")
                if entry.stream == "stderr" and not text.spans:
                    text.stylize(STDERR_STYLE)
            cache[entry.seq] = text
            if needle:
                if needle not in text.plain.lower():
                    continue
                text = text.copy()
                text.highlight_words([search], style="reverse", case_sensitive=False)
            lines.append(text)
        self._cache = cache
        self.lines = lines
        width = max((t.cell_len for t in lines[-500:]), default=0)
        self.virtual_size = Size(width, len(lines))
        if follow:
            self.scroll_end(animate=False, immediate=True, x_axis=False)
        self.refresh()

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        index = scroll_y + y
        width = self.size.width
        if index >= len(self.lines):
            return Strip.blank(width, self.rich_style)
        segments = list(self.lines[index].render(self.app.console, end=""))
        # every segment gets a style: NO_COLOR's monochrome filter needs one
        strip = Strip(segments).apply_style(self.rich_style).crop(scroll_x, scroll_x + width)
        return strip.extend_cell_length(width, self.rich_style) if strip.cell_length < width else strip

    def text(self) -> str:
        return "\n".join(t.plain for t in self.lines)


class LogsView(Vertical):
    DEFAULT_CSS = """
    LogsView #logs-search { display: none; height: 3; }
    LogsView.searching #logs-search { display: block; }
    LogsView #logs-info { height: 1; color: $text-muted; padding: 0 1; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.search = ""
        self._seen: tuple[int, int, str] = (-1, -1, "")
        self._model: SessionModel | None = None

    def compose(self) -> ComposeResult:
        yield Input(placeholder="search the output (esc closes)", id="logs-search")
        yield Static(id="logs-info")
        yield LogPane(id="logs-pane")

    def open_filter(self) -> None:
        self.add_class("searching")
        self.query_one("#logs-search", Input).focus()

    def close_filter(self) -> bool:
        box = self.query_one("#logs-search", Input)
        if box.has_focus:
            self.query_one(LogPane).focus()
            if not box.value:
                self.remove_class("searching")
            return True
        if self.search:
            box.value = ""
            self.remove_class("searching")
            return True
        return False

    def on_input_changed(self, event: Input.Changed) -> None:
        self.search = event.value
        if self._model is not None:
            with self._model.lock:
                self.refresh_view(self._model, 0.0)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(LogPane).focus()

    def refresh_view(self, model: SessionModel, window_s: float) -> None:
        self._model = model
        key = (model.log_seq, len(model.logs), self.search)
        if key == self._seen:
            return
        self._seen = key
        pane = self.query_one(LogPane)
        pane.set_entries(list(model.logs), self.search)
        info = f"{len(model.logs)} lines"
        if model.log_total > len(model.logs):
            info += f" (older lines dropped; {model.logs.maxlen} kept)"
        if self.search:
            info += f" · {len(pane.lines)} match “{self.search}”"
        if not model.logs:
            info = "no output yet" if model.logs_from_viewer else \
                "no output here: the script's stdout and stderr are shown under `llmtop attach`"
        show_text(self.query_one("#logs-info", Static), info)

