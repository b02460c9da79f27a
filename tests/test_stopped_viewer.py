"""A SIGSTOPped viewer must not slow or block the script: its frames are dropped and counted instead.

One run, two phases of identical steps (each step emits a few hundred spans, far more than a stopped
viewer's buffers hold): phase A with no viewer, phase B with a viewer that is connected and then
SIGSTOPped. The step-time medians of the two phases are compared with a generous bound.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.conftest import LLMTOP, child_env

SCRIPT = textwrap.dedent("""
    import json, os, time
    import torch
    import llmtop.agent

    def wait_for(name):
        deadline = time.monotonic() + 120
        while not os.path.exists(name) and time.monotonic() < deadline:
            time.sleep(0.01)

    model = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64)

    def phase(n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            for k in range(300):
                with llmtop.agent.span("work", category="training_loop", k=k):
                    pass
            model(x).sum().backward()
            times.append(time.perf_counter() - t0)
        return times

    phase(20)                       # warm-up
    a = phase(120)
    open("a_done", "w").close()
    wait_for("stopped")
    b = phase(120)
    json.dump({"a": a, "b": b}, open("times.json", "w"))
    open("b_done", "w").close()
    wait_for("resumed")
""")

VIEWER = textwrap.dedent("""
    import json, sys
    from llmtop.protocol.stream import Connection
    conn = Connection(sys.argv[1], timeout=30)
    with open(sys.argv[2], "w") as log:
        for ev in conn.events():
            log.write(json.dumps({"k": ev.KIND, "dropped": getattr(ev, "dropped", None)}) + "\\n")
            log.flush()
""")


def wait_path(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the script ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {path.name}"
        time.sleep(0.02)


def viewer_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_stopped_viewer_does_not_slow_the_script_and_drops_are_counted(short_tmp: Path) -> None:
    (short_tmp / "s.py").write_text(SCRIPT)
    (short_tmp / "viewer.py").write_text(VIEWER)
    sock = short_tmp / "a.sock"
    env = child_env(LLMTOP_SOCKET=str(sock), LLMTOP_TICK="0.1", LLMTOP_CLIENT_BUFFER=str(64 * 1024))
    proc = subprocess.Popen([LLMTOP, "attach", "--headless", "s.py"], cwd=short_tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    viewer = None
    log = short_tmp / "viewer.jsonl"
    try:
        wait_path(short_tmp / "a_done", proc)
        viewer = subprocess.Popen([sys.executable, "viewer.py", str(sock), str(log)], cwd=short_tmp,
                                  env=child_env())
        deadline = time.monotonic() + 60
        while not any(e["k"] == "snapshot_done" for e in viewer_log(log)):
            assert time.monotonic() < deadline and viewer.poll() is None
            time.sleep(0.02)
        os.kill(viewer.pid, signal.SIGSTOP)
        (short_tmp / "stopped").write_text("")
        wait_path(short_tmp / "b_done", proc)
        os.kill(viewer.pid, signal.SIGCONT)
        # Once it reads again, the next transport report tells it how many frames it lost.
        deadline = time.monotonic() + 60
        while not any((e["dropped"] or 0) > 0 for e in viewer_log(log) if e["k"] == "stats"):
            assert time.monotonic() < deadline, "no Stats with dropped > 0 reached the viewer"
            time.sleep(0.05)
        (short_tmp / "resumed").write_text("")
        out, err = proc.communicate(timeout=60)
        viewer.wait(timeout=30)
    finally:
        for p in (proc, viewer):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
    assert proc.returncode == 0, err
    kinds = [e["k"] for e in viewer_log(log)]
    assert kinds[-1] == "end"  # the viewer caught up and saw the end of the run
    # Phase B emitted 120 × 300 spans while it was connected (plus up to 600 in its snapshot): it got
    # fewer, because frames were dropped for it rather than queued without bound.
    assert kinds.count("span") < 120 * 300
    times = json.loads((short_tmp / "times.json").read_text())
    a, b = statistics.median(times["a"]), statistics.median(times["b"])
    # Generous: the machine is shared; a blocked send would make phase B stall outright, not 3x.
    assert b < 3 * a + 0.005, f"median step {a * 1e3:.2f} ms without viewer, {b * 1e3:.2f} ms with a stopped one"
