"""Issue 18 as an attacker: a second local user against the socket directory, its files and the
socket, and a client flooding the server. Real users (``useradd``), real processes and sockets.

The victim and the attacker are two test users (``ltvictim``, ``ltevil``): the default socket
directory ``/tmp/llmtop-<uid>`` then belongs to tests alone, never to a developer's running agents.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LLMTOP, VENV_BIN, child_env

PY = sys.executable
VICTIM, EVIL = "ltvictim", "ltevil"

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                                reason="two-user attacks need root (to create and become test users)")


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True, capture_output=True)
        return pwd.getpwnam(name)


@pytest.fixture(scope="session")
def reachable_python() -> Iterator[None]:
    """The test users run this venv's python, whose interpreter and stdlib may live under a
    directory only root may enter (pyenv under /root, mode 0700). Let others traverse (o+x, no
    listing) the directories on those paths for the session, and put each mode back afterwards."""
    changed: list[tuple[Path, int]] = []
    for target in {Path(os.path.realpath(sys.executable)), Path(sys.base_prefix), VENV_BIN}:
        for d in [*reversed(target.parents), target]:
            if d.is_dir() and not d.stat().st_mode & stat.S_IXOTH:
                mode = stat.S_IMODE(d.stat().st_mode)
                d.chmod(mode | stat.S_IXOTH)
                changed.append((d, mode))
    try:
        yield
    finally:
        for d, mode in reversed(changed):
            d.chmod(mode)


@pytest.fixture
def users(reachable_python: None) -> Iterator[tuple[pwd.struct_passwd, pwd.struct_passwd]]:
    victim, evil = _ensure_user(VICTIM), _ensure_user(EVIL)
    _clear_default_dirs(victim.pw_uid)
    yield victim, evil
    _clear_default_dirs(victim.pw_uid)


def _clear_default_dirs(uid: int) -> None:
    for p in Path("/tmp").glob(f"llmtop-{uid}*"):
        if p.is_symlink() or not p.is_dir():
            p.unlink()
        else:
            shutil.rmtree(p, ignore_errors=True)


def user_env(**extra: str) -> dict[str, str]:
    """A clean environment as cron or Slurm gives it: no XDG_RUNTIME_DIR."""
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def run_as(user: pwd.struct_passwd, argv: list[str], cwd: Path | str = "/tmp", timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd=cwd,
                          env=env or user_env(), capture_output=True, text=True, timeout=timeout)


def py_as(user: pwd.struct_passwd, code: str, **kw) -> subprocess.CompletedProcess[str]:
    return run_as(user, [PY, "-c", textwrap.dedent(code)], **kw)


@pytest.fixture
def shared(short_tmp: Path) -> Path:
    """A directory every test user can read (scripts live here)."""
    short_tmp.chmod(0o755)
    return short_tmp


SCRIPT = """
import os, time
p = os.environ["LLMTOP_SOCKET"]
for _ in range(1500):
    if os.path.exists(p):
        break
    time.sleep(0.02)
