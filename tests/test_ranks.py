"""Ranks are first-class: the identity table per launcher, launchers without agents, `llmtop ls` by job,
one recording per rank; with real torchrun and torch.multiprocessing.spawn jobs (gloo on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from llmtop.agent.runtime.ranks import (
    RankIdentity,
    claim_rank_file,
    identity,
    keep_earlier_attempt,
    launcher_of,
    recording_path,
    spawn_child,
)
from llmtop.protocol.paths import AgentInfo

from tests.conftest import LLMTOP, VENV_BIN, child_env

TORCHRUN = str(VENV_BIN / "torchrun")

# --- the environment of each launcher (variables as each one sets them for a rank) ---------------------

TORCHRUN_ENV = {"TORCHELASTIC_RUN_ID": "3f2a9c", "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1", "ROLE_RANK": "5", "TORCHELASTIC_RESTART_COUNT": "2",
                "TORCHELASTIC_MAX_RESTARTS": "3", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
CASES = [
    ("torchrun", TORCHRUN_ENV,
     RankIdentity(job="3f2a9c", launcher="torchrun", rank=5, local_rank=1, world_size=8, node_rank=1, restart=2)),
    ("accelerate", {**TORCHRUN_ENV, "ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_DYNAMO_BACKEND": "NO"},
     RankIdentity(job="3f2a9c", launcher="accelerate", rank=5, local_rank=1, world_size=8, node_rank=1, restart=2)),
    ("deepspeed", {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1",
                   "MASTER_PORT": "29500", "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2"},
     RankIdentity(job="10.0.0.1:29500@1700000000", launcher="deepspeed", rank=3, local_rank=1, world_size=4,
                  node_rank=1)),
    ("slurm srun", {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "6", "SLURM_LOCALID": "2",
                    "SLURM_NTASKS": "16", "SLURM_NODEID": "1", "SLURM_NNODES": "4"},
     RankIdentity(job="slurm:4242.0", launcher="slurm", rank=6, local_rank=2, world_size=16, node_rank=1)),
    # torchrun inside an srun step: torchrun's ranks are the job's, not Slurm's one task per node
    ("torchrun under slurm", {**TORCHRUN_ENV, "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
     RankIdentity(job="3f2a9c", launcher="torchrun", rank=5, local_rank=1, world_size=8, node_rank=1, restart=2)),
    ("open mpi", {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                  "OMPI_COMM_WORLD_NODE_RANK": "1", "PMIX_NAMESPACE": "prterun-node0-1234@1"},
     RankIdentity(job="prterun-node0-1234@1", launcher="mpi", rank=2, local_rank=0, world_size=4, node_rank=1)),
    ("mpich", {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     RankIdentity(job="h:1@1700000000", launcher="mpi", rank=1, local_rank=1, world_size=2)),
    ("plain env", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "12355"},
     RankIdentity(job="127.0.0.1:12355@1700000000", launcher="env", rank=1, local_rank=1, world_size=2)),
    ("single process", {"HOME": "/root", "PATH": "/usr/bin"}, RankIdentity()),
    # an salloc shell (no srun step) is not a rank of anything
    ("salloc shell", {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2"}, RankIdentity()),
]


@pytest.mark.parametrize(("name", "env", "expected"), CASES, ids=[c[0] for c in CASES])
def test_identity_from_each_launchers_environment(name: str, env: dict[str, str], expected: RankIdentity) -> None:
    got = identity(env, parent_started=1_700_000_000.7)
    assert got == expected, name
    assert got.distributed == ((expected.world_size or 0) > 1)


def test_garbage_in_the_environment_is_no_rank() -> None:
    got = identity({"TORCHELASTIC_RUN_ID": "x", "RANK": "-1", "WORLD_SIZE": "two", "LOCAL_RANK": ""})
    assert got.launcher == "torchrun" and got.rank is None and got.world_size is None and not got.distributed


@pytest.mark.parametrize(("argv", "expected"), [
    (["/v/bin/python", "/v/bin/torchrun", "--standalone", "--nproc_per_node=2", "train.py"], "torchrun"),
    (["python3", "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py"], "torchrun"),
    (["python", "-u", "-m", "torch.distributed.launch", "train.py"], "torchrun"),
    (["python", "-W", "ignore", "-m", "torch.distributed.run", "train.py"], "torchrun"),
    (["python", "/v/bin/accelerate", "launch", "train.py"], "accelerate"),
    (["python", "/v/bin/deepspeed", "train.py"], "deepspeed"),
    (["python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "train.py"], "deepspeed"),
    (["python", "-u", "train.py"], None),  # a rank torchrun started
    (["python", "/v/bin/accelerate", "config"], None),
    (["python", "torchrun_notes.py"], None),
    (["python", "-c", "import torchrun"], None),
    (["python"], None),
])
def test_launcher_processes_are_named(argv: list[str], expected: str | None) -> None:
    assert launcher_of(argv) == expected


def test_spawn_children_are_told_by_their_command_line() -> None:
    argv = ["python", "-c", "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5, pipe_handle=7)",
            "--multiprocessing-fork"]
    assert spawn_child(argv)
    assert not spawn_child(["python", "-c", "from multiprocessing.forkserver import main; main(3, 4)"])
    assert not spawn_child(["python", "train.py"])


def test_recording_path_per_rank_pid_or_single() -> None:
    rank3 = RankIdentity(job="j", launcher="torchrun", rank=3, world_size=4)
    assert recording_path("/r/run.lrec", rank3, 77, owner=False, pending=False) == "/r/run.rank3.lrec"
    assert recording_path("/r/run", rank3, 77, owner=True, pending=False) == "/r/run.rank3.lrec"
    alone = RankIdentity(job="j", launcher="torchrun", rank=0, world_size=1)
    assert recording_path("/r/run.lrec", alone, 77, owner=True, pending=False) == "/r/run.lrec"
    assert recording_path("/r/run.lrec", RankIdentity(), 77, owner=True, pending=True) == "/r/run.pid77.lrec"
    assert recording_path("/r/run.lrec", RankIdentity(), 77, owner=False, pending=False) is None


def test_a_rank_file_held_by_a_live_writer_is_never_taken(tmp_path: Path) -> None:
    from llmtop.protocol.events import Session
    from llmtop.protocol.recording import RecordingReader, RecordingWriter

    live = RecordingWriter(str(tmp_path / "run.rank0.lrec"), Session(pid=1, argv=["a.py"]))
    mine = RecordingWriter(str(tmp_path / "run.pid2.lrec"), Session(pid=2, argv=["b.py"]))
    assert not claim_rank_file(mine.path, live.path)  # locked: the live writer keeps its file
    assert (tmp_path / "run.pid2.lrec").exists()
    live.close()
    stale = tmp_path / "run.rank1.lrec"
    stale.write_bytes(b"an earlier run's file")
    assert claim_rank_file(mine.path, str(stale))  # nobody writes it: replaced atomically
    mine.path = str(stale)
    mine.close()
    assert not (tmp_path / "run.pid2.lrec").exists()
    assert RecordingReader(stale).session.argv == ["b.py"]
    assert RecordingReader(tmp_path / "run.rank0.lrec").session.argv == ["a.py"]


def test_a_restarted_rank_keeps_the_failed_attempts_file(tmp_path: Path) -> None:
    from llmtop.protocol.events import Session
    from llmtop.protocol.recording import RecordingWriter

    path = tmp_path / "run.rank1.lrec"
    assert keep_earlier_attempt(str(path), 1) is None  # nothing there yet
    path.write_bytes(b"attempt 0")
    assert keep_earlier_attempt(str(path), 0) is None and path.exists()  # the first attempt: nothing to keep
    kept = keep_earlier_attempt(str(path), 2)
    assert kept == str(tmp_path / "run.attempt1.rank1.lrec") and Path(kept).read_bytes() == b"attempt 0"
    assert not path.exists()
    live = RecordingWriter(str(path), Session(pid=1, argv=["a.py"]))
    assert keep_earlier_attempt(str(path), 3) is None and path.exists()  # a live writer's file stays
    live.close()


def test_old_info_files_still_read_and_bad_fields_are_dropped() -> None:
    old = AgentInfo.from_json({"pid": 12, "socket": "/s/12.sock", "argv": ["t.py"], "started": 5.0})
    assert old == AgentInfo(12, "/s/12.sock", ["t.py"], 5.0) and not old.distributed
    new = AgentInfo.from_json({"pid": 12, "socket": "/s/12.sock", "argv": ["t.py"], "started": 5.0, "job": "j",
                               "launcher": "torchrun", "rank": 1, "local_rank": True, "world_size": "2",
                               "node_rank": -3, "host": "h", "attach": 99, "future": {"x": 1}})
    assert (new.job, new.launcher, new.rank, new.host, new.attach) == ("j", "torchrun", 1, "h", 99)
    assert new.local_rank is None and new.world_size is None and new.node_rank is None


# --- `llmtop ls` on real info files of live processes --------------------------------------------------


def test_ls_lists_ranks_under_their_job_sorted_by_rank(short_tmp: Path) -> None:
    runtime = short_tmp / "rt"
    (runtime / "llmtop").mkdir(parents=True, mode=0o700)
    os.chmod(runtime, 0o700)
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(4)]
    try:
        now = time.time()
        rows = [  # (pid, argv, extra): rank 1 first on purpose, a single process in between
            (sleepers[0].pid, ["-u", "train.py"], {"job": "abc", "launcher": "torchrun", "rank": 1,
                                                   "local_rank": 1, "world_size": 2, "node_rank": 0}),
            (sleepers[1].pid, ["solo.py"], {}),
            (sleepers[2].pid, ["-u", "train.py"], {"job": "abc", "launcher": "torchrun", "rank": 0,
                                                   "local_rank": 0, "world_size": 2, "node_rank": 0}),
            (sleepers[3].pid, ["-u", "other.py"], {"job": "zzz", "launcher": "slurm", "rank": 2,
                                                   "world_size": 4}),
        ]
        for i, (pid, argv, extra) in enumerate(rows):
            sock = runtime / "llmtop" / f"{pid}.sock"
            sock.touch()
            sock.with_suffix(".json").write_text(json.dumps(
                {"pid": pid, "socket": str(sock), "argv": argv, "started": now - 100 + i, **extra}))
        env = child_env(XDG_RUNTIME_DIR=str(runtime))
        out = subprocess.run([LLMTOP, "ls"], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()[1:]
        assert len(lines) == 6, out.stdout
        assert "job" in lines[0] and "torchrun job abc, 2/2 ranks" in lines[0] and "train.py" in lines[0]
        assert "-u train.py" not in lines[0]  # torchrun's `python -u` is not the user's script
        assert lines[1].split()[0] == str(sleepers[2].pid) and "rank 0 local 0 node 0" in lines[1]
        assert lines[2].split()[0] == str(sleepers[0].pid) and "rank 1 local 1 node 0" in lines[2]
        assert lines[3].split()[0] == str(sleepers[1].pid) and "solo.py" in lines[3]
        assert "slurm job zzz, 1/4 ranks" in lines[4] and "rank 2" in lines[5]
        as_json = [json.loads(line) for line in subprocess.run(
            [LLMTOP, "ls", "--json"], capture_output=True, text=True, env=env, timeout=60).stdout.splitlines()]
        by_pid = {a["pid"]: a for a in as_json}
        assert by_pid[sleepers[2].pid]["rank"] == 0 and by_pid[sleepers[2].pid]["job"] == "abc"
        assert by_pid[sleepers[1].pid]["rank"] is None and by_pid[sleepers[1].pid]["job"] == ""
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


# --- real jobs ---------------------------------------------------------------------------------------

DDP = textwrap.dedent("""
    import os, sys, time
    import torch, torch.distributed as dist
    from torch import nn

    def train(go: str) -> None:
        m = nn.parallel.DistributedDataParallel(nn.Linear(8, 8))
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        step = 0
        while step < 12 or not os.path.exists(go):
            loss = m(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            time.sleep(0.02)
            # every rank must leave the loop at the same step (the all-reduce pairs them up)
            flag = torch.tensor([float(os.path.exists(go))])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if step >= 12 and flag.item() > 0:
                break
        # one write per line: the ranks share the pipe (print writes its parts one by one)
        os.write(1, f"rank {dist.get_rank()} done\\n".encode())
""")

TORCHRUN_SCRIPT = DDP + textwrap.dedent("""
    if __name__ == "__main__":
        dist.init_process_group("gloo")
        train(sys.argv[1])
        dist.destroy_process_group()
        sys.exit(int(sys.argv[2]))
""")

SPAWN_SCRIPT = DDP + textwrap.dedent("""
    def work(i, world, port, go):
        # set here, after the agent started: the late path must still find them
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=i, world_size=world)
        train(go)
        dist.destroy_process_group()

    if __name__ == "__main__":
        import socket
        import torch.multiprocessing as mp
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(work, args=(2, port, sys.argv[1]), nprocs=2)
""")


def wait_for_ranks(env: dict[str, str], n: int, proc: subprocess.Popen, timeout: float = 120.0) -> list[dict]:
    """`llmtop ls --json` until ``n`` agents with a rank are listed (the job's ranks are up)."""
    deadline = time.monotonic() + timeout
    agents: list[dict] = []
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the job ended before its ranks were listed"
        out = subprocess.run([LLMTOP, "ls", "--json"], capture_output=True, text=True, env=env, timeout=60)
        agents = [json.loads(line) for line in out.stdout.splitlines()]
        if sum(1 for a in agents if a.get("rank") is not None) >= n:
            return agents
        time.sleep(0.3)
    raise AssertionError(f"ranks never listed: {agents}")


def read_rank_file(path: Path) -> tuple[object, int, str]:
    from llmtop.protocol.recording import RecordingReader

    r = RecordingReader(path)
    report = subprocess.run([LLMTOP, "report", str(path)], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    return r.session, r.steps, report.stdout


def job_env(short_tmp: Path) -> tuple[dict[str, str], Path]:
    """The environment of a job under test (its own runtime directory, quick ticks, no op profiles or
    FLOPs), and the file whose creation lets its ranks leave their loop."""
    runtime = short_tmp / "rt"
    runtime.mkdir(mode=0o700)
    env = child_env(XDG_RUNTIME_DIR=str(runtime), OMP_NUM_THREADS="1", LLMTOP_OPS_EVERY="0", LLMTOP_FLOPS="0",
                    LLMTOP_TICK="0.2")
    env.pop("LLMTOP_SOCKET", None)
    return env, short_tmp / "go"


def let_the_job_end(attach: subprocess.Popen, go: Path) -> tuple[str, str]:
    """Let the ranks leave their loop and wait for the job; its output (a job that hangs is killed)."""
    go.touch()
    try:
        return attach.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        attach.send_signal(signal.SIGKILL)
        attach.communicate()
        raise


def test_torchrun_job_under_attach_ls_recordings_and_exit_code(short_tmp: Path) -> None:
    """`llmtop attach --headless --record run.lrec -- torchrun --nproc_per_node=2`: the launcher has no
    agent, `ls` shows one job with both ranks (naming this attach), each rank writes its own file with
    its rank in the Session, and attach returns torchrun's exit code (a rank exiting 3 fails the job)."""
    script = short_tmp / "ddp.py"
    script.write_text(TORCHRUN_SCRIPT)
    env, go = job_env(short_tmp)
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), str(go), "3"]
    attach = subprocess.Popen([LLMTOP, "attach", "--headless", "--record", str(short_tmp / "run.lrec"), "--", *cmd],
                              cwd=short_tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        agents = wait_for_ranks(env, 2, attach)
        listing = subprocess.run([LLMTOP, "ls"], capture_output=True, text=True, env=env, timeout=60).stdout
    finally:
        out, err = let_the_job_end(attach, go)
    assert len(agents) == 2, agents  # torchrun itself runs no agent
    assert not any("torchrun" in " ".join(a["argv"]) for a in agents)
    assert sorted(a["rank"] for a in agents) == [0, 1]
    assert {a["world_size"] for a in agents} == {2} and {a["launcher"] for a in agents} == {"torchrun"}
    assert len({a["job"] for a in agents}) == 1 and agents[0]["job"]
    assert {a["attach"] for a in agents} == {attach.pid} and all(a["host"] for a in agents)
    lines = listing.splitlines()
    assert len(lines) == 4 and "torchrun job" in lines[1] and "2/2 ranks" in lines[1], listing
    assert "rank 0" in lines[2] and "rank 1" in lines[3]

    bare = subprocess.run(cmd, cwd=short_tmp, env={**env, "LLMTOP": "0"}, capture_output=True, text=True,
                          timeout=180)
    assert bare.returncode != 0 and attach.returncode == bare.returncode, (err, bare.stderr)
    assert "rank 0 done" in out and "rank 1 done" in out

    assert sorted(p.name for p in short_tmp.glob("run*.lrec")) == ["run.rank0.lrec", "run.rank1.lrec"]
    pids = {a["rank"]: a["pid"] for a in agents}
    for rank in (0, 1):
        session, steps, report = read_rank_file(short_tmp / f"run.rank{rank}.lrec")
        assert (session.rank, session.local_rank, session.world_size, session.node_rank) == (rank, rank, 2, 0)
        assert session.launcher == "torchrun" and session.job == agents[0]["job"] and session.restart == 0
        assert session.pid == pids[rank] and steps >= 12
        assert "ddp.py" in report and "steps (train" in report


def test_spawn_children_learn_their_rank_late(short_tmp: Path) -> None:
    """torch.multiprocessing.spawn children have no launcher variables: each gets an agent when it
    unpickles spawn's target, learns its rank from torch.distributed once initialised, re-sends its
    Session, rewrites its info file and renames its recording from run.pid{P}.lrec to run.rank{R}.lrec."""
    script = short_tmp / "spawn_ddp.py"
    script.write_text(SPAWN_SCRIPT)
    env, go = job_env(short_tmp)
    attach = subprocess.Popen([LLMTOP, "attach", "--headless", "--record", str(short_tmp / "run.lrec"), str(script),
                               str(go)], cwd=short_tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        agents = wait_for_ranks(env, 2, attach)
    finally:
        out, err = let_the_job_end(attach, go)
    assert attach.returncode == 0, err
    ranked = sorted((a for a in agents if a["rank"] is not None), key=lambda a: a["rank"])
    assert [a["rank"] for a in ranked] == [0, 1] and {a["launcher"] for a in ranked} == {"spawn"}
    assert {a["world_size"] for a in ranked} == {2} and len({a["job"] for a in ranked}) == 1
    assert ranked[0]["job"].startswith("127.0.0.1:") and ranked[0]["argv"][0].endswith("spawn_ddp.py")
    # the spawning script is the single process that owns the attach socket, and records run.lrec
    assert sorted(p.name for p in short_tmp.glob("run*.lrec")) == ["run.lrec", "run.rank0.lrec", "run.rank1.lrec"]
    for a in ranked:
        session, steps, report = read_rank_file(short_tmp / f"run.rank{a['rank']}.lrec")
        assert (session.rank, session.world_size, session.launcher) == (a["rank"], 2, "spawn")
        assert session.pid == a["pid"] and steps >= 12 and "steps (train" in report
    from llmtop.protocol.recording import RecordingReader

    assert RecordingReader(short_tmp / "run.lrec").session.rank is None


@pytest.mark.parametrize("launcher", [["-m", "torch.distributed.run"], [TORCHRUN]])
def test_a_launcher_process_starts_no_agent(short_tmp: Path, launcher: list[str]) -> None:
    """`LLMTOP=1 torchrun …` (or `python -m torch.distributed.run`): the launcher runs llmtop's start-up
    hook like any Python process and must start no agent; its rank does. The rank itself looks, while
    both are alive, for an agent of its parent (the launcher) among the info files."""
    script = short_tmp / "one.py"
    script.write_text(textwrap.dedent("""
        import os
        import llmtop.agent
        from llmtop.protocol.paths import list_agents
        pids = sorted(a.pid for a in list_agents())
        print("AGENT", llmtop.agent.is_running(), "MINE", pids == [os.getpid()], "PARENT", os.getppid() in pids)
    """))
    runtime = short_tmp / "rt"
    runtime.mkdir(mode=0o700)
    env = child_env(LLMTOP="1", XDG_RUNTIME_DIR=str(runtime), OMP_NUM_THREADS="1")
    cmd = launcher if launcher[0] == TORCHRUN else [sys.executable, *launcher]
    out = subprocess.run([*cmd, "--standalone", "--nproc_per_node=1", str(script)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "AGENT True MINE True PARENT False" in out.stdout, out.stdout


RESTART_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import torch
    from torch import nn
    m = nn.Linear(8, 8)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(6):
        loss = m(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(0.02)
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "0":
        sys.exit(7)  # the first attempt fails: torchrun restarts the worker group
    os.write(1, f"attempt {os.environ['TORCHELASTIC_RESTART_COUNT']} rank {os.environ['RANK']} done\\n".encode())
""")


def test_an_elastic_restart_keeps_each_attempts_recording(short_tmp: Path) -> None:
    """torchrun --max-restarts=1 after a failed first attempt: the second attempt's ranks say restart 1
    and write run.rank{R}.lrec; the first attempt's files are kept as run.attempt0.rank{R}.lrec."""
    from llmtop.protocol.recording import RecordingReader

    script = short_tmp / "restart.py"
    script.write_text(RESTART_SCRIPT)
    runtime = short_tmp / "rt"
    runtime.mkdir(mode=0o700)
    # a store per attempt: torch 2.13's torchrun otherwise hands the restarted workers the first
    # attempt's store keys, and their gloo can wait for each other for ever (see tests/test_job_view.py)
    env = child_env(XDG_RUNTIME_DIR=str(runtime), OMP_NUM_THREADS="1", LLMTOP_OPS_EVERY="0", LLMTOP_FLOPS="0",
                    LLMTOP_TICK="0.2", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env.pop("LLMTOP_SOCKET", None)
    out = subprocess.run([LLMTOP, "attach", "--headless", "--record", str(short_tmp / "run.lrec"), "--", TORCHRUN,
                          "--standalone", "--nproc_per_node=2", "--max-restarts=1", "--monitor-interval=0.2",
                          str(script)], cwd=short_tmp, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "attempt 1 rank 0 done" in out.stdout and "attempt 1 rank 1 done" in out.stdout
    names = sorted(p.name for p in short_tmp.glob("run*.lrec"))
    assert names == ["run.attempt0.rank0.lrec", "run.attempt0.rank1.lrec", "run.rank0.lrec", "run.rank1.lrec"]
    for name, rank, restart in [("run.attempt0.rank0.lrec", 0, 0), ("run.attempt0.rank1.lrec", 1, 0),
                                ("run.rank0.lrec", 0, 1), ("run.rank1.lrec", 1, 1)]:
        r = RecordingReader(short_tmp / name)
        assert (r.session.rank, r.session.world_size, r.session.restart) == (rank, 2, restart), name
        assert r.steps == 6, name


def test_a_script_that_initialises_torch_distributed_itself_is_told_late(short_tmp: Path) -> None:
    """No launcher at all: the script calls init_process_group (world size 1, file store). The agent
    learns rank 0 of 1 from torch.distributed (launcher "dist"), re-sends its Session (the recording's
    newest Session has it), and as a single process keeps recording to run.lrec."""
    from llmtop.protocol.recording import RecordingReader

    script = short_tmp / "alone.py"
    script.write_text(textwrap.dedent(f"""
        import time
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method="file://{short_tmp}/store", rank=0, world_size=1)
        time.sleep(1.0)  # a few ticks
        dist.destroy_process_group()
    """))
    path = short_tmp / "run.lrec"
    env = child_env(LLMTOP="1", LLMTOP_RECORD=str(path), LLMTOP_TICK="0.1", LLMTOP_SOCKET=str(short_tmp / "a.sock"),
                    OMP_NUM_THREADS="1", LLMTOP_OPS_EVERY="0", LLMTOP_FLOPS="0")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in short_tmp.glob("run*.lrec")) == ["run.lrec"]
    r = RecordingReader(path)
    assert (r.session.launcher, r.session.rank, r.session.world_size) == ("dist", 0, 1)
    assert r.session.job.startswith("dist:")  # no MASTER_ADDR: the host and parent pid name the job
