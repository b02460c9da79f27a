"""What the Overview's totals say about how figures were made: the loss of an accumulating loop, the
evaluations kept apart, and the FLOP/s with the peak and where the peak comes from."""

from __future__ import annotations

from llmtop.protocol.events import LayerFlops, Step, StepFlops
from llmtop.tui.session.model import SessionModel
from llmtop.tui.views.overview import totals_text


def test_totals_say_how_loss_evals_and_mfu_were_made() -> None:
    model = SessionModel()
    for i in range(3):
        model.apply(Step(step=i, t=100.0 + i, dur_ms=50.0, loss=2.0 - i * 0.1, losses=4))
    model.apply(Step(step=3, t=104.0, dur_ms=30.0, mode="eval"))
    model.apply(LayerFlops(signature="x:4x8:float32", ids=[], flops=[], bytes=[], peak_flops=4e11,
                           peak_bw=2e10, device="cpu", peak_source="measured"))
    model.apply(StepFlops(step=2, flops_total=6e9, dur_ms=50.0, achieved_flops=1.2e11, mfu=0.3,
                          peak_flops=4e11))
    text = totals_text(model).plain
    assert "sum of 4 micro-batch losses" in text
    assert "evaluations      1 (30.0 ms, apart)" in text
    assert "MFU 30.0%" in text and "measured" in text
    assert "steps            3" in text  # the evaluation is no step