print("socket", p, os.path.exists(p), flush=True)
"""


def attach_as_victim(victim: pwd.struct_passwd, shared: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    script = shared / "victim.py"
    script.write_text(SCRIPT)
    script.chmod(0o644)
    res = run_as(victim, [LLMTOP, "attach", "--headless", str(script)], cwd=shared)
    assert res.returncode == 0, res.stderr
    words = res.stdout.split()
    assert words[0] == "socket" and words[2] == "True", res.stdout
    return res, Path(words[1])


def assert_refused_and_fell_back(res: subprocess.CompletedProcess[str], sock: Path, bad: Path) -> None:
    assert "Traceback" not in res.stderr
    notes = [line for line in res.stderr.splitlines() if "refusing unsafe socket directory" in line]
    assert len(notes) == 1, res.stderr  # one line, from the launcher; its agent reuses the fallback quietly
    assert str(bad) in notes[0]
    assert sock.parent != bad and sock.parent.name.startswith(f"llmtop-{pwd.getpwnam(VICTIM).pw_uid}-")
    st = os.lstat(sock.parent)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == pwd.getpwnam(VICTIM).pw_uid and stat.S_IMODE(st.st_mode) == 0o700


# --- the socket directory -----------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("mode", [0o777, 0o700])
def test_a_socket_directory_made_by_another_user_is_refused(users, shared: Path, mode: int) -> None:
    victim, evil = users
    bad = Path(f"/tmp/llmtop-{victim.pw_uid}")
    made = py_as(evil, f"import os; os.mkdir({str(bad)!r}); os.chmod({str(bad)!r}, {mode})")
    assert made.returncode == 0, made.stderr
    res, sock = attach_as_victim(victim, shared)  # 0700: `llmtop attach` used to die with a traceback
    assert_refused_and_fell_back(res, sock, bad)
    assert os.listdir(bad) == []  # nothing of the victim's went into the attacker's directory
    assert os.stat(bad).st_uid == evil.pw_uid and stat.S_IMODE(os.stat(bad).st_mode) == mode


@needs_root
def test_a_symlink_in_place_of_the_socket_directory_is_not_followed(users, shared: Path) -> None:
    victim, evil = users
    target = Path(tempfile.mkdtemp(prefix="ltv-", dir="/tmp"))
    try:
        os.chown(target, victim.pw_uid, victim.pw_gid)
        target.chmod(0o755)  # a directory of the victim's that the attacker wants made private/used
        bad = Path(f"/tmp/llmtop-{victim.pw_uid}")
        made = py_as(evil, f"import os; os.symlink({str(target)!r}, {str(bad)!r})")
        assert made.returncode == 0, made.stderr
        res, sock = attach_as_victim(victim, shared)
        assert_refused_and_fell_back(res, sock, bad)
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o755  # not chmodded through the link
        assert os.listdir(target) == []
        assert os.path.islink(bad)
    finally:
        shutil.rmtree(target, ignore_errors=True)


@needs_root
def test_llmtop_ls_and_watch_never_trust_another_users_directory(users, shared: Path) -> None:
    victim, evil = users
    bad = Path(f"/tmp/llmtop-{victim.pw_uid}")
    code = f"""
        import json, os, socket
        os.mkdir({str(bad)!r}); os.chmod({str(bad)!r}, 0o755)
        s = socket.socket(socket.AF_UNIX); s.bind({str(bad / '1.sock')!r}); os.chmod({str(bad / '1.sock')!r}, 0o777)
        json.dump({{"pid": 1, "socket": {str(bad / '1.sock')!r}, "argv": ["evil.py"], "started": 0}},
                  open({str(bad / '1.json')!r}, "w"))
    """
    assert py_as(evil, code).returncode == 0
    listed = run_as(victim, [LLMTOP, "ls", "--json"])
    assert listed.returncode == 0 and "evil.py" not in listed.stdout
    watched = run_as(victim, [LLMTOP, "watch", "1"])
    assert watched.returncode == 1 and "no llmtop agent found for pid 1" in watched.stderr


# --- files in a shared directory (an explicit LLMTOP_SOCKET) -------------------------------------------


@pytest.fixture
def sticky(short_tmp: Path) -> Path:
    """A world-writable sticky directory like /tmp, for a socket path the user chose there."""
    d = short_tmp / "shared"
    d.mkdir()
    d.chmod(0o1777)
    short_tmp.chmod(0o755)
    return d


@pytest.fixture
def victim_secret(users) -> Iterator[Path]:
    victim, _ = users
    home = Path(tempfile.mkdtemp(prefix="ltvh-", dir="/tmp"))
    os.chown(home, victim.pw_uid, victim.pw_gid)
    home.chmod(0o755)
    secret = home / "secret"
    secret.write_text("victim's data\n")
    os.chown(secret, victim.pw_uid, victim.pw_gid)
    secret.chmod(0o600)
    yield secret
    shutil.rmtree(home, ignore_errors=True)


@needs_root
def test_info_file_never_writes_through_a_planted_symlink(users, sticky: Path, victim_secret: Path) -> None:
    victim, evil = users
    sock = sticky / "a.sock"
    plant = f"""
        import os
        os.symlink({str(victim_secret)!r}, {str(sticky / 'a.json')!r})
        last = int(open("/proc/sys/kernel/ns_last_pid").read())
        for pid in range(last + 1, last + 2000):  # the old predictable temporary name, for the next pids
            os.symlink({str(victim_secret)!r}, {str(sticky)!r} + f"/.a.json.{{pid}}.tmp")
    """
    assert py_as(evil, plant).returncode == 0
    code = f"""
        from llmtop.agent.runtime.agent import Agent
        from llmtop.agent.runtime.options import options_from_env
        agent = Agent(options_from_env({{}}, socket={str(sock)!r}, tick_s=0.05), instruments=[]).start()
        print("listening", agent.socket_path)
        agent.stop()
    """
    res = py_as(victim, code)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stdout.split() == ["listening", str(sock)]  # the agent runs, on the socket it was given
    assert victim_secret.read_text() == "victim's data\n"
    assert stat.S_IMODE(os.stat(victim_secret).st_mode) == 0o600


@needs_root
def test_the_output_log_is_never_opened_through_a_planted_symlink(users, sticky: Path, victim_secret: Path) -> None:
    victim, evil = users
    assert py_as(evil, f"import os; os.symlink({str(victim_secret)!r}, {str(sticky / '4242.log')!r})").returncode == 0
    code = f"""
        import os
        from pathlib import Path
        from llmtop.pty_log import _open_log
        path, fd = _open_log(Path({str(sticky)!r}), 4242)
        os.write(fd, b"script output\\n")
        print(path)
    """
    res = py_as(victim, code)
    assert res.returncode == 0, res.stderr
    path = Path(res.stdout.strip())
    assert path.parent != sticky and path.read_text() == "script output\n"  # a private directory instead
    assert victim_secret.read_text() == "victim's data\n"


# --- the socket ---------------------------------------------------------------------------------------


@needs_root
def test_a_client_of_another_user_is_refused_with_a_clear_message(users, shared: Path) -> None:
    from llmtop.agent.runtime.agent import Agent
    from llmtop.agent.runtime.options import options_from_env

    _, evil = users
    sock = shared / "a.sock"
    agent = Agent(options_from_env({}, socket=str(sock), tick_s=0.05), instruments=[]).start()
    try:
        sock.chmod(0o666)  # a mistake (or a forwarded socket): the file no longer keeps others out
        code = f"""
            from llmtop.protocol.stream import Connection
            conn = Connection({str(sock)!r})
            for ev in conn.events():
                print(type(ev).__name__, getattr(ev, "message", ""))
            print("closed", conn.closed_by_peer)
        """
        res = py_as(evil, code)
        assert res.returncode == 0, res.stderr
        assert f"refused: this llmtop agent belongs to uid 0; connections from uid {evil.pw_uid} are not accepted" \
            in res.stdout
        assert "Session" not in res.stdout and res.stdout.rstrip().endswith("closed True")
        # the owner still gets in
        from llmtop.protocol.events import Session
        from llmtop.protocol.stream import Connection

        conn = Connection(sock)
        try:
            assert any(isinstance(ev, Session) for ev in _take(conn, 3))
        finally:
            conn.close()
    finally:
        agent.stop()


def _take(conn, n: int) -> list:
    out = []
    for ev in conn.events():
        out.append(ev)
        if len(out) >= n:
            break
    return out


# --- stale files and unreadable directories ------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    return p.pid


def test_files_of_dead_agents_are_cleaned_on_the_next_start(short_tmp: Path, monkeypatch) -> None:
    from llmtop.agent.runtime.agent import Agent
    from llmtop.agent.runtime.options import options_from_env

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_tmp))
    monkeypatch.delenv("LLMTOP_SOCKET", raising=False)
    d = short_tmp / "llmtop"
    d.mkdir(mode=0o700)
    dead, dead2 = _dead_pid(), _dead_pid()
    for name in (f"{dead}.sock", f"attach-{dead2}.sock"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(d / name))
        s.close()  # the file stays, as after kill -9
    (d / f"{dead}.json").write_text(json.dumps({"pid": dead, "socket": str(d / f"{dead}.sock"),
                                                "argv": ["old.py"], "started": 0}))
    agent = Agent(options_from_env({}, tick_s=0.05), instruments=[]).start()
    try:
        assert agent.socket_path == d / f"{os.getpid()}.sock"
        assert sorted(os.listdir(d)) == sorted([f"{os.getpid()}.sock", f"{os.getpid()}.json"])
    finally:
        agent.stop()
    assert os.listdir(d) == []


@needs_root
def test_watch_of_a_socket_in_an_unreadable_directory_is_a_one_line_error(users, short_tmp: Path) -> None:
    _, evil = users
    short_tmp.chmod(0o700)  # root's, closed to the attacker
    res = run_as(evil, [LLMTOP, "watch", str(short_tmp / "a.sock")])
    assert res.returncode == 2
    assert res.stderr.startswith("llmtop watch: cannot reach ") and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr and res.stdout == ""


# --- a flood of connections that never say hello -------------------------------------------------------

FLOOD_SCRIPT = """
import os, sys, time
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
go = sys.argv[1]
print("ready", os.getpid(), flush=True)
steps = 0
while not os.path.exists(go) or steps < 200:
    x = torch.randn(16, 32)
    loss = model(x).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    steps += 1
    time.sleep(0.005)
