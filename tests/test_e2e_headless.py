"""End to end: a real script training a small torch model under `llmtop attach --headless`, watched by a
real socket client. What a dashboard needs arrives: session, model tree, steps, host samples, end."""

from __future__ import annotations

import subprocess
import textwrap
import time
from pathlib import Path

from llmtop.protocol.events import End, HostSample, ModelTree, Session, SnapshotDone, Step
from llmtop.protocol.stream import Connection

from tests.conftest import LLMTOP, child_env

TRAIN = textwrap.dedent("""
    import os, sys, time
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    print("training", flush=True)
    # Train until the watcher says it has seen enough (bounded, so a broken agent cannot hang the test).
    for step in range(3000):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(0.005)
        if step > 20 and os.path.exists("enough"):
            break
    print(f"final loss {loss.item():.4f}", flush=True)
""")


def connect(sock: Path, proc: subprocess.Popen, timeout: float = 60.0) -> Connection:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Connection(sock, timeout=10)
        except ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_training_run_streams_session_tree_steps_and_host_samples(short_tmp: Path) -> None:
    (short_tmp / "train.py").write_text(TRAIN)
    sock = short_tmp / "a.sock"
    env = child_env(LLMTOP_SOCKET=str(sock), LLMTOP_TICK="0.1")
    proc = subprocess.Popen([LLMTOP, "attach", "--headless", "train.py"], cwd=short_tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = []
    try:
        conn = connect(sock, proc)
        assert conn.peer is not None and conn.peer.role == "agent"
        steps_seen = 0
        hosts_seen = 0
        for ev in conn.events():
            events.append(ev)
            steps_seen += isinstance(ev, Step)
            hosts_seen += isinstance(ev, HostSample)
            if steps_seen >= 10 and hosts_seen >= 3:
                (short_tmp / "enough").write_text("")
            if isinstance(ev, End):
                break
        rest = list(conn.events())  # the agent closes the socket right after End
        conn.close()
        out, err = proc.communicate(timeout=60)
    finally:
        (short_tmp / "enough").write_text("")
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.startswith("training\n") and "final loss" in out
    assert rest == []

    session = events[0]
    assert isinstance(session, Session) and session.pid != proc.pid  # the python child, not llmtop
    assert session.argv == ["train.py"]
    assert any(isinstance(e, SnapshotDone) for e in events)

    trees = [e for e in events if isinstance(e, ModelTree)]
    assert len(trees) == 1
    tree = trees[0]
    assert tree.name == "Sequential"
    assert tree.paths == ["", "0", "1", "2"]
    assert tree.classes == ["Sequential", "Linear", "ReLU", "Linear"]
    assert sum(tree.params) == 16 * 32 + 32 + 32 * 4 + 4

    steps = [e for e in events if isinstance(e, Step)]
    assert len(steps) >= 10
    numbers = [s.step for s in steps]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert all(s.dur_ms > 0 and s.mode == "train" for s in steps)

    hosts = [e for e in events if isinstance(e, HostSample)]
    assert len(hosts) >= 3
    assert all(h.rss > 10 * 2**20 and h.sys_total > 0 for h in hosts)  # torch alone is far above 10 MiB

    end = events[-1]
    assert isinstance(end, End) and end.reason == "exit" and end.traceback is None
    assert not sock.exists()  # the agent removed its socket on exit


THREADED = textwrap.dedent("""
    import threading
    import torch
    from torch import nn

    def train():
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(16, 8), torch.randn(16, 1)
        for _ in range(40):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    t = threading.Thread(target=train, name="trainer")
    t.start()
    t.join()
""")


def test_steps_on_a_non_main_thread_are_measured(short_tmp: Path) -> None:
    from llmtop.protocol.recording import RecordingReader

    (short_tmp / "thr.py").write_text(THREADED)
    rec = short_tmp / "thr.llmtop"
    res = subprocess.run([LLMTOP, "attach", "--headless", "--record", str(rec), "thr.py"], cwd=short_tmp,
                         env=child_env(LLMTOP_SOCKET=str(short_tmp / "a.sock"), LLMTOP_TICK="0.1"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    with RecordingReader(rec) as reader:
        events = list(reader.events())
    trees = [e for e in events if isinstance(e, ModelTree)]
    assert [t.classes for t in trees] == [["Sequential", "Linear", "Tanh", "Linear"]]
    steps = [e for e in events if isinstance(e, Step)]
    assert len(steps) == 40 and all(s.dur_ms > 0 for s in steps)
    assert isinstance(events[-1], End) and events[-1].traceback is None
