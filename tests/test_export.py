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
from llmtop.tui.commands.chrome_trace import iter_tracks
from llmtop.tui.commands.export import csv_columns, events_from_json

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
    assert data["summary"]["schema_version"] == 2  # the `llmtop report --json` object (docs/REPORT.md)
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
    assert main(["export", str(bad), "--format", "csv", "-o", str(tmp_path / "x.csv")]) == 2  # a bad input file: exit 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an llmtop recording" in err
    assert not (tmp_path / "x.csv").exists()


# --- html ----------------------------------------------------------------------------------------------


def find_chromium() -> str | None:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless Chromium: installed with apt-get when missing and allowed, else the test skips."""
    import os
    import shutil
    import subprocess

    path = find_chromium()
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=900)
        path = find_chromium()
    if path is None:
        pytest.skip("no Chromium to load the page in (apt-get install -y chromium)")
    return path


def test_html_is_one_self_contained_page(recording: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.html"
    export(recording, "html", out)
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # nothing to fetch at view time: no scripts, links, images or remote URLs
    for needle in ("<script", "<link", "<img", "src=", "href=", "http://", "https://", "url("):
        assert needle not in page, needle
    # the plots are inline SVG of the data: step time, loss, tokens/s and memory over the run
    for title in ("step time (ms; 41 points)", "loss (per step; 40 points)", "tokens/s (per step; 40 points)",
                  "memory: process RSS (bytes; 8 points)", "memory: GPU memory used (bytes; 1 points)"):
        assert title in page, title
    assert page.count("<polyline") == 4 and page.count("<circle") == 1  # one GPU sample: a dot
    assert "aria-label=\"phase breakdown\"" in page and "optimizer" in page
    assert "enc.fc" in page and "head" in page  # the layer table
    assert "train.py --lr 3e-4" in page


def test_html_thinning_keeps_spikes() -> None:
    from llmtop.tui.commands.html import thin

    xs = [float(i) for i in range(10_000)]
    ys = [1.0] * 10_000
    ys[7_777] = 50.0
    tx, ty = thin(xs, ys, limit=200)
    assert len(tx) <= 200 and 50.0 in ty and tx == sorted(tx)


def test_html_loads_in_chromium_without_console_errors(recording: Path, tmp_path: Path, chromium: str) -> None:
    import subprocess

    out = tmp_path / "run.html"
    export(recording, "html", out)
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    done = subprocess.run([*base, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    assert "step time (ms; 41 points)" in done.stdout  # the browser parsed the page we wrote
    shot = tmp_path / "run.png"
    done = subprocess.run([*base, "--window-size=1200,2000", f"--screenshot={shot}", out.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
