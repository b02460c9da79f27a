"""The line the dashboard opens when the attached script waits on its stdin (``input()``)."""

from __future__ import annotations

from collections.abc import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static


class StdinPrompt(ModalScreen[str | None]):
    """Type one line into the script's terminal; enter sends it (with its newline), esc closes."""

    BINDINGS = [Binding("escape", "cancel", "close", id="stdin.cancel")]
    DEFAULT_CSS = """
    StdinPrompt { align: center middle; }
    StdinPrompt > Vertical { width: 70; height: auto; border: round $accent; padding: 0 1;
                             background: $surface; }
    """

    def __init__(self, prompt: Callable[[], str]) -> None:
        super().__init__()
        self.prompt = prompt  # the script's last output line (its prompt), read again while open

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("The script is waiting for input on stdin. Enter sends the line; esc closes.",
                         id="stdin-help")
            yield Static(self.prompt(), id="stdin-prompt", markup=False)
            yield Input(id="stdin-line")

    def on_mount(self) -> None:
        self.query_one(Input).focus()
        # the prompt may reach the view after the wait was seen (output is read on its own thread)
        self.set_interval(0.25, self._show_prompt)

    def _show_prompt(self) -> None:
        self.query_one("#stdin-prompt", Static).update(self.prompt())

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
