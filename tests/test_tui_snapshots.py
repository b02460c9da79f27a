"""SVG snapshots of each view at 80×24 and 160×50 (the overview also at 140×40 and 200×60), from a
deterministic canned session.

Regenerate after an intended change with ``pytest tests/test_tui_snapshots.py --snapshot-update`` and
look at the report before committing. Time is fixed (the app's clock) and the events are seeded.
"""

from __future__ import annotations

import asyncio

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


@pytest.mark.parametrize(("size", "side_by_side"), [((80, 24), False), ((139, 40), False), ((140, 40), True),
                                                    ((200, 60), True)])
def test_overview_columns_follow_the_width(size: tuple[int, int], side_by_side: bool) -> None:
    """The layout itself (not only its picture): two columns from 140 terminal columns on, and more
    layer rows the taller the terminal."""
    asyncio.run(_overview_columns(size, side_by_side))


async def _overview_columns(size: tuple[int, int], side_by_side: bool) -> None:
    app = make_app()
    async with app.run_test(size=size) as pilot:
        await loaded(pilot)
        left, right = app.query_one("#ov-left").region, app.query_one("#ov-right").region
        assert (right.x > left.right - 1 and right.y == left.y) is side_by_side
        layers = str(app.query_one("#ov-hot-layers").render()).splitlines()
        ops = str(app.query_one("#ov-hot-ops").render())
        if side_by_side:
            assert len(layers) - 1 > 5 and "[1024, 768]x[768, 3072]" in ops  # rows for the height; shapes
        else:
            assert len(layers) - 1 == 5


def test_hot_ops_say_when_a_profile_has_no_shapes() -> None:
    from llmtop.protocol.events import Ops
    from llmtop.tui.session.model import SessionModel
    from llmtop.tui.views.overview import hot_ops_text

    model = SessionModel()
    model.apply(Ops(step=3, names=["aten::mm"], self_ms=[2.0], calls=[4]))
    assert "input shapes not recorded" in hot_ops_text(model).plain
    model.apply(Ops(step=4, names=["aten::mm"], self_ms=[2.0], calls=[4], shapes=["[2, 3]x[3, 4]"]))
    assert "input shapes not recorded" not in hot_ops_text(model).plain and "[2, 3]x[3, 4]" in hot_ops_text(model).plain
