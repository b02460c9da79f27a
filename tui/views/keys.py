"""The key registry: every app-wide key declared once, with an id. The footer, the help screen (`?`)
and the command palette are all fed from here (views add their own few keys the same way)."""

from __future__ import annotations

from textual.binding import Binding

VIEWS: tuple[tuple[str, str], ...] = (
    ("overview", "Overview"),
    ("layers", "Layers"),
    ("memory", "Memory"),
    ("spans", "Spans"),
    ("ops", "Ops"),
    ("inference", "Inference"),
    ("logs", "Logs"),
)

KEYS: list[Binding] = [
    Binding("q", "quit_or_detach", "Quit", id="app.quit",
            tooltip="Quit; under attach, asks whether to stop the script or keep it running"),
    Binding("question_mark", "help", "Help", key_display="?", id="app.help"),
    Binding("p", "freeze", "Pause", id="app.freeze", tooltip="Freeze the view; data keeps arriving"),
    Binding("slash", "filter", "Filter", key_display="/", id="app.filter",
            tooltip="Filter layers by name / search the logs"),
    Binding("R", "toggle_record", "Record", key_display="R", id="app.record",
            tooltip="Start or stop recording what this agent sends to a .lrec file (live sources only)"),
    Binding("escape", "back", "Back", id="app.back", show=False,
            tooltip="Close a screen or filter; never quits"),
    Binding("enter", "drill", "Open", id="app.drill", show=False, tooltip="Open the selected layer"),
    Binding("plus,equals_sign", "zoom(0.5)", "Zoom in", key_display="+", id="app.zoom_in", show=False,
            tooltip="Shorter sparkline window"),
    Binding("minus", "zoom(2.0)", "Zoom out", key_display="-", id="app.zoom_out", show=False,
            tooltip="Longer sparkline window"),
    Binding("ctrl+c", "interrupt", "Interrupt", id="app.interrupt", show=False, priority=True,
            tooltip="Send SIGINT to the attached script (watch: quit)"),
] + [
    Binding(str(i), f"show_view('{name}')", title, id=f"view.{name}", show=False,
            tooltip=f"Show the {title} view")
    for i, (name, title) in enumerate(VIEWS, start=1)
]

# Keys of a job (several ranks): live only while the viewer follows more than one stream, and
# listed in the help apart, so a single process's keys, footer and help stay as they were.
RANKS_VIEW = ("ranks", "Ranks")
JOB_KEYS: list[Binding] = [
    Binding("8", "show_view('ranks')", "Ranks", id="view.ranks", show=False,
            tooltip="Show the Ranks view: a row per rank, worst skew first (enter picks a rank)"),
    Binding("right_square_bracket", "cycle_rank(1)", "Next rank", key_display="]", id="job.next_rank",
            show=False, tooltip="Show the next rank in every view"),
    Binding("left_square_bracket", "cycle_rank(-1)", "Previous rank", key_display="[", id="job.prev_rank",
            show=False, tooltip="Show the previous rank in every view"),
]
