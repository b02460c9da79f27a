"""The overhead budget (agent/instruments/budget.py) and the layers instrument keeping it with measured costs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from llmtop.agent.instruments import budget as B
from llmtop.agent.instruments.budget import Budget

from tests.test_layers import end_step, mlp, started, tables  # noqa: F401  (fixture)

MS = 1_000_000
US = 1_000


def test_estimate_alone_when_every_step_is_sampled() -> None:
    b = Budget(2.0)
    for _ in range(5):
        b.observe(200 * MS, fixed_ns=100 * US, sampled=True, estimate_ns=1 * MS)
    # 2 % of the 199 ms step without the layers is 3.98 ms; 3/4 of it minus the fixed 0.1 ms left
    assert b.control_ns() == 0  # no unsampled steps: nothing to compare with
    assert b.update() == 1


def test_control_group_overrides_a_low_estimate() -> None:
    b = Budget(2.0)
    for _ in range(6):
        b.observe(3 * MS, fixed_ns=10 * US, sampled=False)
        b.observe(3 * MS + 400 * US, fixed_ns=10 * US, sampled=True, estimate_ns=50 * US)
    assert b.control_ns() == 400 * US
    assert b.extra_ns() == 400 * US
    spare = 0.02 * B.AIM * 3 * MS * (1 - B.OPS_RESERVE) - 10 * US  # 12.5 us
    assert b.update() == math.ceil(400 * US / spare) == 32


def test_a_high_estimate_is_kept_when_the_control_sees_less() -> None:
    b = Budget(2.0)
    for _ in range(6):
        b.observe(3 * MS, fixed_ns=0, sampled=False)
        b.observe(3 * MS + 100 * US, fixed_ns=0, sampled=True, estimate_ns=200 * US)
    assert b.extra_ns() == 200 * US  # the larger of both measures: the budget errs on the cheap side


def test_fixed_cost_above_the_budget_leaves_layers_their_floor() -> None:
    b = Budget(2.0)
    for _ in range(6):
        b.observe(3 * MS, fixed_ns=80 * US, sampled=False)  # 2.7 %: more than the whole budget
    b.observe(3 * MS + 300 * US, fixed_ns=80 * US, sampled=True, estimate_ns=300 * US)
    floor = 0.02 * B.AIM * 3 * MS * B.LAYER_FLOOR  # 3 us
    assert b.update() == math.ceil(300 * US / floor) == 100


def test_rate_is_capped_and_ignores_empty_steps() -> None:
    b = Budget(2.0)
    b.observe(0, fixed_ns=0, sampled=True, estimate_ns=10 * MS)  # the first boundary: no duration
    assert b.update() == 1
    for _ in range(5):
        b.observe(1 * US, fixed_ns=0, sampled=True, estimate_ns=10 * MS)
    assert b.update() == B.MAX_EVERY


def test_layers_sample_less_when_sampled_steps_are_measurably_slower(started: Any) -> None:  # noqa: F811
    """The calibrated per-call cost says 1 us, but sampled steps take 2 ms longer (what a model
    unlike the calibration model, or torch's dispatch, may do): the control group shows it, the
    rate follows and the reported overhead of a sampled step includes it."""
    model = mlp()
    inst, ctx = started(layer_every=0, budget_pct=2.0, layer_call_ns=1_000)
    x = torch.randn(4, 8)
    t = 1_000_000_000
    end_step(0, t)
    reported: list[tuple[bool, int]] = []
    got = []
    for step in range(1, 120):
        sampled = inst._sampled
        model(x).sum().backward()
        t += 10 * MS + (2 * MS if sampled else 0)
        end_step(step, t)
        got += tables(inst)  # the agent thread's tick: the budget is kept there
        reported.append((sampled, inst.overhead_ns_last_step()))
    # 2 ms extra against half of 2 % of 10 ms, less the op reserve (75 us): every 27th step at least
    assert inst.current_every >= math.ceil(2 * MS / (0.02 * B.AIM * 10 * MS * (1 - B.OPS_RESERVE))) == 27
    late_sampled = [ns for s, ns in reported[60:] if s]  # once the control group has formed
    assert late_sampled and min(late_sampled) >= 2 * MS
    assert len(got) < 60


def test_layers_run_a_few_times_a_second_when_that_fits_the_budget() -> None:
    b = Budget(2.0)
    for _ in range(6):
        b.observe(1 * MS, fixed_ns=40 * US, sampled=False)  # the fixed cost eats the 20 us budget
        b.observe(6 * MS, fixed_ns=40 * US, sampled=True, estimate_ns=5 * MS)
    # the floor (2 us a step) alone would give 1 in 2500; twice a second costs 10 ms/s, within 2 %
    assert b.update() == int(1e9 / B.MIN_TABLES_PER_S / (1 * MS)) == 500


def test_no_minimum_rate_when_it_would_break_the_budget() -> None:
    b = Budget(2.0)
    for _ in range(6):
        b.observe(100 * MS, fixed_ns=0, sampled=False)
        b.observe(150 * MS, fixed_ns=0, sampled=True, estimate_ns=50 * MS)
    # twice a second would cost 100 ms/s: the budget rules (half of 2 % of 100 ms, less the op reserve)
    assert b.update() == math.ceil(50 * MS / (0.02 * B.AIM * 100 * MS * (1 - B.OPS_RESERVE))) == 67


@pytest.mark.parametrize("pct", [0.5, 5.0])
def test_budget_setting_scales_the_rate(pct: float) -> None:
    b = Budget(pct)
    for _ in range(6):
        b.observe(10 * MS, fixed_ns=0, sampled=False)
        b.observe(10 * MS + 1 * MS, fixed_ns=0, sampled=True, estimate_ns=1 * MS)
    spare = pct / 100 * B.AIM * 10 * MS * (1 - B.OPS_RESERVE)
    assert b.update() == math.ceil(1 * MS / spare)


def test_long_steps_spend_about_half_the_budget() -> None:
    """200 ms steps whose per-layer timing costs 2 ms (1 %): a 2 % budget would allow it on every
    step; aiming at half of it (less the op reserve) times one step in two, 0.5 % of the run."""
    b = Budget(2.0)
    for _ in range(6):
        b.observe(200 * MS, fixed_ns=100 * US, sampled=False)
        b.observe(202 * MS, fixed_ns=100 * US, sampled=True, estimate_ns=2 * MS)
    left = 0.02 * B.AIM * 200 * MS * (1 - B.OPS_RESERVE) - 100 * US  # 1.4 ms
    assert b.update() == math.ceil(2 * MS / left) == 2
