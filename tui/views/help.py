"""The help screen (`?`) and the quit dialog of `llmtop attach`."""

from __future__ import annotations

from llmtop.tui.views.keys import KEYS
from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static


def key_label(binding: Binding) -> str:
    if binding.key_display:
        return binding.key_display
    return binding.key.split(",")[0].replace("ctrl+", "^")


def keys_table(groups: list[tuple[str, list[Binding]]]) -> Table:
    table = Table(box=None, show_header=False, padding=(0, 1), expand=True)
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("what")
    for title, bindings in groups:
        table.add_row("", f"[bold underline]{title}[/]")
        for b in bindings:
            table.add_row(key_label(b), b.tooltip or b.description)
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape,q,question_mark", "dismiss", "Close", id="help.close"),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 80%; max-width: 90; height: 80%; border: round $primary;
        background: $surface; padding: 0 1; }
    """

    def __init__(self, view_keys: list[tuple[str, list[Binding]]] | None = None) -> None:
        super().__init__()
        self.view_keys = view_keys or []

    def compose(self) -> ComposeResult:
        groups = [("llmtop keys", [b for b in KEYS])] + self.view_keys
        with VerticalScroll():
            yield Static(keys_table(groups))
            yield Static("\nesc, q or ? closes this screen. The same keys are in the command palette "
                         "(ctrl+p).", classes="dim")

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)


class QuitScreen(ModalScreen[str]):
    """Ask what to do with the attached script: ``stop``, ``detach`` or ``cancel``."""

    BINDINGS = [
        Binding("escape", "choose('cancel')", "Cancel", id="quit.cancel"),
        Binding("s", "choose('stop')", "Stop script", id="quit.stop"),
        Binding("d", "choose('detach')", "Keep running", id="quit.detach"),
    ]
    DEFAULT_CSS = """
    QuitScreen { align: center middle; }
    QuitScreen > Vertical { width: 64; max-width: 100%; height: auto; border: round $warning;
        background: $surface; padding: 1 2; }
    QuitScreen Static { width: 100%; height: auto; }
    QuitScreen Horizontal { height: auto; margin: 1 0 0 0; }
    QuitScreen Button { margin: 0 1 0 0; min-width: 10; }
    """

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = script

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"[b]{self.script}[/] is still running.")
            yield Static("[b]s[/]: stop it (SIGINT, then SIGTERM after a grace period)\n"
                         "[b]d[/]: keep it running detached (output goes to a log file; "
                         "`llmtop watch` can pick it up)\n"
                         "[b]esc[/]: cancel")
            with Horizontal():
                yield Button("Stop script", id="stop", variant="error")
                yield Button("Keep running", id="detach", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id or "cancel")

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)
