"""`llmtop export`: JSON and CSV round-trip the recording; Chrome traces have the fields Perfetto needs."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
from llmtop.protocol.events import (
    PHASES,
    AgentWarning,
    Anomaly,
    DeviceSample,
    End,
    Generation,
    LayerStats,
    Metric,
    Span,
    Step,
)
from llmtop.protocol.recording import RecordingReader
from llmtop.tui.commands.export import csv_columns, events_from_json, iter_tracks

from llmtop.cli import main
from tests.test_recording import SESSION, run_events, write

EXTRA = [
    DeviceSample(t=1001.5, index=0, name="NVIDIA H100", util_pct=97.0, mem_used=60 << 30, mem_total=80 << 30,
                 power_w=610.0),
    Metric(name="eval_acc", value=0.5, t=1002.0, step=10),
    Anomaly(t=1002.2, what="nan_loss", message="loss is NaN at step 12", step=12, severity="error"),
    AgentWarning(t=1002.3, source="flops", message="disabled"),
    Generation(t=1004.0, batch=1, prompt_tokens=12, new_tokens=4, ttft_ms=30.0, decode_ms=[5.0, 5.5, 6.0],
               total_ms=46.5),
    Span(name="outer", category="training_loop", start=1003.0, dur_ms=50.0, depth=0),
    Span(name="inner", category="training_loop", start=1003.01, dur_ms=10.0, depth=1),
    Step(step=999, t=1005.0, dur_ms=10.0, phases={"forward": 4.0, "backward": 6.0}, loss=math.nan),
]
END = End(t=1006.0, exit_code=0, reason="exit")


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    path = tmp_path / "run.lrec"
    write(path, run_events(40) + EXTRA, end=END)
    return path


def export(recording: Path, fmt: str, out: Path, *extra: str) -> None:
    assert main(["export", str(recording), "--format", fmt, "-o", str(out), *extra]) == 0


def test_json_round_trips_every_event(recording: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    export(recording, "json", out)
    text = out.read_text()
    assert "NaN" in text  # non-finite floats are strings, so the file is strict JSON
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["format"] == "llmtop-export" and data["version"] == 1
    assert data["summary"]["steps"]["count"] == 41 and data["end"]["exit_code"] == 0
    assert data["summary"]["schema_version"] == 1  # the `llmtop report --json` object (docs/REPORT.md)
    back = events_from_json(data)
    want = list(RecordingReader(recording).events())
    # Grouped by kind, each kind in recorded order: compare per kind (NaN != NaN, so via repr).
    for kind in {e.KIND for e in want}:
        assert [repr(e) for e in back if e.KIND == kind] == [repr(e) for e in want if e.KIND == kind], kind


def test_csv_has_one_row_per_step_with_every_field(recording: Path, tmp_path: Path) -> None:
    out = tmp_path / "steps.csv"
    export(recording, "csv", out)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    cols = csv_columns()
    assert list(rows[0]) == cols
    for f in dataclasses.fields(Step):
        if f.name == "phases":
            assert all(f"phase_{p}_ms" in cols for p in PHASES)
        else:
            assert f.name in cols
    steps = [e for e in RecordingReader(recording).events() if isinstance(e, Step)]
    assert len(rows) == len(steps) == 41
    for row, s in zip(rows, steps, strict=True):
        assert int(row["step"]) == s.step and float(row["dur_ms"]) == s.dur_ms and float(row["t"]) == s.t
        for p in PHASES:
            got = row[f"phase_{p}_ms"]
            assert (float(got) if got else None) == s.phases.get(p)
        assert (row["grad_norm"] or None) is None if s.grad_norm is None else float(row["grad_norm"]) == s.grad_norm
    assert rows[-1]["loss"] == "nan"


def test_chrome_trace_structure(recording: Path, tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    export(recording, "chrome", out)
    trace = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    events = trace["traceEvents"]
    assert events
    for ev in events:
        for key in ("name", "ph", "ts", "pid", "tid"):
            assert key in ev, (key, ev)
        assert isinstance(ev["ts"], (int, float)) and isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        if ev["ph"] == "X":
            assert isinstance(ev["dur"], (int, float)) and ev["dur"] >= 0
        if ev["ph"] == "C":
            assert ev["args"] and all(isinstance(v, (int, float)) for v in ev["args"].values())
    named = {(ev["pid"], ev["tid"]): ev["args"]["name"] for ev in events
             if ev["ph"] == "M" and ev["name"] == "thread_name"}
    assert {"steps", "phases", "layers (forward)", "layers (backward)", "generate",
            "spans: training_loop", "spans: text_preprocessing"} <= set(named.values())
    assert any(ev["ph"] == "M" and ev["name"] == "process_name" for ev in events)
    for track, evs in iter_tracks(trace):
        stamps = [ev["ts"] for ev in evs]
        assert stamps == sorted(stamps), f"timestamps go backwards on track {named.get(track, track)}"
        if track in named:
            assert evs, f"empty named track {named[track]}"
    by_track = {named[t]: evs for t, evs in iter_tracks(trace) if t in named}
    steps = [ev for ev in by_track["steps"] if ev["ph"] == "X"]
    assert [ev["name"] for ev in steps[:3]] == ["step 0", "step 1", "step 2"]
    assert steps[1]["dur"] == pytest.approx(sum(1.0 + i for i in range(len(PHASES))) * 1000)
    # Layers: one forward slice per module per step, children inside their parent.
    fwd = [ev for ev in by_track["layers (forward)"] if ev["args"]["step"] == 3]
    assert sorted(ev["args"]["path"] for ev in fwd) == sorted(["Net", "enc", "enc.fc", "head"])
    parent = next(ev for ev in fwd if ev["args"]["path"] == "enc")
    child = next(ev for ev in fwd if ev["args"]["path"] == "enc.fc")
    assert parent["ts"] <= child["ts"] and child["ts"] + child["dur"] <= parent["ts"] + parent["dur"] + 1e-6
    layer3 = next(e for e in RecordingReader(recording).events() if isinstance(e, LayerStats) and e.step == 3)
    assert child["dur"] == pytest.approx(layer3.fwd_ms[2] * 1000)
    counters = {ev["name"] for ev in events if ev["ph"] == "C"}
    assert {"host cpu %", "host memory (bytes)", "gpu0 utilization %", "gpu0 memory (bytes)", "throughput",
            "metric eval_acc"} <= counters
    # Timestamps are µs from the start of the recording.
    step0 = next(e for e in RecordingReader(recording).events() if isinstance(e, Step))
    assert steps[0]["ts"] + steps[0]["dur"] == pytest.approx((step0.t - SESSION.started) * 1e6)


def test_export_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.lrec"
    bad.write_bytes(b"garbage" * 20)
    assert main(["export", str(bad), "--format", "csv", "-o", str(tmp_path / "x.csv")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an llmtop recording" in err
    assert not (tmp_path / "x.csv").exists()
