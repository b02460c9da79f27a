"""Op profiles and per-step FLOPs follow the training steps of a loop that evaluates (issue 15): an
evaluation before training and one every N steps (``model.eval()`` + ``torch.no_grad()`` forwards of
another batch size) never land in an op profile or a step's FLOPs, and the step numbers that start
again from 0 when training begins never pair a training step with the evaluation's records.

The real instruments (layers, steps, FLOPs, ops) run in this process on one context, polled in the
agent's order after each iteration (as its ticks would); the events are fed to the viewer's model.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from llmtop.agent.flops.roofline import Device  # noqa: E402
from llmtop.agent.instruments.flops_live import FlopsInstrument  # noqa: E402
from llmtop.agent.instruments.layers import LayersInstrument  # noqa: E402
from llmtop.agent.instruments.ops import OpsInstrument  # noqa: E402
from llmtop.agent.instruments.steps import StepInstrument  # noqa: E402
from llmtop.agent.runtime import core  # noqa: E402
from llmtop.protocol.events import LayerStats, Ops, Step, StepFlops  # noqa: E402
from llmtop.tui.session.model import SessionModel  # noqa: E402

from .harness import Collect, clean_bus  # noqa: E402, F401 (a fixture, used by pytestmark)

pytestmark = pytest.mark.usefixtures("clean_bus")

TRAIN_BATCH, EVAL_BATCH, EVAL_FORWARDS = 8, 5, 3
EVAL_EVERY, ITERS = 3, 10  # evaluations before odd and even steps: windows open on either


class Rig:
    """Layers, steps, FLOPs and ops instruments on one context, polled in the agent's order."""

    def __init__(self) -> None:
        self.ctx = Collect(ops_every=1, budget_pct=1e9, layer_every=1)  # every step timed and profiled
        core.ACTIVE = self.ctx
        self.layers = LayersInstrument(self.ctx.options)
        self.steps = StepInstrument(self.ctx.options)
        self.flops = FlopsInstrument(self.ctx.options, layers=self.layers)
        self.flops.device = Device("test", "test device", {"fp32": 1e15}, 1e13)
        self.flops.min_interval_s = 0.0
        self.ops = OpsInstrument(self.ctx.options)
        self.all = [self.layers, self.steps, self.flops, self.ops]  # default_instruments' order
        for inst in self.all:
            inst.install(self.ctx)

    def tick(self) -> None:
        """On a thread of its own, as the agent's (a profiler window records the script's thread only,
        not a FLOP count's meta ops on the agent thread)."""
        def poll() -> None:
            for inst in self.all:
                self.ctx.events.extend(inst.poll(time.time()))

        t = threading.Thread(target=poll)
        t.start()
        t.join()

    def close(self) -> None:
        self.steps.flush()
        for _ in range(3):
            self.tick()
        for inst in reversed(self.all):
            inst.uninstall()
        core.ACTIVE = None


def run_loop(tick_after_eval: bool) -> tuple[list[Any], list[int]]:
    """The loop: an evaluation before training and every EVAL_EVERY iterations. Returns the events
    and the iterations an evaluation preceded."""
    rig = Rig()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xt, xe = torch.randn(TRAIN_BATCH, 16), torch.randn(EVAL_BATCH, 16)
    evaluated = []

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            for _ in range(EVAL_FORWARDS):
                model(xe)
        model.train()
        if tick_after_eval:
            rig.tick()

    try:
        evaluate()
        for it in range(ITERS):
            if it and it % EVAL_EVERY == 0:
                evaluate()
                evaluated.append(it)
            loss = model(xt).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rig.tick()
    finally:
        rig.close()
    assert rig.ctx.warnings == []
    return rig.ctx.events, evaluated


def after_first_training_step(events: list[Any]) -> list[Any]:
    first = next(i for i, e in enumerate(events) if isinstance(e, Step) and e.mode == "train")
    return events[first:]


