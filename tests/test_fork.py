"""Fork safety: forked children (DataLoader workers, os.fork) drop the agent silently and never touch
the parent's socket; the parent keeps serving."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

from tests.conftest import LLMTOP, child_env

DATALOADER = textwrap.dedent("""
    import os, sys
    import torch
    from torch.utils.data import DataLoader, Dataset
    import llmtop.agent
    from llmtop.agent.runtime import core

    class Squares(Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, i):
            # what a worker sees: its pid, whether an agent runs there, whether hooks see one
            return torch.tensor([i * i, os.getpid(), int(llmtop.agent.is_running()), int(core.ACTIVE is not None)])

    model = torch.nn.Linear(1, 1)
    assert llmtop.agent.is_running()
    loader = DataLoader(Squares(), batch_size=8, num_workers=2, multiprocessing_context="fork")
    rows = torch.cat([b for b in loader])
    for b in loader:                            # a second epoch: fresh workers again
        model(b[:, :1].float())
    worker_pids = set(rows[:, 1].tolist())
    print("sum", int(rows[:, 0].sum()))
    print("workers", len(worker_pids), os.getpid() in worker_pids)
    print("agent_in_workers", int(rows[:, 2].sum()), int(rows[:, 3].sum()))
    print("socks", sorted(p.name for p in __import__("pathlib").Path(os.environ["LLMTOP_SOCKET"]).parent.glob("*.sock")))
""")


def test_dataloader_workers_run_no_agent(short_tmp: Path) -> None:
    (short_tmp / "dl.py").write_text(DATALOADER)
    res = subprocess.run([LLMTOP, "attach", "--headless", "dl.py"], cwd=short_tmp,
                         env=child_env(LLMTOP_SOCKET=str(short_tmp / "a.sock")),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    assert lines["sum"] == str(sum(i * i for i in range(64)))  # the data is right
    assert lines["workers"] == "2 False"  # two worker processes did the loading
    assert lines["agent_in_workers"] == "0 0"  # none of them runs an agent or sees one
    assert lines["socks"] == "['a.sock']"  # and none bound a socket of its own
    assert "llmtop" not in res.stderr


FORK = textwrap.dedent("""
    import os, sys, time
    import llmtop.agent
    from llmtop.agent.runtime import core
    from llmtop.protocol.stream import Connection

    sock = os.environ["LLMTOP_SOCKET"]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        # The child: no agent, hooks inert, and a normal exit (atexit handlers run) must not
        # close the parent's socket or remove its files.
        os.write(w, f"{llmtop.agent.is_running()} {core.ACTIVE}".encode())
        llmtop.agent.step(); llmtop.agent.metric("from_child", 1.0)
        sys.exit(0)
    os.close(w)
    child_saw = os.read(r, 100).decode()
    _, status = os.waitpid(pid, 0)
    print("child", child_saw, os.waitstatus_to_exitcode(status))
    print("socket_still_there", os.path.exists(sock), os.path.exists(sock[:-5] + ".json"))
    conn = Connection(sock, timeout=5)          # the parent still serves
    print("peer", conn.peer.role, conn.peer.pid == os.getpid())
    conn.close()
""")


def test_os_fork_child_drops_the_agent_and_leaves_the_socket_alone(short_tmp: Path) -> None:
    (short_tmp / "f.py").write_text(FORK)
    res = subprocess.run([LLMTOP, "attach", "--headless", "f.py"], cwd=short_tmp,
                         env=child_env(LLMTOP_SOCKET=str(short_tmp / "a.sock")),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["child False None 0", "socket_still_there True True", "peer agent True"]


SPAWN = textwrap.dedent("""
    import multiprocessing as mp
    import llmtop.agent

    def report(q):
        q.put(llmtop.agent.is_running())

    if __name__ == "__main__":
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=report, args=(q,))
        p.start()
        print("spawned_child_agent", q.get(timeout=60), "parent_agent", llmtop.agent.is_running())
        p.join()
""")


def test_spawned_multiprocessing_children_start_no_agent(short_tmp: Path) -> None:
    (short_tmp / "sp.py").write_text(SPAWN)
    res = subprocess.run([LLMTOP, "attach", "--headless", "sp.py"], cwd=short_tmp,
                         env=child_env(LLMTOP_SOCKET=str(short_tmp / "a.sock")),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["spawned_child_agent", "False", "parent_agent", "True"]
