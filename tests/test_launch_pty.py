"""The `Child` the dashboard drives under `llmtop attach`: pty output as log lines, stop, detach."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmtop.child import Child
from llmtop.launch import child_env as launch_env
from tests.conftest import child_env

PY = sys.executable


@pytest.fixture
def project(short_tmp: Path) -> Path:
    return short_tmp


def spawn_pty(project: Path, code: str) -> Child:
    (project / "out.py").write_text(textwrap.dedent(code))
    sock = project / "a.sock"
    env = launch_env(sock, True, None, base=child_env())
    return Child.spawn([PY, str(project / "out.py")], env, sock, headless=False)


def collect(child: Child, until, timeout: float = 30.0) -> list:
    lines: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines += child.drain_output()
        if until(lines):
            break
        time.sleep(0.02)
    return lines


def screen(lines: list) -> list[tuple[str, str]]:
    """What the dashboard shows for these lines: the viewer's own model applies them."""
    from llmtop.tui.session.model import SessionModel

    model = SessionModel()
    for line in lines:
        model.add_log(line.text, line.stream, line.replace, line.t)
    return [(e.stream, e.text) for e in model.logs]


def test_pty_output_becomes_log_lines_with_progress_updates(project: Path) -> None:
    child = spawn_pty(project, """
        import sys, time
        print("isatty", sys.stdout.isatty(), sys.stderr.isatty())
        print("\\x1b[31mred\\x1b[0m")
        for i in range(3):
            sys.stderr.write(f"\\rbar {i}/3")
            sys.stderr.flush()
            time.sleep(0.3)
        sys.stderr.write("\\rbar 3/3\\n")
        sys.stderr.write("\\r\\n")
        print("done")
    """)
    assert child.socket_path.exists() or child.poll() is not None
    assert child.wait(30) == 0
    lines = collect(child, lambda ls: any(x.text == "done" for x in ls))
    assert {x.stream for x in lines} == {"stdout"}  # one pty: the order across streams is exact
    assert [(x.text, x.replace) for x in lines] == [
        ("isatty True True", False),
        ("\x1b[31mred\x1b[0m", False),  # ANSI codes are kept
        ("bar 0/3", False),  # a progress bar starts a line...
        ("bar 1/3", True),  # ...and each update overwrites it
        ("bar 2/3", True),
        ("bar 3/3", True),
        ("", False),
        ("done", False),
    ]
    assert [text for _, text in screen(lines)] == ["isatty True True", "\x1b[31mred\x1b[0m", "bar 3/3", "", "done"]
    end = child.end_event()
    assert (end.exit_code, end.signal, end.reason) == (0, None, "exit")


def test_tqdm_bar_and_tqdm_write_look_as_in_a_terminal(project: Path) -> None:
    child = spawn_pty(project, """
        import os, sys, time
        from tqdm import tqdm
        print("size", os.get_terminal_size().columns > 0)
        bar = tqdm(total=4, desc="train", file=sys.stderr, mininterval=0)
        for i in range(4):
            time.sleep(0.05)
            bar.update(1)
            if i == 1:
                tqdm.write("halfway")
        bar.close()
        print("end")
    """)
    assert child.wait(30) == 0
    lines = collect(child, lambda ls: any(x.text == "end" for x in ls))
    shown = [text for _, text in screen(lines)]
    assert shown[0] == "size True"  # the pty has the terminal's size, so tqdm draws a real bar
    assert shown[1] == "halfway"  # tqdm.write cleared the bar line and wrote over it
    assert shown[2].startswith("train: 100%|") and "4/4" in shown[2]  # the bar, redrawn, ended full
    assert shown[3:] == ["end"]


def test_unterminated_line_is_shown_then_completed(project: Path) -> None:
    child = spawn_pty(project, """
        import sys, time
        sys.stdout.write("downloading 50%")
        sys.stdout.flush()
        time.sleep(1.0)
        print(" done")
        print("next")
    """)
    lines = collect(child, lambda ls: any(x.text == "next" for x in ls))
    child.wait(30)
    assert [(x.text, x.replace) for x in lines] == [
        ("downloading 50%", False), ("downloading 50% done", True), ("next", False)]
    assert screen(lines) == [("stdout", "downloading 50% done"), ("stdout", "next")]


