"""End to end: a real script trains and generates with a tiny GPT-2 under `llmtop attach --headless
--record`; the recording's per-step and per-layer FLOP/s come from the same calls and never exceed
the peak the agent used."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from llmtop.protocol.events import End, LayerFlops, LayerStats, StepFlops  # noqa: E402
from llmtop.protocol.recording import RecordingReader  # noqa: E402
from llmtop.tui.session.model import SessionModel  # noqa: E402

from .conftest import LLMTOP, child_env  # noqa: E402

SCRIPT = textwrap.dedent("""
    import time, torch, transformers
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=256)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.eval()
    for _ in range(6):  # inference first: each generate call is one step
        out = model.generate(torch.randint(0, 500, (1, 60)), max_new_tokens=12, do_sample=False,
                             pad_token_id=0)
    # training counts steps from 0 again, and what still waits for a count of the earlier numbering is
    # dropped then (agent/instruments/flops_live.py): leave the agent time to count these signatures
    time.sleep(6)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(40):
        ids = torch.randint(0, 500, (4, 32))
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    time.sleep(3)  # the run goes on a little: the agent counts one signature a second
    print("done", out.shape[1])
""")


def test_recorded_run_flops_per_step_and_layer_are_possible(short_tmp: Path) -> None:
    (short_tmp / "run.py").write_text(SCRIPT)
    rec = short_tmp / "run.llmtop"
    res = subprocess.run([LLMTOP, "attach", "--headless", "--record", str(rec), "run.py"], cwd=short_tmp,
                         env=child_env(LLMTOP_SOCKET=str(short_tmp / "a.sock"), LLMTOP_TICK="0.1",
                                   LLMTOP_LAYER_EVERY="4"),  # timed steps whatever the budget
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("done 72")
    with RecordingReader(rec) as reader:
        events = list(reader.events())
    assert isinstance(events[-1], End)
    counted = [e for e in events if isinstance(e, LayerFlops)]
    assert counted and all(e.method == "meta" for e in counted)
    peak = counted[0].peak_flops
    assert peak and peak > 0
    # Training counts its steps from 0 after the generate calls before it (README, "How llmtop
    # counts steps"), so a step number can name a generate step and later a training step: tell
    # them apart by their root calls (a generate step: one prefill and 11 decode calls).
    step_flops = [e for e in events if isinstance(e, StepFlops)]
    counted_ok = [e for e in step_flops if not e.note]
    infer = [e for e in counted_ok if sum(e.root_calls) > 1]
    train = [e for e in counted_ok if sum(e.root_calls) == 1]
    mode_of = {id(e): ("infer" if e in infer else "train") for e in step_flops}
    assert len(train) >= 2 and len(infer) >= 1, [(e.step, mode_of[id(e)], e.note) for e in step_flops]
    for e in step_flops:
        if e.achieved_flops is not None:
            assert e.achieved_flops <= peak and e.mfu is not None and e.mfu <= 1
    assert all(e.flops_total == pytest.approx(3 * e.fwd_flops) for e in train)
    # a generate step: one prefill and 11 decode calls of the root, all counted
    assert all(dict(zip(e.roots, e.root_calls, strict=True)) == {e.roots[0]: 12} for e in infer)
    assert all(e.flops_total == e.fwd_flops for e in infer)
    # the viewer's per-layer FLOP/s, from the step's FLOPs over the same step's forward time
    view = SessionModel()
    view.apply_all(events)
    shown = [la.achieved_flops for la in view.layers.values() if la.achieved_flops is not None]
    assert len(shown) >= 10 and max(shown) <= peak
    assert any(isinstance(e, LayerStats) and e.step == view.last_step_flops.step for e in events)
