"""``show_text``: a view's text reaches the screen, and Textual lays the screen out again only when the
text's size can have changed (a layout pass after every update was a third of a 160×50 frame)."""

from __future__ import annotations

import asyncio
from typing import Any

from llmtop.tui.views.widgets import show_text
from rich.text import Text
from textual.app import App, ComposeResult
from textual.widgets import Static


class OneText(App[None]):
    CSS = "#auto { height: auto; width: 1fr; }"

    def compose(self) -> ComposeResult:
        yield Static(id="auto")


def spy(widget: Static) -> list[bool]:
    """The ``layout`` argument of each ``update`` the widget gets."""
    calls: list[bool] = []
    update = widget.update

    def recorded(content: Any = "", *, layout: bool = True) -> None:
        calls.append(layout)
        update(content, layout=layout)

    widget.update = recorded  # type: ignore[method-assign]
    return calls


def test_layout_only_when_the_size_can_change() -> None:
    async def run() -> None:
        app = OneText()
        async with app.run_test(size=(40, 10)) as pilot:
            widget = app.query_one("#auto", Static)
            calls = spy(widget)
            show_text(widget, Text("step 1"))
            await pilot.pause()
            assert calls == [True]  # the first text: nothing known of its size yet
            show_text(widget, Text("step 1"))
            assert calls == [True]  # unchanged: not even a repaint
            show_text(widget, Text("step 2"))
            await pilot.pause()
            assert calls == [True, False] and "step 2" in str(widget.render())
            show_text(widget, Text("step 2", style="bold"))  # the same letters in another style
            assert calls == [True, False, False]
            show_text(widget, Text("step 3\nloss 1.2"))  # one more line: the height changes
            await pilot.pause()
            assert calls[-1] is True and widget.size.height == 2
            show_text(widget, Text("step 4\nloss 1.1"))
            assert calls[-1] is False
            show_text(widget, Text("x" * 100))  # wider than the widget: it wraps, so ask Textual
            await pilot.pause()
            assert calls[-1] is True and widget.size.height > 1
            show_text(widget, "[b]markup[/b]")  # a str may be markup: its size is not known here
            assert calls[-1] is True
            show_text(widget, Text("step 5"))
            await pilot.pause()
            await pilot.resize_terminal(60, 10)  # another width: lines may wrap otherwise
            await pilot.pause()
            show_text(widget, Text("step 6"))
            show_text(widget, Text("step 7"))
            await pilot.pause()
            assert calls[-2:] == [True, False] and "step 7" in str(widget.render())

    asyncio.run(run())