@pytest.mark.parametrize("tick_after_eval", [False, True], ids=["late-ticks", "ticks-in-eval"])
def test_profiles_and_step_flops_are_of_training_steps_only(tick_after_eval: bool) -> None:
    events, evaluated = run_loop(tick_after_eval)
    train = [e for e in events if isinstance(e, Step) and e.mode == "train"]
    assert [s.step for s in train] == list(range(ITERS))  # numbered as the loop's iterations
    assert [e.step for e in events if isinstance(e, Step) and e.mode == "eval"] == evaluated

    # op profiles: training steps only, one training forward each, never an evaluation's batch
    later = after_first_training_step(events)
    ops = [e for e in later if isinstance(e, Ops)]
    assert ops and all(o.step in range(ITERS) for o in ops)
    before = [e for e in events[:len(events) - len(later)] if isinstance(e, Ops)]
    # a profile of the evaluation before training is sent only while it still looks like an inference
    # run (the agent reads it before training starts); one still unread then is dropped
    assert not before if not tick_after_eval else len(before) <= 1
    eval_shape = f"{EVAL_BATCH}x16"
    for o in ops:
        assert not any(eval_shape in shapes for shapes in o.shapes), (o.step, o.shapes)
        forward = [c for n, s, c in zip(o.names, o.shapes, o.calls, strict=True)
                   if n == "aten::addmm" and f"{TRAIN_BATCH}x16" in s]
        assert forward == [1], (o.step, list(zip(o.names, o.shapes, strict=True)))
        assert o.total_ms is not None and o.total_ms >= sum(o.self_ms) > 0
        assert o.rows >= len(o.names)
    # a window open when an evaluation began was opened again as its training step started
    assert {o.step for o in ops} & set(evaluated)

    # per-step FLOPs: after the first training step only training steps, in order, each with its one
    # forward (an evaluation's calls are not summed into the step after it)
    flops = [e for e in later if isinstance(e, StepFlops)]
    assert [e.step for e in flops] == sorted({e.step for e in flops}) and flops
    assert all(e.root_calls == [1] and e.note == "" for e in flops), [(e.step, e.root_calls, e.note) for e in flops]
    per_step = {e.step: e.fwd_flops for e in flops}
    assert len(set(per_step.values())) == 1  # the same batch every step: the same FLOPs
    assert list(per_step.values())[0] == 2 * TRAIN_BATCH * (16 * 32 + 32 * 4)
    tables = [e for e in later if isinstance(e, LayerStats)]
    assert [e.step for e in tables] == sorted({e.step for e in tables})

    # the viewer: once training starts it shows no profile of the evaluation before it ...
    model = SessionModel()
    model.apply_all(events[:len(events) - len(later) + 1])
    assert model.ops_step is None and model.ops == []
    # ... and its joins hold training steps only, each FLOPs figure with its own step's time
    model = SessionModel()
    model.apply_all(events)
    assert [e.step for e in model.step_flops] == [e.step for e in flops]
    assert model.ops_step == ops[-1].step and model.ops_total_ms == ops[-1].total_ms
    root = model.layers[model.roots[0]]
    timed = root._timed_at(root.step_flops_step)
    assert root.step_flops_step == flops[-1].step and timed is not None and timed[2] == 1
    assert root.achieved_flops is not None and root.achieved_note == ""
    assert model.layers_step == tables[-1].step
    # the layer tables before training (the evaluation's, numbered 0, 1, 2 too) are no join partner
    steps_timed = [t[0] for t in root.timed]
    assert steps_timed == list(range(ITERS))  # every training step timed, nothing else


def test_ops_view_shares_are_of_the_profiled_steps_whole_op_time() -> None:
    """The real Textual app on a canned session whose last profile keeps the top 2 of 40 rows: the %
    column is over the step's op time (10 ms), not over the two rows shown, in the Ops view and in the
    Overview's hottest ops alike."""
    import asyncio

    from llmtop.tui.session.canned import T0, session_events
    from llmtop.tui.session.source import EventsSource
    from llmtop.tui.views.app import LlmtopApp
    from llmtop.tui.views.keys import VIEWS
    from llmtop.tui.views.overview import hot_ops_text
    from textual.widgets import DataTable

    profile = Ops(step=59, names=["aten::mm", "aten::add"], self_ms=[2.0, 1.0], calls=[4, 2],
                  shapes=["8x16; 16x32", "8x32; 8x32"], total_ms=10.0, rows=40)
    app = LlmtopApp(EventsSource([*session_events(60, gpu=False), profile]), clock=lambda: T0 + 30.0)

    async def check() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            assert app.source.done.wait(10)
            await pilot.pause()
            await pilot.press(str([name for name, _ in VIEWS].index("ops") + 1))
            app.frame(force=True)
            await pilot.pause()
            table = app.query_one("#ops-table", DataTable)
            shares = {str(table.get_row_at(i)[0]): str(table.get_row_at(i)[2]) for i in range(table.row_count)}
            assert shares == {"aten::mm": "20.0", "aten::add": "10.0"}
            info = str(app.query_one("#ops-info").render())
            assert "step 59" in info and "2 ops of 40" in info and "30 % of the step's" in info

    asyncio.run(check())
    assert "20.0%" in hot_ops_text(app.model).plain
