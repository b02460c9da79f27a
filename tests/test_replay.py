"""Replay: a live session and its recordings give the same model state; the replay clock and the
transport keys of `llmtop replay` (Pilot); `llmtop record` as a real recorder process."""

from __future__ import annotations

import asyncio
import functools
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from llmtop.protocol.events import End
from llmtop.protocol.recording import RecordingReader
from llmtop.tui.commands.record import start_tui_recording
from llmtop.tui.session.model import SessionModel
from llmtop.tui.session.recording_source import MAX_SPEED, RecordingSource
from llmtop.tui.views.help import HelpScreen
from llmtop.tui.views.replay import TRANSPORT_KEYS, ReplayApp, parse_target, position_bar

from tests.conftest import LLMTOP, child_env
from tests.test_e2e_headless import connect
from tests.test_recording import KeyframeBuilder, run_events, write

TRAIN = textwrap.dedent("""
    import os, time
    import torch
    from torch import nn
    import llmtop.agent

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for step in range(3000):
        with llmtop.agent.span("batch", category="data_loading"):
            time.sleep(0.002)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(0.005)
        if step > 20 and os.path.exists("enough"):
            break
    print("done", flush=True)
""")


def state(model: SessionModel) -> dict[str, Any]:
    """What the dashboard shows of a session (not transport: drops, clients, connection)."""
    return {
        "session": (model.session.pid, model.session.argv) if model.session else None,
        "models": model.models,
        "steps": list(model.steps),
        "step_count": model.step_count,
        "tokens": model.tokens_total,
        "layers": {la.path: (la.fwd_ms, la.fwd_self_ms, la.bwd_ms, la.calls, la.fwd_ema, list(la.history))
                   for la in model.layers.values()},
        "host": list(model.host),
        "spans": {k: (s.count, s.total_ms) for k, s in model.spans.items()} if model.spans else {},
        "anomalies": list(model.anomalies),
        "end": (model.end.reason, model.end.traceback) if model.end else None,
    }


def replayed(path: Path) -> SessionModel:
    model = SessionModel()
    with RecordingReader(path) as r:
        assert r.warning is None
        model.apply_all(r.events())
    return model


