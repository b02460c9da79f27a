"""The file commands (report's summary pass, export's Chrome trace) on loops with evaluations and restarts
of the step numbering (issue 15): real scripts from tests/scripts/ recorded under ``llmtop attach
--headless --record``, read back by the same code as ``llmtop report`` and ``llmtop export``, compared with
what each script prints about itself; and the pairing rule itself on every order the agent can send."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from llmtop.protocol.events import LayerStats, Ops, Step, StepFlops
from llmtop.protocol.recording import RecordingReader
from llmtop.tui.commands.export import export_chrome
from llmtop.tui.commands.step_tables import TABLES_WAITING, StepTables
from llmtop.tui.commands.summarize import open_summary
from llmtop.tui.commands.summary import RunSummary

from tests.conftest import LLMTOP, child_env

SCRIPTS = Path(__file__).resolve().parent / "scripts"

RUNS = {
    # 40 iterations, an evaluation before iterations 0, 10, 20 and 30, 2 micro-batches per step (long enough
    # for op profiles: the agent drops a window it has not read when the script exits)
    "char_gpt": ["char_gpt_train.py", "40", "10", "2"],
    # 2 generate calls (inference steps 0 and 1), then training numbered from 0 again, for 8 iterations
    # or 5 s (the agent counts one new input signature a second: the training's comes after 3 generate ones)
    "generate_then_train": ["generate_then_train.py", "2", "8", "5"],
}


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, tuple[Path, list[dict]]]]:
    """Each script recorded once: its recording and its own JSON lines."""
    tmp = Path(tempfile.mkdtemp(prefix="lt-", dir="/tmp"))  # socket paths stay short
    out = {}
    try:
        for name, (script, *args) in RUNS.items():
            if name == "generate_then_train":
                pytest.importorskip("transformers")
            rec = tmp / f"{name}.lrec"
            done = subprocess.run([LLMTOP, "attach", "--headless", "--record", str(rec), str(SCRIPTS / script), *args],
                                  cwd=tmp, capture_output=True, text=True, timeout=300,
                                  env=child_env(LLMTOP_SOCKET=str(tmp / f"{name}.sock"), LLMTOP_TICK="0.1",
                                                LLMTOP_LAYER_EVERY="1", LLMTOP_OPS_EVERY="4", LLMTOP_BUDGET="100"))
            assert done.returncode == 0, done.stderr[-3000:]
            out[name] = (rec, [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"')])
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recorded(rec: Path) -> list:
    with RecordingReader(rec) as reader:
        return list(reader.events())


def pairs_of(events: list) -> list[tuple[LayerStats, Step | None]]:
    tables = StepTables()
    out = []
    for e in events:
        if isinstance(e, Step):
            out += tables.step(e)
        elif isinstance(e, LayerStats):
            out += tables.table(e)
    return out + tables.flush()


def check_pairs(events: list) -> None:
    """Every table is paired with the record of its own step: a table with a backward (a training step)
    with a training step of its number, one without (a no-grad forward) with an inference step."""
    pairs = pairs_of(events)
    assert len(pairs) == sum(isinstance(e, LayerStats) for e in events) > 0
    for table, step in pairs:
        assert step is not None and step.step == table.step, (table.step, step)
        assert step.mode == ("train" if table.bwd_ms else "infer"), (table.step, step.mode, len(table.bwd_ms))


def check_trace(rec: Path) -> None:
    """In the Chrome trace every layer slice starts inside the slice of its own step, and an evaluation's
    slice (which shares its number with the training step after it) holds none."""
    with RecordingReader(rec) as reader:
        trace = export_chrome(reader)
    tracks = {e["args"]["name"]: e["tid"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    slices = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    steps = [e for e in slices if e["tid"] == tracks["steps"]]
    evals = [e for e in steps if e["args"]["mode"] == "eval"]
    assert all(e["name"] == f"eval (before step {e['args']['step']})" for e in evals)
    layer_tids = {tracks[t] for t in ("layers (forward)", "layers (backward)") if t in tracks}
    laid = [e for e in slices if e["tid"] in layer_tids]
    assert laid
    for s in laid:
        at = s["ts"] + min(0.5, s["dur"] / 2)  # just inside: a step starts where the one before ends (µs rounding)
        mine = [st for st in steps if st["args"]["step"] == s["args"]["step"] and st["args"]["mode"] != "eval"
                and st["ts"] <= at < st["ts"] + st["dur"]]
        assert mine, (s["name"], s["args"], s["ts"])
        assert not [ev for ev in evals if ev["ts"] <= at < ev["ts"] + ev["dur"]], s


def check_flops(s: RunSummary, events: list) -> None:
    """FLOPs per training step are the agent's figures of the training steps' own calls (StepFlops, whose
    duration is its step's): one value for these fixed-shape steps, none from an evaluation or a
    generate call's (decode) calls, whatever input signature was counted last."""
    steps = [e for e in events if isinstance(e, Step) and e.mode == "train"]
    mine = [f.flops_total for f in events if isinstance(f, StepFlops) and f.flops_total is not None
            and any(t.step == f.step and t.dur_ms == f.dur_ms for t in steps)]
    assert mine and s.modes["eval"].flops.n == 0
    assert sorted(s.modes["train"].flops.values) == sorted(mine)
    assert len(set(mine)) == 1, mine


def test_report_counts_the_loop_with_evaluations_as_the_script_does(runs: dict) -> None:
    rec, lines = runs["char_gpt"]
    said = lines[-1]
    s = open_summary(str(rec))
    # the evaluation before training (inference records numbered 0..2) is one evaluation, not steps
    assert (s.steps, s.first_step, s.last_step) == (said["iters"], 0, said["iters"] - 1)
    assert set(s.modes) == {"train", "eval"}
    assert (s.modes["train"].count, s.modes["eval"].count) == (said["iters"], said["evals"])
    assert s.tokens == said["iters"] * said["tokens_per_iter"]
    assert s.samples == said["iters"] * said["samples_per_iter"]
    check_flops(s, recorded(rec))
    text = subprocess.run([LLMTOP, "report", str(rec)], capture_output=True, text=True, timeout=120,
                          env=child_env(NO_COLOR="1")).stdout
    assert f"{said['iters']} steps (0..{said['iters'] - 1})" in text
    assert f"eval steps ({said['evals']})" in text


def test_every_layer_table_meets_its_own_step_across_evaluations(runs: dict) -> None:
    rec, _ = runs["char_gpt"]
    events = recorded(rec)
    evals = [e.step for e in events if isinstance(e, Step) and e.mode == "eval"]
    assert evals  # evaluations share their number with the training step after them
    check_pairs(events)
    check_trace(rec)


def test_report_and_trace_after_generate_calls_then_training(runs: dict) -> None:
    rec, lines = runs["generate_then_train"]
    said = lines[-1]
    events = recorded(rec)
    assert [e.step for e in events if isinstance(e, Step)] == [*range(said["calls"]), *range(said["iters"])]
    check_pairs(events)
    check_trace(rec)
    s = open_summary(str(rec))
    assert (s.steps, s.first_step, s.last_step) == (said["iters"], 0, said["iters"] - 1)
    assert (s.modes["train"].count, s.modes["eval"].count) == (said["iters"], 1) and "infer" not in s.modes
    batch, seq = 2, 12  # generate_then_train.py's training batch
    assert s.tokens == said["iters"] * batch * seq
    check_flops(s, events)
    assert s.requests == said["calls"]  # the generate calls are still in the inference section


def test_report_op_shares_are_of_the_whole_profiled_step(runs: dict) -> None:
    """The top ops' shares use Ops.total_ms (every op of the profiled step), as the Ops view does."""
    rec, _ = runs["char_gpt"]
    profiles = [e for e in recorded(rec) if isinstance(e, Ops)]
    assert profiles and all(p.total_ms for p in profiles)
    step_ms = sum(p.total_ms for p in profiles) / len(profiles)
    done = subprocess.run([LLMTOP, "report", str(rec), "--json"], capture_output=True, text=True, timeout=120,
                          env=child_env())
    ops = json.loads(done.stdout)["ops"]
    assert ops["profiles"] == len(profiles) and ops["step_ms_source"] == "step"
    assert ops["step_ms"] == pytest.approx(step_ms)
    for row in ops["top"]:
        assert row["share_pct"] == pytest.approx(100.0 * row["self_ms"] / step_ms)
    # the profiles have more ops than the report lists, so the listed shares cannot add up to 100 %
    assert max(p.rows for p in profiles) > len(ops["top"])
    assert sum(row["share_pct"] for row in ops["top"]) < 100.0
    listed = sum(row["self_ms"] for row in ops["top"])
    assert listed < step_ms
    text = subprocess.run([LLMTOP, "report", str(rec)], capture_output=True, text=True, timeout=120,
                          env=child_env(NO_COLOR="1")).stdout
    top = ops["top"][0]
    assert f"of the step's {step_ms:.2f} ms of op time" in text
    assert f"{top['share_pct']:5.1f}%  {top['name']}" in text


def test_report_op_shares_without_a_step_total_say_so(tmp_path: Path) -> None:
    """A recording of an agent that sent no Ops.total_ms: the rows' sum stands in, and the report says so."""
    from tests.test_recording import run_events, write

    path = tmp_path / "old.lrec"
    write(path, [*run_events(4), Ops(step=2, names=["aten::mm", "aten::add"], self_ms=[3.0, 1.0], calls=[2, 4])])
    s = open_summary(str(path))
    assert [(n, share) for n, _, _, share in s.top_ops()] == [("aten::mm", 0.75), ("aten::add", 0.25)]
    assert s.to_json()["ops"]["step_ms_source"] == "rows"
    text = subprocess.run([LLMTOP, "report", str(path)], capture_output=True, text=True, timeout=120,
                          env=child_env(NO_COLOR="1")).stdout
    assert "% of the listed ops' time: the agent sent no step total" in text


# --- the pairing rule on every order the agent can send ------------------------------------------------


def step(n: int, mode: str = "train") -> Step:
    return Step(step=n, t=float(n), dur_ms=1.0, mode=mode)


def table(n: int, tag: float) -> LayerStats:
    return LayerStats(step=n, ids=[0], fwd_ms=[tag], fwd_self_ms=[tag], calls=[1])


def paired(stream: list) -> list[tuple[int, float, str | None, int | None]]:
    """(table number, its tag, the paired record's mode and number)."""
    return [(t.step, t.fwd_ms[0], s.mode if s else None, s.step if s else None) for t, s in pairs_of(stream)]


def test_pairing_an_evaluation_never_takes_the_table_of_the_step_it_precedes() -> None:
    # the agent polls the layer tables before the steps in a tick: step 2's table comes before the
    # evaluation record numbered 2 and step 2's own record
    got = paired([table(0, 0.0), table(1, 1.0), step(0), step(1), table(2, 2.0), step(2, "eval"), step(2)])
    assert got == [(0, 0.0, "train", 0), (1, 1.0, "train", 1), (2, 2.0, "train", 2)]


def test_pairing_across_a_restart_of_the_numbering() -> None:
    # tables of both numberings before any record of the second: tables are in order of their steps
    got = paired([table(0, 0.5), table(1, 1.5), step(0, "infer"), step(1, "infer"), table(0, 10.0), table(1, 11.0),
                  step(0), step(1)])
    assert got == [(0, 0.5, "infer", 0), (1, 1.5, "infer", 1), (0, 10.0, "train", 0), (1, 11.0, "train", 1)]
    # the only inference table a tick late, with the first training one, before any training record
    got = paired([step(0, "infer"), step(1, "infer"), table(1, 1.5), table(0, 10.0), step(0), table(1, 11.0),
                  step(1)])
    assert got == [(1, 1.5, "infer", 1), (0, 10.0, "train", 0), (1, 11.0, "train", 1)]
    # the evaluation before training had no timed step: the first tables are the training's
    got = paired([step(0, "infer"), step(1, "infer"), step(2, "infer"), table(0, 10.0), step(0), table(1, 11.0),
                  step(1)])
    assert got == [(0, 10.0, "train", 0), (1, 11.0, "train", 1)]
    # tables a tick after their records (the step ended between the agent's polls of the two), and the
    # last one flushed at the end
    got = paired([table(0, 0.5), step(0, "infer"), step(1, "infer"), table(1, 1.5), step(0), table(0, 10.0),
                  step(1), table(1, 11.0)])
    assert got == [(0, 0.5, "infer", 0), (1, 1.5, "infer", 1), (0, 10.0, "train", 0), (1, 11.0, "train", 1)]
    # the only inference table a tick late, with the first training one, before any training record
    got = paired([step(0, "infer"), step(1, "infer"), table(1, 1.5), table(0, 10.0), step(0), table(1, 11.0),
                  step(1)])
    assert got == [(1, 1.5, "infer", 1), (0, 10.0, "train", 0), (1, 11.0, "train", 1)]


def test_pairing_without_steps_stays_bounded() -> None:
    """A loop nobody ends steps of (the agent flushes a table per tick, all numbered alike): tables are
    released unpaired once too many wait, so memory stays flat over any run."""
    tables = StepTables()
    out = []
    for i in range(3 * TABLES_WAITING):
        out += tables.table(table(0, float(i)))
        assert tables.waiting <= TABLES_WAITING
    out += tables.flush()
    assert [t.fwd_ms[0] for t, _ in out] == [float(i) for i in range(3 * TABLES_WAITING)]
    assert all(s is None for _, s in out)
