"""SVG snapshots of each view at 80×24 and 160×50 (the overview also at 140×40 and 200×60), from a
deterministic canned session.

Regenerate after an intended change with ``pytest tests/test_tui_snapshots.py --snapshot-update`` and
look at the report before committing. Time is fixed (the app's clock) and the events are seeded.
"""

from __future__ import annotations

import pytest
from llmtop.tui.session.canned import T0, session_events
from llmtop.tui.session.source import EventsSource
from llmtop.tui.views.app import LlmtopApp
from llmtop.tui.views.keys import VIEWS

SIZES = [(80, 24), (160, 50)]


def make_app(**kw) -> LlmtopApp:
    source = EventsSource(session_events(60, gpu=kw.pop("gpu", True), **kw))
    return LlmtopApp(source, clock=lambda: T0 + 30.0)


async def loaded(pilot) -> None:
    app = pilot.app
    assert app.source.done.wait(10)
    await pilot.pause()
    app.frame(force=True)
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("view", [name for name, _ in VIEWS])
def test_view(snap_compare, view: str, size: tuple[int, int]) -> None:
    key = str([name for name, _ in VIEWS].index(view) + 1)

    async def before(pilot) -> None:
        await loaded(pilot)
        await pilot.press(key)
        await loaded(pilot)

    assert snap_compare(make_app(), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_detail(snap_compare, size: tuple[int, int]) -> None:
    async def before(pilot) -> None:
        await loaded(pilot)
        await pilot.press("2")
        await loaded(pilot)
        await pilot.press("enter")
        await loaded(pilot)

    assert snap_compare(make_app(), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", [(140, 40), (200, 60)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_overview_uses_the_space(snap_compare, size: tuple[int, int]) -> None:
    """From 140 columns: two columns (the run over time left; diagnoses, layers and ops with shapes
    right), and as many layer rows as the height allows."""
    assert snap_compare(make_app(), terminal_size=size, run_before=loaded)


def test_help(snap_compare) -> None:
    async def before(pilot) -> None:
        await loaded(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=before)


def test_overview_cpu_only_nan_loss_and_ended(snap_compare) -> None:
    """Absent CUDA data as dashes, a NaN diagnosis, and the finished state in the status line."""
    assert snap_compare(make_app(gpu=False, nan_from=40, end=True), terminal_size=(100, 30), run_before=loaded)


def test_light_theme(snap_compare) -> None:
    app = make_app()
    app.theme = "textual-light"
    assert snap_compare(app, terminal_size=(80, 24), run_before=loaded)


def test_no_color_layers(snap_compare, monkeypatch: pytest.MonkeyPatch) -> None:
    """With NO_COLOR the heat shows as bars and the state as words; nothing relies on colour."""
    monkeypatch.setenv("NO_COLOR", "1")
    app = make_app()
    assert app.no_color

    async def before(pilot) -> None:
        await loaded(pilot)
        await pilot.press("2")
        await loaded(pilot)

    assert snap_compare(app, terminal_size=(80, 24), run_before=before)