def test_live_session_and_its_recordings_match(short_tmp: Path) -> None:
    (short_tmp / "train.py").write_text(TRAIN)
    sock = short_tmp / "a.sock"
    agent_file, recorder_file, stopped_file = short_tmp / "agent.lrec", short_tmp / "rec.lrec", short_tmp / "stop.lrec"
    key_file = short_tmp / "key.lrec"
    env = child_env(LLMTOP_SOCKET=str(sock), LLMTOP_TICK="0.1")
    proc = subprocess.Popen([LLMTOP, "attach", "--headless", "--record", str(agent_file), "train.py"],
                            cwd=short_tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    recorders: list[subprocess.Popen] = []
    live = SessionModel()
    try:
        conn = connect(sock, proc)
        background = start_tui_recording(sock, str(key_file))  # what the dashboard's record key runs
        for out in (recorder_file, stopped_file):
            recorders.append(subprocess.Popen([LLMTOP, "record", str(sock), "-o", str(out)], env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        stopped = False
        for ev in conn.events():
            live.apply(ev)
            if live.step_count >= 15 and not stopped and stopped_file.exists():
                recorders[1].send_signal(signal.SIGINT)  # the user stops this recorder mid-run
                assert background.stop() == 0 and not background.running
                stopped = True
            if live.step_count >= 40 and stopped:
                (short_tmp / "enough").write_text("")
        conn.close()
        out, err = proc.communicate(timeout=60)
        results = [r.communicate(timeout=30) for r in recorders]
    finally:
        (short_tmp / "enough").write_text("")
        for p in [proc, *recorders]:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert proc.returncode == 0, err
    assert live.end is not None and live.step_count >= 40
    want = state(live)
    assert want["layers"] and want["host"] and want["spans"]
    # The agent's own recording and an external `llmtop record` both replay to the live state.
    for path in (agent_file, recorder_file):
        assert state(replayed(path)) == want, path.name
    assert recorders[0].returncode == 0, results[0][1]
    assert "the script ended" in results[0][1]
    # The recorder stopped with SIGINT: a clean, indexed file that ends with an End marked detached.
    assert recorders[1].returncode == 0, results[1][1]
    for path in (stopped_file, key_file):
        r = RecordingReader(path)
        assert r.warning is None
        events = list(r.events())
        assert isinstance(events[-1], End) and events[-1].reason == "detached"
        assert 0 < r.steps < live.step_count


# --- the replay clock, without a screen -------------------------------------------------------------


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    path = tmp_path / "run.lrec"
    write(path, run_events(100), keyframe_every=25, end=End(t=1012.0, exit_code=0, reason="exit"))
    return path


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def run_source(src: RecordingSource) -> tuple[SessionModel, threading.Thread]:
    model = SessionModel()
    thread = threading.Thread(target=src.run, args=(model,), daemon=True)
    thread.start()
    assert src.done.wait(10)
    return model, thread


def last_step(model: SessionModel) -> int | None:
    with model.lock:
        return model.last_step.step if model.last_step else None


def test_source_seeks_and_plays_to_the_end(recording: Path) -> None:
    src = RecordingSource(recording, start="end", playing=False)
    model, thread = run_source(src)
    assert last_step(model) == 99 and model.end is not None and src.at_end
    assert src.position == pytest.approx(src.duration)
    seeks = src.seeks
    src.seek_step(30)
    wait_for(lambda: src.seeks > seeks)
    assert last_step(model) == 30 and src.step == 30 and model.end is None
    seeks = src.seeks
    src.next_step()
    src.next_step()  # requests that pile up are added together
    wait_for(lambda: src.seeks > seeks)
    assert last_step(model) == 32
    seeks = src.seeks
    src.prev_step()
    wait_for(lambda: src.seeks > seeks)
    assert last_step(model) == 31
    seeks = src.seeks
    src.seek_time(1.0)  # the recording starts with the session (t=1000); step 0 ends at 1001
    wait_for(lambda: src.seeks > seeks)
    assert last_step(model) == 0
    seeks = src.seeks
    src.seek_time(0.0)
    wait_for(lambda: src.seeks > seeks)
    assert last_step(model) is None and model.models
    src.set_speed(100)
    assert src.speed == MAX_SPEED
    src.play()
    wait_for(lambda: not src.playing, timeout=30)  # plays through (10 s at 16x) and stops at the end
    assert last_step(model) == 99 and model.end is not None
    # Played through from step 0, the model saw every later step exactly once.
    full = SessionModel()
    full.apply_all(RecordingReader(recording).events())
    assert [s.step for s in model.steps][-99:] == [s.step for s in full.steps][-99:]
    src.stop()
    thread.join(5)
    assert not thread.is_alive()


def test_goto_parsing_and_position_bar() -> None:
    assert parse_target("120", 600) == ("step", 120)
    assert parse_target("step 7", 600) == ("step", 7)
    assert parse_target("1:30", 600) == ("time", 90)
    assert parse_target("1:02:03", 9000) == ("time", 3723)
    assert parse_target("90s", 600) == ("time", 90)
    assert parse_target("2m", 600) == ("time", 120)
    assert parse_target("50%", 600) == ("time", 300)
    assert parse_target("soon", 600) is None
    assert position_bar(0, 10, 11) == "●" + "─" * 10
    assert position_bar(10, 10, 11) == "━" * 10 + "●"
    assert position_bar(5, 10, 11) == "━" * 5 + "●" + "─" * 5


# --- the replay app (Pilot) ------------------------------------------------------------------------------


def test_transport_keys_are_declared_with_ids() -> None:
    ids = [b.id for b in TRANSPORT_KEYS]
    assert all(ids) and len(set(ids)) == len(ids)
    keys = {k for b in TRANSPORT_KEYS for k in b.key.split(",")}
    assert {"k", "j", "l", "comma", "full_stop", "less_than_sign", "greater_than_sign", "home", "end", "g"} <= keys


def aio(fn):
    """Run an async test with asyncio (no pytest-asyncio here); fixtures pass through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


@aio
async def test_replay_app_transport_keys(recording: Path) -> None:
    src = RecordingSource(recording, playing=False)
    app = ReplayApp(src)

    async def settle(pilot, check) -> None:
        for _ in range(200):
            await pilot.pause(0.02)
            if check():
                return
        raise AssertionError("the replay did not get there")

    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, lambda: src.seeks >= 1)
        assert last_step(app.model) is None and app.model.session is not None
        await pilot.press("end")
        await settle(pilot, lambda: last_step(app.model) == 99)
        assert app.model.end is not None
        assert "99/99" in app.transport_text().plain
        await pilot.press("comma")
        await settle(pilot, lambda: last_step(app.model) == 98)
        await pilot.press("home")
        await settle(pilot, lambda: last_step(app.model) is None)
        await pilot.press("full_stop")
        await settle(pilot, lambda: last_step(app.model) == 0)
        await pilot.press("full_stop")
        await settle(pilot, lambda: last_step(app.model) == 1)
        await pilot.press("g")
        await pilot.press("4", "2", "enter")
        await settle(pilot, lambda: last_step(app.model) == 42)
        position = src.position
        await pilot.press("j")  # back 10 s: steps are 0.1 s apart, so back before the first step
        await settle(pilot, lambda: src.position < position)
        assert last_step(app.model) is None
        await pilot.press("l")
        await settle(pilot, lambda: last_step(app.model) == 90)  # t=10 s: step 90 ends at 1001 + 9.0
        await pilot.press("greater_than_sign")
        assert src.speed == 2.0
        await pilot.press("less_than_sign", "less_than_sign")
        assert src.speed == 0.5
        await pilot.press("home")
        await settle(pilot, lambda: src.position == 0 and last_step(app.model) is None)
        await pilot.press("k")
        assert src.playing
        await settle(pilot, lambda: (last_step(app.model) or 0) > 0)  # the clock moves the model
        await pilot.press("k")
        assert not src.playing
        assert "replay" in str(app.query_one("#status").render())
        await pilot.press("question_mark")
        await pilot.pause(0.1)
        assert isinstance(app.screen, HelpScreen)
        title, keys = app.screen.view_keys[0]
        assert title == "Replay" and [b.id for b in keys] == [b.id for b in TRANSPORT_KEYS]
        await pilot.press("escape")
        await pilot.press("q")
    assert KeyframeBuilder  # the recordings above were written with keyframes from it


def _bad_late_block(recording: Path, out: Path) -> None:
    """``recording`` with a Step of the wrong type in its last data block, everything else valid
    (checksums, index): the file opens, and the defect shows only once that block is read."""
    from tests.test_fuzz_recordings import build, parse

    rec = parse(recording.read_bytes())
    last = [b for b in rec.items if b != "footer" and b.frames and any(f.get("k") == "step" for f in b.frames)][-1]
    next(f for f in last.frames if f.get("k") == "step")["step"] = "seven"
    out.write_bytes(build(rec))


def test_replay_of_a_bad_block_exits_2_with_one_line_and_no_traceback(recording: Path, short_tmp: Path) -> None:
    """The real command in a real terminal (a pty): `--end` reads the bad block at once; the worker
    stops, the app closes, and the command says why in one line with exit status 2."""
    import os
    import pty
    import select
    import sys

    bad = short_tmp / "bad.lrec"
    _bad_late_block(recording, bad)
    with RecordingReader(bad) as r:  # opening reads only the header and the index: fine
        assert r.warning is None
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "llmtop.cli", "replay", "--end", str(bad)], stdin=slave,
                            stdout=slave, stderr=slave, close_fds=True,
                            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"})
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)  # a hang guard, not a speed check
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(30) == 2
    text = out.decode("utf-8", "replace")
    assert "Traceback" not in text
    # the line follows the escape codes that restore the terminal, on the same row
    lines = [line[line.index("llmtop replay: "):] for line in text.replace("\r", "\n").split("\n")
             if "llmtop replay: " in line]
    assert len(lines) == 1 and "malformed 'step' event: field 'step'" in lines[0], text[-2000:]
