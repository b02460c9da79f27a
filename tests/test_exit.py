"""Clean exit: when the script ends the agent does a final poll and flush, sends `End` (with the traceback
of an uncaught exception), closes the socket and removes its files within 2 s; the exit code is kept."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from llmtop.protocol.events import Anomaly, End, Metric, Session, Step
from llmtop.protocol.recording import RecordingReader
from llmtop.protocol.stream import Connection

from tests.conftest import LLMTOP, child_env

SCRIPT = textwrap.dedent("""
    import os, sys, threading, time
    import llmtop.agent
    while not os.path.exists("connected"):   # wait for the test's viewer
        time.sleep(0.01)
    for i in range(5):
        llmtop.agent.step()
    llmtop.agent.metric("last_words", 1.0)    # emitted just before the end: only the final poll sends it
    MODE = sys.argv[1]
    if MODE == "thread":
        t = threading.Thread(target=lambda: 1 / 0, name="worker")
        t.start(); t.join()
    with open("ended", "w") as f:
        f.write(repr(time.time()))
    if MODE == "exit7":
        sys.exit(7)
    if MODE == "raise":
        def fail():
            raise ZeroDivisionError("planted")
        fail()
""")


def run_watched(tmp: Path, mode: str, *extra: str) -> tuple[subprocess.CompletedProcess, list, float]:
    """Run the script under attach with a viewer connected; return the result, the events, the EOF time."""
    (tmp / "s.py").write_text(SCRIPT)
    sock = tmp / "a.sock"
    proc = subprocess.Popen([LLMTOP, "attach", "--headless", *extra, "s.py", mode], cwd=tmp,
                            env=child_env(LLMTOP_SOCKET=str(sock), LLMTOP_TICK="0.2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the agent never listened"
            time.sleep(0.02)
        conn = Connection(sock, timeout=10)
        (tmp / "connected").write_text("")
        events = list(conn.events())
        eof = time.time()
        conn.close()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), events, eof


def test_normal_end_flushes_and_sends_end_within_two_seconds(short_tmp: Path) -> None:
    res, events, eof = run_watched(short_tmp, "ok")
    assert res.returncode == 0, res.stderr
    assert isinstance(events[0], Session)
    end = events[-1]
    assert isinstance(end, End) and end.reason == "exit" and end.traceback is None
    assert [e.name for e in events if isinstance(e, Metric)] == ["last_words"]
    assert len([e for e in events if isinstance(e, Step)]) >= 4
    ended = float((short_tmp / "ended").read_text())
    assert eof - ended < 2.0, f"the agent took {eof - ended:.2f} s to finish after the script ended"
    assert not (short_tmp / "a.sock").exists() and not (short_tmp / "a.json").exists()


def test_uncaught_exception_end_carries_the_traceback_and_code_stays_1(short_tmp: Path) -> None:
    res, events, _ = run_watched(short_tmp, "raise")
    assert res.returncode == 1
    assert res.stderr.startswith("Traceback (most recent call last):")
    end = events[-1]
    assert isinstance(end, End) and end.reason == "exception"
    assert end.traceback is not None and end.traceback.strip() == res.stderr.strip()


def test_sys_exit_code_is_kept(short_tmp: Path) -> None:
    res, events, _ = run_watched(short_tmp, "exit7")
    assert res.returncode == 7
    assert isinstance(events[-1], End) and events[-1].traceback is None


def test_exception_in_a_thread_is_reported_and_the_script_goes_on(short_tmp: Path) -> None:
    res, events, _ = run_watched(short_tmp, "thread")
    assert res.returncode == 0
    assert "ZeroDivisionError" in res.stderr  # Python's own report is still printed
    anomalies = [e for e in events if isinstance(e, Anomaly)]
    assert any(a.what == "thread_exception" and "worker" in a.message for a in anomalies)


def test_recording_is_complete_at_exit(short_tmp: Path) -> None:
    rec = short_tmp / "run.llmtop"
    res, events, _ = run_watched(short_tmp, "ok", "--record", str(rec))
    assert res.returncode == 0, res.stderr
    with RecordingReader(rec) as reader:
        assert reader.warning is None  # closed properly: index written, nothing truncated
        recorded = list(reader.events())
    assert isinstance(recorded[0], Session) or any(isinstance(e, Session) for e in recorded)
    assert [e.name for e in recorded if isinstance(e, Metric)] == ["last_words"]
    assert isinstance(recorded[-1], End)
    live_steps = [e.step for e in events if isinstance(e, Step)]
    assert [e.step for e in recorded if isinstance(e, Step)][-len(live_steps):] == live_steps


SLOW_TICK = textwrap.dedent("""
    import sys, threading, time
    import torch
    from llmtop.agent.runtime.process import start_agent

    class Slow:
        name = "slow"
        started = threading.Event()

        def install(self, ctx):
            pass

        def poll(self, now):
            # Like a FLOP count or an op profile: seconds inside torch, mostly without the GIL.
            self.started.set()
            a = torch.randn(256, 256)
            t = time.monotonic()
            while time.monotonic() - t < 2.5:
                a @ a
            return []

        def uninstall(self):
            pass

    slow = Slow()
    start_agent(instruments=[slow], tick_s=0.05, socket=sys.argv[1])
    slow.started.wait()
    sys.exit(3)
""")


def test_exit_waits_for_a_tick_inside_torch_instead_of_aborting(short_tmp: Path) -> None:
    (short_tmp / "slow.py").write_text(SLOW_TICK)
    res = subprocess.run([sys.executable, "slow.py", str(short_tmp / "s.sock")], cwd=short_tmp,
                         env=child_env(), capture_output=True, text=True, timeout=120)
    assert "terminate called" not in res.stderr
    assert res.returncode == 3, res.stderr