print("trained", steps, flush=True)
"""


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_connection_flood_leaves_the_script_its_descriptors(short_tmp: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 4096)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    script, go, sock = short_tmp / "train.py", short_tmp / "go", short_tmp / "a.sock"
    script.write_text(FLOOD_SCRIPT)

    def low_limit() -> None:  # the reproduction's `ulimit -n 1024`, tighter
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.Popen([LLMTOP, "attach", "--headless", str(script), str(go)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=low_limit,
                            env=child_env(LLMTOP_SOCKET=str(sock), LLMTOP_MAX_PENDING="8", LLMTOP_MAX_CLIENTS="32",
                                          # no FLOP count or op profile in the window: their one-time
                                          # memory is not the server's
                                          LLMTOP_FLOPS="0", LLMTOP_OPS_EVERY="0"))
    held: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        assert first[:1] == ["ready"], first
        pid = int(first[1])
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
        base = _fds(pid)
        peak = base
        rss_base = rss_peak = _rss_kb(pid)
        for i in range(1100):  # more than the script's whole descriptor limit
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError, InterruptedError, OSError):
                s.connect(str(sock))
            held.append(s)
            if i % 50 == 0:
                peak = max(peak, _fds(pid))
                rss_peak = max(rss_peak, _rss_kb(pid))
        for _ in range(40):
            peak = max(peak, _fds(pid))
            rss_peak = max(rss_peak, _rss_kb(pid))
            time.sleep(0.05)
        # while the flood is held, a real viewer gets in once the silent handshakes have timed out
        from llmtop.protocol.stream import Connection

        deadline = time.monotonic() + 60
        while True:
            try:
                conn = Connection(sock, timeout=5)
            except (ConnectionError, OSError):
                assert time.monotonic() < deadline, "no viewer got in after the flood"
                time.sleep(0.5)
                continue
            conn.close()
            break
        go.write_text("")
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert "trained" in out and "Too many open files" not in err
        assert peak <= base + 8 + 2, (base, peak)  # at most max_pending accepted, never the flood
        # nor the flood's memory: 1 100 connections with a buffer each would be gigabytes
        assert rss_base and rss_peak - rss_base < 32 * 1024, (rss_base, rss_peak)
    finally:
        for s in held:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
