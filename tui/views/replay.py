"""`llmtop replay FILE`: the dashboard on a recording, with transport controls.

The same app as `llmtop watch` (``LlmtopApp``) fed by a ``RecordingSource`` instead of a socket,
plus a transport bar above the footer. Keys follow the video-player habit: ``k`` play/pause,
``j``/``l`` back/forward 10 s (``J``/``L`` 60 s), ``,``/``.`` previous/next step, ``<``/``>``
slower/faster, ``home``/``end`` start/end, ``g`` go to a step or a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import partial

from llmtop.tui.session import fmt
from llmtop.tui.session.recording_source import MAX_SPEED, MIN_SPEED, RecordingSource
from llmtop.tui.views.app import LlmtopApp
from llmtop.tui.views.help import HelpScreen
from llmtop.tui.views.layer_detail import LayerDetail
from llmtop.tui.views.layers import LayersView
from llmtop.tui.views.widgets import show_text
from rich.text import Text
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widget import Widget
from textual.widgets import Input, Label, Static

SEEK_S = 10.0
BIG_SEEK_S = 60.0

TRANSPORT_KEYS: list[Binding] = [
    Binding("k", "toggle_play", "Play/Pause", id="replay.play", tooltip="Play or pause the replay"),
    Binding("j", f"seek({-SEEK_S})", "-10s", id="replay.back", tooltip="Seek back 10 seconds"),
    Binding("l", f"seek({SEEK_S})", "+10s", id="replay.forward", tooltip="Seek forward 10 seconds"),
    Binding("J", f"seek({-BIG_SEEK_S})", "-60s", id="replay.back_big", show=False,
            tooltip="Seek back 60 seconds"),
    Binding("L", f"seek({BIG_SEEK_S})", "+60s", id="replay.forward_big", show=False,
            tooltip="Seek forward 60 seconds"),
    Binding("comma", "step(-1)", "Prev step", key_display=",", id="replay.prev_step",
            tooltip="Go to the previous step"),
    Binding("full_stop", "step(1)", "Next step", key_display=".", id="replay.next_step",
            tooltip="Go to the next step"),
    Binding("less_than_sign", "speed(-1)", "Slower", key_display="<", id="replay.slower",
            tooltip=f"Halve the replay speed (down to {MIN_SPEED:g}x)"),
    Binding("greater_than_sign", "speed(1)", "Faster", key_display=">", id="replay.faster",
            tooltip=f"Double the replay speed (up to {MAX_SPEED:g}x)"),
    Binding("home", "seek_start", "Start", id="replay.start", show=False, tooltip="Go to the start"),
    Binding("end,G", "seek_end", "End", key_display="end", id="replay.end",
            tooltip="Go to the end: the final state of the run"),
    Binding("g", "goto", "Go to", id="replay.goto", tooltip="Go to a step (120) or a time (1:30, 90s, 50%)"),
]


def parse_target(text: str, duration: float) -> tuple[str, float] | None:
    """What the go-to box asks for: ("step", n) for "120" or "step 120"; ("time", s) for "1:30",
    "1:02:03", "90s", "2m", "50%". None when it makes no sense."""
    text = text.strip().lower()
    if not text:
        return None
    m = re.fullmatch(r"(?:step\s*)?#?(\d+)", text)
    if m:
        return "step", float(m.group(1))
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text)
    if m:
        return "time", duration * min(100.0, float(m.group(1))) / 100.0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|h)", text)
    if m:
        return "time", float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    m = re.fullmatch(r"(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)", text)
    if m:
        h, mi, s = m.groups()
        return "time", int(h or 0) * 3600 + int(mi) * 60 + float(s)
    return None


def position_bar(position: float, duration: float, width: int) -> str:
    """``━━━━●────``: where the replay is in the recording."""
    width = max(4, width)
    frac = 0.0 if duration <= 0 else min(1.0, max(0.0, position / duration))
    at = min(width - 1, int(round(frac * (width - 1))))
    return "━" * at + "●" + "─" * (width - 1 - at)


class GotoScreen(ModalScreen[str | None]):
    """A one-line prompt: a step number or a time."""

    BINDINGS = [Binding("escape", "dismiss_none", "Cancel", id="goto.cancel")]
    DEFAULT_CSS = """
    GotoScreen { align: center middle; }
    GotoScreen > Vertical { width: 56; height: auto; border: round $accent; background: $panel; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Go to step (120) or time (1:30, 90s, 50%):")
            yield Input(id="goto-input", placeholder="step or time")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class ReplayApp(LlmtopApp):
    """The dashboard on a ``RecordingSource``, with the transport bar and keys."""

    BINDINGS = TRANSPORT_KEYS
    DEFAULT_CSS = """
    #transport { height: 1; width: 1fr; background: $panel; }
    """

    def __init__(self, source: RecordingSource, **kwargs) -> None:
        kwargs.setdefault("title", f"llmtop replay {source.path}")
        super().__init__(source, clock=source.now, **kwargs)
        self.replay = source
        self._notes_shown = len(getattr(source, "notes", ()))  # a job's: on_mount shows these in its warning

    def compose_extra(self) -> Iterable[Widget]:
        yield Static(id="transport")

    def on_mount(self) -> None:
        super().on_mount()
        if self.replay.warning:
            self.notify(self.replay.warning, severity="warning", timeout=8)

    def frame(self, force: bool = False) -> None:
        try:
            show_text(self.query_one("#transport", Static), self.transport_text())
        except Exception:  # not mounted yet
            pass
        notes = getattr(self.replay, "notes", ())  # a job's rank stopped at a bad block: the others go on
        for note in notes[self._notes_shown:]:
            self.notify(note, severity="warning", timeout=8)
        self._notes_shown = len(notes)
        super().frame(force)

    def transport_text(self) -> Text:
        src = self.replay
        state = "▶" if src.playing else "⏸"
        if src.at_end and not src.playing:
            state = "■"
        head = f" {state} {src.speed:g}x "
        step = f" step {src.step if src.step is not None else fmt.DASH}"
        last = src.reader.last_step
        if last is not None:
            step += f"/{last}"
        clock = f" {fmt.duration(src.position)} / {fmt.duration(src.duration)}"
        width = max(10, (self.size.width or 80) - len(head) - len(clock) - len(step) - 2)
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(head, style="bold reverse")
        text.append(" " + position_bar(src.position, src.duration, width))
        text.append(clock)
        text.append(step, style="bold")
        return text

    def action_help(self) -> None:
        """The help screen lists the transport keys first, then the app's and the views' keys."""
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen([("Replay", list(TRANSPORT_KEYS)), ("Layers view", list(LayersView.BINDINGS)),
                                     ("Layer detail", list(LayerDetail.BINDINGS))]))  # type: ignore[arg-type]

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for binding in TRANSPORT_KEYS:
            help_text = f"{binding.tooltip or binding.description} [{binding.key_display or binding.key}]"
            yield SystemCommand(f"Replay: {binding.description}", help_text,
                                partial(self.run_action, binding.action))

    def _after_seek(self) -> None:
        # The worker applies the request within a tick; draw once it has.
        self.set_timer(0.1, lambda: self.frame(force=True))

    def action_toggle_play(self) -> None:
        self.replay.toggle()
        self.frame(force=True)

    def action_seek(self, seconds: float) -> None:
        self.replay.seek_relative(float(seconds))
        self._after_seek()

    def action_step(self, delta: int) -> None:
        if int(delta) > 0:
            self.replay.next_step()
        else:
            self.replay.prev_step()
        self._after_seek()

    def action_speed(self, direction: int) -> None:
        if int(direction) > 0:
            self.replay.faster()
        else:
            self.replay.slower()
        self.frame(force=True)

    def action_seek_start(self) -> None:
        self.replay.seek_start()
        self._after_seek()

    def action_seek_end(self) -> None:
        self.replay.seek_end()
        self._after_seek()

    def action_goto(self) -> None:
        if len(self.screen_stack) > 1:
            return
        self.push_screen(GotoScreen(), self._goto)

    def _goto(self, text: str | None) -> None:
        if text is None:
            return
        target = parse_target(text, self.replay.duration)
        if target is None:
            self.notify(f"not a step or a time: {text!r}", severity="warning", timeout=3)
            return
        kind, value = target
        if kind == "step":
            self.replay.seek_step(int(value))
        else:
            self.replay.seek_time(value)
        self._after_seek()
