"""Anomaly detectors: pure functions over step records, and the step tracker emitting them."""

from __future__ import annotations

import math
import time

import torch
from llmtop.agent.instruments.anomalies import (
    AnomalyDetector,
    Creep,
    NonFinite,
    SlowStep,
    Spike,
    linear_slope,
    robust_z,
)
from llmtop.agent.instruments.steps import StepInstrument
from llmtop.protocol.events import Anomaly, Step
from torch import nn

from .harness import Collect
from .test_steps import Roots

MiB = 2**20


def step(i: int, loss: float | None = 1.0, dur: float = 100.0, grad: float | None = None,
         alloc: int | None = None) -> Step:
    return Step(step=i, t=1000.0 + i, dur_ms=dur, loss=loss, grad_norm=grad, cuda_allocated=alloc)


def run(det: AnomalyDetector, steps: list[Step]) -> list[Anomaly]:
    out: list[Anomaly] = []
    for s in steps:
        out += det.feed_step(s)
    return out


def noisy(i: int, base: float = 2.0) -> float:
    return base + 0.05 * math.sin(i * 1.7)


def test_planted_nan_loss_fires_once_and_rearms() -> None:
    det = AnomalyDetector()
    losses = [noisy(i) for i in range(30)] + [float("nan")] * 20 + [noisy(i) for i in range(10)] + [float("inf")]
    got = run(det, [step(i, loss=v) for i, v in enumerate(losses)])
    nan = [a for a in got if a.what == "nan_loss"]
    assert [a.message for a in nan] == ["loss is NaN since step 30", "loss is +inf since step 60"]
    assert nan[0].step == 30 and nan[0].severity == "error"


def test_loss_spike_fires_once_per_episode() -> None:
    det = AnomalyDetector()
    losses = [noisy(i) for i in range(40)] + [9.0, 9.5] + [noisy(i) for i in range(20)]
    got = [a for a in run(det, [step(i, loss=v) for i, v in enumerate(losses)]) if a.what == "loss_spike"]
    assert len(got) == 1
    assert got[0].step == 40
    assert "loss spike at step 40" in got[0].message and "9" in got[0].message


def test_smooth_decreasing_loss_is_no_spike() -> None:
    det = AnomalyDetector()
    got = run(det, [step(i, loss=5.0 * math.exp(-i / 100) + 0.01 * math.sin(i)) for i in range(500)])
    assert got == []


def test_gradient_norm_spike() -> None:
    s = Spike("grad_spike", "gradient norm")
    out = []
    for i in range(30):
        out += s.feed(i, 0.0, 1.0 + 0.1 * math.cos(i))
    out += s.feed(30, 0.0, 50.0)
    assert [a.what for a in out] == ["grad_spike"]
    assert out[0].message.startswith("gradient norm spike at step 30")


def test_planted_memory_growth_fires_creep_once() -> None:
    c = Creep("host RSS", min_growth=256 * MiB)
    base = 1024 * MiB
    out = []
    for i in range(400):  # +2 MiB per step with jitter: +800 MiB over the window
        out += c.feed(i, float(i), base + i * 2 * MiB + (i % 3) * 100_000)
    assert len(out) == 1
    assert out[0].what == "memory_creep"
    assert out[0].message.startswith("memory creep (host RSS): +")
    assert "MiB over" in out[0].message and "steps" in out[0].message


def test_flat_memory_does_not_fire() -> None:
    c = Creep("host RSS")
    base = 1024 * MiB
    out = []
    for i in range(1000):  # sawtooth of the allocator: up 64 MiB, back down, over and over
        out += c.feed(i, float(i), base + (i % 50) * MiB + (i % 7) * 4096)
    assert out == []


def test_small_steady_growth_below_threshold_does_not_fire() -> None:
    c = Creep("CUDA allocated", min_growth=256 * MiB)
    out = []
    for i in range(400):
        out += c.feed(i, float(i), 100 * MiB + i * 4096)  # +1.6 MiB in all
    assert out == []


def test_creep_message_in_gib() -> None:
    c = Creep("CUDA allocated", window=400, min_growth=2**30)
    out = []
    for i in range(401):
        out += c.feed(i, float(i), 2**30 + int(i * 3 * MiB))
    assert "GiB over" in out[0].message


def test_one_off_jump_is_no_creep() -> None:
    c = Creep("CUDA allocated")
    out = []
    for i in range(400):  # optimizer state appears at step 30, then memory is flat
        out += c.feed(i, float(i), 500 * MiB + (800 * MiB if i >= 30 else 0) + (i % 4) * MiB)
    assert out == []


def test_cuda_allocated_from_steps_feeds_creep() -> None:
    det = AnomalyDetector()
    got = run(det, [step(i, alloc=500 * MiB + i * 4 * MiB) for i in range(200)])
    assert [a.what for a in got] == ["memory_creep"]
    assert "CUDA allocated" in got[0].message


def test_slow_step_fires_once() -> None:
    s = SlowStep()
    out = []
    for i, warm in enumerate([2000.0, 600.0, 300.0]):  # warm-up steps are ignored
        out += s.feed(i - 3, 0.0, warm)
    for i in range(20):
        out += s.feed(i, 0.0, 100.0 + (i % 5))
    assert len(s.history) == 20 and max(s.history) < 200  # the warm-up is not the baseline
    out += s.feed(20, 0.0, 900.0) + s.feed(21, 0.0, 950.0) + s.feed(22, 0.0, 101.0)
    assert len(out) == 1
    assert out[0].what == "slow_step"
    assert out[0].message.startswith("slow step 20: 900.0 ms")


def test_nonfinite_ignores_missing_values() -> None:
    d = NonFinite()
    assert d.feed(1, 0.0, None) == []
    assert d.feed(2, 0.0, 1.0) == []


def test_helpers() -> None:
    slope, r2 = linear_slope([0, 1, 2, 3], [1, 3, 5, 7])
    assert slope == 2.0 and r2 == 1.0
    z, med = robust_z(10.0, [1.0, 1.1, 0.9, 1.0, 1.05])
    assert med == 1.0 and z > 50


def test_tracker_emits_planted_nan_loss_once() -> None:
    ctx = Collect()
    st = StepInstrument(ctx.options)
    st.install(ctx)
    events = []
    try:
        with Roots():
            torch.manual_seed(0)
            model = nn.Linear(4, 1)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for i in range(12):
                x = torch.randn(8, 4)
                loss = model(x).pow(2).mean()
                if i >= 8:
                    loss = loss * float("nan")  # planted
                opt.zero_grad()
                loss.backward()
                opt.step()
                events += st.poll(time.time())
    finally:
        st.uninstall()
    nan = [e for e in events if isinstance(e, Anomaly) and e.what == "nan_loss"]
    assert len(nan) == 1
    assert nan[0].message == "loss is NaN since step 8"
    steps = [e for e in events if isinstance(e, Step)]
    assert len(steps) == 12 and math.isnan(steps[9].loss)
