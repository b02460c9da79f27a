"""Steps that follow the script's loop (issue 15): realistic scripts from tests/scripts/ run as real child
processes under ``llmtop attach --headless --record``; llmtop's figures (read back from the recording,
through the viewer's own SessionModel) are compared with what each script prints about itself."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from llmtop.protocol.events import End, LayerStats, ModelTree, Ops, Step, StepFlops
from llmtop.protocol.recording import RecordingReader
from llmtop.tui.session import diagnoses
from llmtop.tui.session.model import SessionModel

from tests.conftest import LLMTOP, child_env

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def run(tmp: Path, script: str, *args: str, **env: str) -> tuple[list[dict], list, SessionModel]:
    """The script's own JSON lines, the recorded events and a SessionModel fed with them."""
    rec = tmp / "run.llmtop"
    res = subprocess.run([LLMTOP, "attach", "--headless", "--record", str(rec), str(SCRIPTS / script), *args],
                         cwd=tmp, env=child_env(LLMTOP_SOCKET=str(tmp / "a.sock"), LLMTOP_TICK="0.2", **env),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"')]
    with RecordingReader(rec) as reader:
        events = list(reader.events())
    assert isinstance(events[-1], End)
    model = SessionModel()
    model.apply_all(events)
    return lines, events, model


def steps_of(events: list, mode: str) -> list[Step]:
    return [e for e in events if isinstance(e, Step) and e.mode == mode]


def test_char_gpt_with_eval_every_n_and_gradient_accumulation(short_tmp: Path) -> None:
    lines, events, model = run(short_tmp, "char_gpt_train.py", "12", "5", "2")
    summary = lines[-1]
    script_losses = [ln["loss"] for ln in lines if "iter" in ln]
    train = steps_of(events, "train")
    # one step per optimizer step, numbered as the script's iterations (the evaluation before the first
    # is not 3 inference steps ahead of them)
    assert [s.step for s in train] == list(range(summary["iters"]))
    assert model.train_count == model.step_count == summary["iters"]
    # loss: the sum of what backward() saw, i.e. the mean of the micro-batch losses; the UI says so
    assert [s.loss for s in train] == pytest.approx(script_losses, rel=1e-5)
    assert all(s.losses == 2 for s in train)
    assert model.loss_note() == "sum of 2 micro-batch losses"
    assert all((s.samples, s.tokens) == (summary["samples_per_iter"], summary["tokens_per_iter"]) for s in train)
    # every evaluation is a phase of its own: the one before training (three inference records, filed
    # as one evaluation by the viewer) and the two between training steps
    assert model.eval_count == summary["evals"] == 3
    between = steps_of(events, "eval")
    assert [e.step for e in between] == [ln["eval_before"] for ln in lines if "eval_before" in ln][1:]
    assert all(e.samples == 3 * 4 for e in between)  # EVAL_ITERS batches of BATCH
    # never charged to a training step: the step after an evaluation starts where it ended, and the
    # viewer's steps (what its diagnoses, rates and sparklines read) hold no evaluation
    for e in between:
        nxt = next(s for s in train if s.step == e.step)
        assert nxt.t - nxt.dur_ms / 1e3 >= e.t - 1e-6
    assert all(s.mode == "train" for s in model.steps) and len(model.evals) == 3
    assert not [d for d in diagnoses.diagnose(model) if d.what == "no_steps"]


def test_lstm_with_a_hand_written_sgd_update_and_sequence_first_batches(short_tmp: Path) -> None:
    lines, events, model = run(short_tmp, "lstm_sgd.py", "30")
    summary = lines[-1]
    train = steps_of(events, "train")
    # no optimizer: a step per backward (the last one flushed at exit), each with its loss
    assert len(train) == summary["iters"] == model.step_count
    assert [s.loss for s in train] == pytest.approx([ln["loss"] for ln in lines if "iter" in ln], rel=1e-6)
    assert all(s.phases["backward"] > 0 and s.phases["forward"] > 0 for s in train)
    # (seq, batch) inputs: the batch is dimension 1
    assert all((s.samples, s.tokens) == (summary["samples_per_iter"], summary["tokens_per_iter"]) for s in train)
    # the loss module built by the script is no model root: one tree
    assert [t.classes[0] for t in events if isinstance(t, ModelTree)] == ["RNNModel"]


def test_hf_trainer_bert_with_evaluation_and_accumulation(short_tmp: Path) -> None:
    pytest.importorskip("transformers")
    lines, events, model = run(short_tmp, "trainer_bert.py", "8", "4", "2")
    summary = lines[-1]
    train = steps_of(events, "train")
    assert len(train) == summary["steps"] == model.step_count
    assert [s.loss for s in train] == pytest.approx(summary["losses"], rel=1e-4)
    assert all(s.samples == summary["batch"] for s in train)
    # evaluations at the same step (the last scheduled one and the final evaluate()) are one phase
    assert model.eval_count == len(set(summary["eval_at"])) == 2
    # the tree does not grow with the run
    trees = [t for t in events if isinstance(t, ModelTree)]
    assert len(trees) == 1 and len(model.roots) == 1


def test_each_generate_call_is_a_step_when_it_returns(short_tmp: Path) -> None:
    pytest.importorskip("transformers")
    lines, events, model = run(short_tmp, "generate_calls.py", "3")
    calls = [ln for ln in lines if "call" in ln]
    infer = steps_of(events, "infer")
    assert len(infer) == len(calls) == model.step_count == 3  # the last call too, not lost at exit
    for s, c in zip(infer, calls, strict=True):
        # prefill of the prompt, then new-1 decode forwards of one token per sequence
        assert (s.samples, s.tokens) == (c["batch"], c["batch"] * (c["prompt"] + c["new"] - 1))
        # counted apart: the prompts in the prefill, one token per sequence in each decode forward
        assert (s.prefill_tokens, s.decode_tokens) == (c["batch"] * c["prompt"], c["batch"] * (c["new"] - 1))
    # and shown where tokens are shown
    assert (model.prefill_tokens_total, model.decode_tokens_total) == (
        sum(c["batch"] * c["prompt"] for c in calls), sum(c["batch"] * (c["new"] - 1) for c in calls))
    from llmtop.tui.views.overview import totals_text

    row = next(line for line in totals_text(model).plain.splitlines() if "prefill/decode" in line)
    assert row.split()[-3:] == [str(model.prefill_tokens_total), "/", str(model.decode_tokens_total)]


def test_generate_before_training_never_pairs_a_training_step_with_a_generate_step(short_tmp: Path) -> None:
    """The generate calls are inference steps 0 and 1, then training counts from 0 again: nothing
    numbered by the generate steps may come after the first training step, and every figure joined by
    step number (layer tables, step FLOPs, op profiles) is of the training step with that number."""
    pytest.importorskip("transformers")
    lines, events, model = run(short_tmp, "generate_then_train.py", "2", "8", "10",
                               LLMTOP_LAYER_EVERY="1", LLMTOP_OPS_EVERY="1", LLMTOP_BUDGET="100")
    summary = lines[-1]
    calls = [ln for ln in lines if "call" in ln]
    infer, train = steps_of(events, "infer"), steps_of(events, "train")
    assert [s.step for s in infer] == list(range(summary["calls"]))
    assert [s.step for s in train] == list(range(summary["iters"]))
    assert [(s.prefill_tokens, s.decode_tokens) for s in infer] == [
        (c["batch"] * c["prompt"], c["batch"] * (c["new"] - 1)) for c in calls]
    first = events.index(train[0])
    later = events[first:]
    for kind in (LayerStats, StepFlops, Ops):
        numbers = [e.step for e in later if isinstance(e, kind)]
        assert numbers == sorted(set(numbers)), (kind.__name__, numbers)  # one numbering: the training's
    flops = [e for e in later if isinstance(e, StepFlops)]
    # The agent counts one new signature a second, the generate calls' first: on a fast machine the
    # first training steps go out before the training signature is counted, saying so and carrying
    # no figure (never another step's); every step after the count carries the training's FLOPs.
    pending = [e for e in flops if e.note]
    counted = [e for e in flops if not e.note]
    assert counted and all(e.root_calls == [1] for e in counted), [(e.step, e.root_calls, e.note) for e in flops]
    assert all(e.note.startswith("not counted yet: 2x12:int64 labels:2x12:int64") and not e.flops
               and e.flops_total is None for e in pending), [(e.step, e.note) for e in pending]
    assert [e.step for e in flops] == [e.step for e in pending + counted]  # uncounted ones only before the count
    assert all(e.flops_total == 3 * e.fwd_flops for e in counted)  # training steps: forward + backward
    # the viewer: the generate calls are an evaluation before training; its joins are the training's
    assert model.train_count == summary["iters"] and model.eval_count == 1
    assert [e.step for e in model.step_flops] == [e.step for e in flops]
    root = model.layers[model.roots[0]]
    timed = [t[0] for t in root.timed]
    assert timed == sorted(set(timed)) and set(timed) <= set(range(summary["iters"]))
    if model.ops_step is not None:
        assert model.ops_step in range(summary["iters"]) and model.ops_total_ms