def test_interrupt_and_stop(project: Path) -> None:
    child = spawn_pty(project, """
        import time
        print("ready", flush=True)
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            print("got SIGINT", flush=True)
            time.sleep(60)   # ignores the first request: stop() must escalate to SIGTERM
    """)
    collect(child, lambda ls: any(x.text == "ready" for x in ls))
    child.stop(grace_s=0.5)
    assert child.wait(30) == -signal.SIGTERM
    assert child.signal == signal.SIGTERM and child.exit_code == 128 + signal.SIGTERM
    end = child.end_event()
    assert (end.signal, end.exit_code, end.reason) == (signal.SIGTERM, None, "signal")


def test_detached_child_outlives_llmtop_and_logs_to_a_file(project: Path) -> None:
    (project / "long.py").write_text(textwrap.dedent("""
        import sys, time
        for i in range(30):
            print(f"line {i}", flush=True)
            sys.stderr.write(f"err {i}\\n"); sys.stderr.flush()
            time.sleep(0.05)
        open("finished", "w").write("ok")
    """))
    driver = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from llmtop.child import Child
        from llmtop.launch import child_env
        sock = Path({str(project / 'a.sock')!r})
        child = Child.spawn([sys.executable, "long.py"], child_env(sock, True, None), sock, headless=False)
        time.sleep(0.3)
        print(child.pid, child.detach(), flush=True)
    """)
    res = subprocess.run([PY, "-c", driver], cwd=project, env=child_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    pid, log = res.stdout.split()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (project / "finished").exists():
        time.sleep(0.05)
    assert (project / "finished").read_text() == "ok"  # it ran to the end after its parent exited
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "line 29" not in Path(log).read_text():
        time.sleep(0.05)
    text = Path(log).read_text()
    assert "line 29" in text and "err 29" in text


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in state  # a zombie waiting for init is dead


def test_sigterm_during_the_dashboard_reaches_the_script_and_ends_llmtop(project: Path) -> None:
    import json
    import os
    import pty
    import threading

    from llmtop.child import _set_winsize
    from tests.conftest import LLMTOP

    (project / "long.py").write_text("import time\nprint('running', flush=True)\ntime.sleep(120)\n")
    sock = project / "a.sock"
    master, slave = pty.openpty()
    _set_winsize(slave)
    proc = subprocess.Popen([LLMTOP, "attach", "long.py"], cwd=project, env=child_env(LLMTOP_SOCKET=str(sock)),
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)

    def drain() -> None:  # a terminal that reads whatever the dashboard draws
        try:
            while os.read(master, 65536):
                pass
        except OSError:
            pass

    threading.Thread(target=drain, daemon=True).start()
    try:
        info = sock.with_suffix(".json")
        deadline = time.monotonic() + 60
        while not info.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        script_pid = json.loads(info.read_text())["pid"]
        time.sleep(1.0)  # let the dashboard start
        proc.send_signal(signal.SIGTERM)
        # it unwinds the dashboard (exit 143) or, if that stalls, dies of the signal itself
        assert proc.wait(30) in (128 + signal.SIGTERM, -signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not _gone(script_pid):
            assert time.monotonic() < deadline, "the script outlived llmtop's SIGTERM"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_the_script_reads_its_terminal_and_llmtop_types_into_it(project: Path) -> None:
    (project / "ask.py").write_text(textwrap.dedent("""
        import sys
        print("tty", sys.stdin.isatty(), flush=True)
        name = input("name? ")
        print("hello", name, flush=True)
    """))
    sock = project / "a.sock"
    child = Child.spawn([PY, str(project / "ask.py")], launch_env(sock, True, None, base=child_env()), sock,
                        headless=False, pty_stdin=True)
    try:
        deadline = time.monotonic() + 30
        while not child.waiting_for_input():  # blocked in input(): no EOFError, as in a terminal
            assert child.poll() is None and time.monotonic() < deadline, child.drain_output()
            time.sleep(0.05)
        child.send_input("bob\n")
        assert child.wait(30) == 0
        lines = collect(child, lambda ls: any(x.text == "hello bob" for x in ls))
        assert [text for _, text in screen(lines)] == ["tty True", "name? bob", "hello bob"]
    finally:
        child.send_signal(signal.SIGKILL)
        child.close()


def test_output_after_the_dashboard_is_the_tail_and_the_log_when_long(project: Path, capfd) -> None:
    from llmtop.after_dashboard import print_output_after, summary_line

    child = spawn_pty(project, """
        import sys
        for i in range(30):
            print(f"line {i}")
        sys.stdout.write("last, unterminated")
        sys.exit(4)
    """)
    assert child.wait(30) == 4
    deadline = time.monotonic() + 10
    while not child.output_done and time.monotonic() < deadline:
        time.sleep(0.05)
    log = child.log_path
    assert log is not None and log.parent == project
    print_output_after(child, keep_log=False, max_lines=10)
    out = capfd.readouterr().out.replace("\r\n", "\n")
    assert out.splitlines() == [f"llmtop: the first 21 lines of output are in {log}",
                                *[f"line {i}" for i in range(21, 30)], "last, unterminated"]
    assert log.exists()  # only the tail was shown: the full output stays
    line = summary_line(child, None)
    assert line.startswith("llmtop: out.py exited with status 4 after ") and f"full output: {log}" in line
    child.close()


def test_short_output_is_printed_whole_and_its_log_removed(project: Path, capfd) -> None:
    from llmtop.after_dashboard import print_output_after

    child = spawn_pty(project, """
        print("one")
        print("two")
    """)
    assert child.wait(30) == 0
    log = child.log_path
    print_output_after(child, keep_log=False)
    assert capfd.readouterr().out.replace("\r\n", "\n") == "one\ntwo\n"
    assert log is not None and not log.exists() and child.log_path is None
    child.close()


def test_sigkill_of_the_dashboard_leaves_the_script_running_listed_and_watchable(short_tmp: Path,
                                                                                  monkeypatch) -> None:
    import json
    import os
    import pty
    import threading

    from llmtop.protocol.paths import resolve_target
    from llmtop.tui.session.logtail import LogTail, detached_log_path

    from llmtop.child import _set_winsize
    from tests.conftest import LLMTOP

    project = short_tmp
    (project / "long.py").write_text(textwrap.dedent("""
        import os, time
        print("running", flush=True)
        while not os.path.exists("go"):
            time.sleep(0.02)
        for i in range(200):
            print(f"after {i}", flush=True)   # a print with no viewer left used to raise EIO here
        open("finished", "w").write("ok")
    """))
    env = child_env(XDG_RUNTIME_DIR=str(project))
    env.pop("LLMTOP_SOCKET", None)
    master, slave = pty.openpty()
    _set_winsize(slave)
    proc = subprocess.Popen([LLMTOP, "attach", "long.py"], cwd=project, env=env,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)

    def drain() -> None:
        try:
            while os.read(master, 65536):
                pass
        except OSError:
            pass

    threading.Thread(target=drain, daemon=True).start()
    sockdir = project / "llmtop"
    script_pid = None
    try:
        deadline = time.monotonic() + 60
        while script_pid is None:
            assert proc.poll() is None and time.monotonic() < deadline
            infos = list(sockdir.glob("*.json")) if sockdir.is_dir() else []
            if infos:
                script_pid = json.loads(infos[0].read_text())["pid"]
            time.sleep(0.05)
        log = sockdir / f"{script_pid}.log"
        while "running" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no handler runs, no detach is chosen
        assert proc.wait(30) == -signal.SIGKILL
        time.sleep(0.5)
        assert not _gone(script_pid), "the script died with its viewer"
        # listed by `llmtop ls`, and `llmtop watch PID` finds its socket and its output
        listed = subprocess.run([LLMTOP, "ls", "--json"], env=env, capture_output=True, text=True, timeout=30)
        assert any(json.loads(x)["pid"] == script_pid for x in listed.stdout.splitlines()), listed
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(project))
        assert resolve_target(str(script_pid)).parent == sockdir
        (project / "go").write_text("")
        deadline = time.monotonic() + 60
        while not (project / "finished").exists():
            assert not _gone(script_pid), "the script died with its viewer"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        while "after 199" not in log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lines = LogTail(detached_log_path(sockdir / f"{script_pid}.sock", script_pid)).read()
        assert lines[0].rstrip("\r") == "running" and lines[-1].rstrip("\r") == "after 199"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        if script_pid is not None and not _gone(script_pid):
            os.kill(script_pid, signal.SIGKILL)
