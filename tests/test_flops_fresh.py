"""Fresh layer tables: the budget's wall-time floor, and the age every layer view shows."""

from __future__ import annotations

from llmtop.agent.instruments.budget import FRESH_S, MAX_EVERY, Budget
from llmtop.protocol.events import LayerStats, ModelTree, Step
from llmtop.tui.session.layers import STALE_STEPS
from llmtop.tui.session.model import SessionModel

from tests.test_tui_pilot import aio, rendered, settle


def costly_budget() -> Budget:
    """A budget whose measured costs allow only the slowest rate: 1 ms steps, 300 ms of extra cost
    per sampled step (the numbers seen on a busy machine)."""
    b = Budget(1.0)
    for i in range(16):
        b.observe(1_000_000, 0, sampled=i % 2 == 0, estimate_ns=300_000_000)
    b.update()
    return b


def test_the_floor_samples_a_step_every_few_seconds_whatever_the_rate() -> None:
    b = costly_budget()
    assert b.every == MAX_EVERY  # by step count alone: one table per 1000 steps
    step_ns = 100_000_000  # 100 ms steps: 71 steps are 7.1 s
    sampled = [s for s in range(1, 72) if b.sampled(s, s * step_ns)]
    assert sampled, "no table at all in a 71-step run"
    gaps = [(b2 - a) * step_ns for a, b2 in zip([0, *sampled], sampled, strict=False)]
    assert max(gaps) <= FRESH_S * 1e9 + step_ns
    # without a clock (fixed-rate callers, old behaviour) only the count applies
    b2 = costly_budget()
    assert [s for s in range(1, 72) if b2.sampled(s)] == []


def test_the_floor_adds_nothing_when_the_rate_is_already_fresh() -> None:
    b = Budget(1.0)
    b.every = 4
    step_ns = 10_000_000
    assert [s for s in range(1, 25) if b.sampled(s, s * step_ns)] == [4, 8, 12, 16, 20, 24]


def tree() -> ModelTree:
    return ModelTree(model=0, name="Net", ids=[0, 1], paths=["", "fc"], classes=["Net", "Linear"], params=[0, 10],
                     parents=[-1, 0])


def test_the_model_says_how_old_the_layer_table_is() -> None:
    m = SessionModel()
    m.apply(tree())
    m.apply(Step(step=1, t=100.0, dur_ms=500.0))
    m.apply(LayerStats(step=1, ids=[0, 1], fwd_ms=[2.0, 1.0], fwd_self_ms=[1.0, 1.0], calls=[1, 1]))
    for k in range(2, 2 + STALE_STEPS):
        m.apply(Step(step=k, t=100.0 + 0.5 * (k - 1), dur_ms=500.0))
    assert m.layers_age_steps == STALE_STEPS and m.layers_stale == ""  # a few steps: still current
    for k in range(2 + STALE_STEPS, 72):
        m.apply(Step(step=k, t=100.0 + 0.5 * (k - 1), dur_ms=500.0))
    assert m.layers_age_steps == 70 and m.layers_age_s == 35.0
    assert m.layers_stale == "layer table of step 1, 70 steps / 35 s old"
    m.apply(LayerStats(step=71, ids=[0, 1], fwd_ms=[2.0, 1.0], fwd_self_ms=[1.0, 1.0], calls=[1, 1]))
    assert m.layers_age_steps == 0 and m.layers_stale == ""


@aio
async def test_every_layer_view_shows_the_age_of_an_old_table() -> None:
    from llmtop.protocol.events import StepFlops
    from llmtop.tui.session.canned import T0, session_events
    from llmtop.tui.session.source import EventsSource
    from llmtop.tui.views.app import LlmtopApp
    from llmtop.tui.views.layer_detail import LayerDetail

    # per-layer timing stopped after step 10 while the run went on to step 60
    events = [e for e in session_events(60) if not (isinstance(e, (LayerStats, StepFlops)) and e.step > 10)]
    source = EventsSource(events)
    app = LlmtopApp(source, clock=lambda: T0 + 30)
    async with app.run_test(size=(160, 50)) as pilot:
        await settle(app, pilot, source)
        assert app.model.layers_age_steps == 50
        await pilot.press("2")
        await settle(app, pilot)
        assert "layer table of step 10, 50 steps" in rendered(app, "#layers-info")
        t = app.query_one("#view-layers").query_one("TreeTable")
        t.focus()
        t.move_cursor(row=0)
        await pilot.pause()
        await pilot.press("enter")
        await settle(app, pilot)
        assert isinstance(app.screen, LayerDetail)
        assert "layer table of step 10, 50 steps" in rendered(app, "#detail-info")
        await pilot.press("escape")
        await settle(app, pilot)
        await pilot.press("3")
        await settle(app, pilot)
        assert "layer table of step 10, 50 steps" in rendered(app, "#mem-note")
