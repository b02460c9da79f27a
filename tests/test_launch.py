"""`llmtop attach` runs the script exactly as `python` would: each semantic compared with plain python."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import LLMTOP, child_env

PY = sys.executable

SEMANTICS = textwrap.dedent("""
    import json, os, sys
    import helper                      # a sibling module, found through sys.path[0]
    import llmtop.agent
    data = {
        "argv": sys.argv, "file": __file__, "name": __name__, "path0": sys.path[0],
        "stdin": sys.stdin.read(), "helper": helper.VALUE, "cwd": os.getcwd(),
        "bootstrap_on_path": any("bootstrap" in p for p in sys.path),
    }
    print(json.dumps(data))
    print("AGENT", llmtop.agent.is_running(), file=sys.stderr)
    if __name__ == "__main__":
        sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 0)
""")


@pytest.fixture
def project(short_tmp: Path) -> Path:
    (short_tmp / "helper.py").write_text("VALUE = 42\n")
    (short_tmp / "main.py").write_text(SEMANTICS)
    pkg = short_tmp / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sib.py").write_text("WHO = 'sibling'\n")
    (pkg / "mod.py").write_text(textwrap.dedent("""
        import sys
        from . import sib                  # a relative import inside a package run with -m
        print(__name__, __package__, sib.WHO, sys.argv[1:], __file__.endswith("mod.py"))
    """))
    (short_tmp / "boom.py").write_text(textwrap.dedent("""
        def inner():
            return 1 / 0

        def outer():
            inner()

        print("before", flush=True)
        outer()
    """))
    return short_tmp


def run_both(args: list[str], cwd: Path, sock: Path, stdin: str = "", headless: bool = True,
             attach_args: list[str] | None = None) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    env = child_env(LLMTOP_SOCKET=str(sock))
    env.pop("LLMTOP", None)
    plain = subprocess.run([PY, *args], cwd=cwd, input=stdin, capture_output=True, text=True, env=env, timeout=60)
    attach = [LLMTOP, "attach", *(["--headless"] if headless else []), *(attach_args or []), *args]
    under = subprocess.run(attach, cwd=cwd, input=stdin, capture_output=True, text=True, env=env, timeout=60)
    return plain, under


def test_argv_file_main_path0_stdin_sibling_import_and_exit_code(project: Path) -> None:
    plain, under = run_both(["main.py", "3", "--lr", "0.1", "-m", "x"], project, project / "a.sock", stdin="piped\ntext")
    assert plain.returncode == under.returncode == 3
    assert json.loads(under.stdout) == json.loads(plain.stdout)
    data = json.loads(under.stdout)
    assert data["argv"] == ["main.py", "3", "--lr", "0.1", "-m", "x"]
    assert data["name"] == "__main__" and data["file"] == str(project / "main.py")
    assert data["path0"] == str(project) and data["stdin"] == "piped\ntext" and data["helper"] == 42
    assert data["bootstrap_on_path"] is False  # the bootstrap folder is removed from sys.path
    assert "AGENT True" in under.stderr and "AGENT False" in plain.stderr


def test_script_given_after_double_dash_and_by_absolute_path(project: Path) -> None:
    plain, under = run_both([str(project / "main.py"), "0"], Path("/"), project / "a.sock",
                            attach_args=["--"])
    assert under.returncode == plain.returncode == 0
    assert json.loads(under.stdout) == json.loads(plain.stdout)
    assert "AGENT True" in under.stderr


def test_uncaught_exception_traceback_and_code_are_pythons(project: Path) -> None:
    plain, under = run_both(["boom.py"], project, project / "a.sock")
    assert plain.returncode == under.returncode == 1
    assert under.stdout == plain.stdout == "before\n"
    assert under.stderr == plain.stderr  # identical text, frame by frame
    assert under.stderr.startswith("Traceback (most recent call last):")
    assert under.stderr.rstrip().endswith("ZeroDivisionError: division by zero")


def test_missing_script_gets_pythons_error_and_code(project: Path) -> None:
    plain, under = run_both(["nope.py"], project, project / "a.sock")
    assert plain.returncode == under.returncode == 2
    assert under.stderr == plain.stderr
    assert "can't open file" in under.stderr


def test_dash_m_runs_a_module_with_relative_imports(project: Path) -> None:
    plain, under = run_both(["-m", "pkg.mod", "a", "--flag"], project, project / "a.sock")
    assert plain.returncode == under.returncode == 0
    assert under.stdout == plain.stdout == "__main__ pkg sibling ['a', '--flag'] True\n"
    under_m = subprocess.run([LLMTOP, "attach", "--headless", "-m", "pkg.mod", "a", "--flag"], cwd=project,
                             capture_output=True, text=True, env=child_env(LLMTOP_SOCKET=str(project / "a.sock")),
                             timeout=60)
    assert under_m.stdout == plain.stdout


def test_any_command_after_double_dash(project: Path) -> None:
    sock = project / "a.sock"
    cmd = f"{PY} main.py 0 </dev/null; exit 5"
    under = subprocess.run([LLMTOP, "attach", "--headless", "--", "sh", "-c", cmd], cwd=project,
                           capture_output=True, text=True, env=child_env(LLMTOP_SOCKET=str(sock)), timeout=60)
    assert under.returncode == 5
    assert "AGENT True" in under.stderr  # the Python grandchild got the agent through the bootstrap
    assert json.loads(under.stdout)["argv"] == ["main.py", "0"]


def test_nothing_to_run_is_a_one_line_error() -> None:
    res = subprocess.run([LLMTOP, "attach", "--headless"], capture_output=True, text=True, env=child_env(),
                         timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("llmtop attach: nothing to run") and res.stderr.count("\n") == 1


def test_killed_by_a_signal_llmtop_dies_of_the_same_signal(project: Path) -> None:
    (project / "kill.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n")
    plain, under = run_both(["kill.py"], project, project / "a.sock")
    assert plain.returncode == under.returncode == -signal.SIGTERM


def test_sigint_to_llmtop_is_forwarded_and_exit_matches_python(project: Path) -> None:
    (project / "wait.py").write_text(textwrap.dedent("""
        import sys, time
        try:  # "ready" inside the try: a SIGINT right after it must still be caught here
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
    """))
    env = child_env(LLMTOP_SOCKET=str(project / "a.sock"))
    proc = subprocess.Popen([LLMTOP, "attach", "--headless", "wait.py"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)  # only llmtop gets it (no terminal): it must pass it on
    out, _ = proc.communicate(timeout=30)
    assert out == "interrupted\n" and proc.returncode == 130


def test_sitecustomize_already_on_the_path_still_runs(project: Path) -> None:
    other = project / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['OTHER_SITECUSTOMIZE'] = 'ran'\n")
    (project / "check.py").write_text(
        "import os, sys, llmtop.agent\nprint(os.environ.get('OTHER_SITECUSTOMIZE'), llmtop.agent.is_running(),"
        " sys.modules['sitecustomize'].__file__)\n")
    env = child_env(LLMTOP_SOCKET=str(project / "a.sock"), PYTHONPATH=str(other))
    res = subprocess.run([LLMTOP, "attach", "--headless", "check.py"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ran", "True", str(other / "sitecustomize.py")]


def test_llmtop_env_alone_starts_the_agent(project: Path) -> None:
    (project / "plain.py").write_text("import llmtop.agent\nprint(llmtop.agent.is_running())\n")
    env = child_env(LLMTOP="1", LLMTOP_SOCKET=str(project / "x.sock"))
    res = subprocess.run([PY, "plain.py"], cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout) == (0, "True\n"), res.stderr
    env["LLMTOP"] = "0"
    res = subprocess.run([PY, "plain.py"], cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert res.stdout == "False\n"


def test_python_children_of_the_script_get_no_agent_and_never_collide(project: Path) -> None:
    (project / "parent.py").write_text(textwrap.dedent(f"""
        import subprocess
        from llmtop.agent.runtime import core
        auto = "import llmtop.agent; print(llmtop.agent.is_running())"
        started = "import llmtop.agent; print(llmtop.agent.start().socket_path)"
        print(core.ACTIVE.socket_path)
        for code in (auto, started):
            print(subprocess.run([{PY!r}, "-c", code], capture_output=True, text=True).stdout.strip())
    """))
    sock = project / "a.sock"
    res = subprocess.run([LLMTOP, "attach", "--headless", "parent.py"], cwd=project,
                         env=child_env(LLMTOP_SOCKET=str(sock)), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    mine, auto, started = res.stdout.split()
    assert mine == str(sock)
    assert auto == "False"  # a helper process of the watched script pays for no agent
    # one started in code gets a socket of its own beside the script's
    assert started != mine and Path(started).parent == project and Path(started).name.endswith(".sock")


# --- the exit status in a recording (the agent cannot know it; attach adds it) ----------------------


def record_and_report(project: Path, script: str) -> tuple[subprocess.CompletedProcess, list, str]:
    from llmtop.protocol.events import End
    from llmtop.protocol.recording import RecordingReader

    rec = project / "run.lrec"
    env = child_env(LLMTOP_SOCKET=str(project / "a.sock"))
    under = subprocess.run([LLMTOP, "attach", "--headless", "--record", str(rec), script], cwd=project,
                           capture_output=True, text=True, env=env, timeout=60)
    with RecordingReader(rec) as reader:
        ends = [e for e in reader.events() if isinstance(e, End)]
        assert reader.last_end() == ends[-1]
    report = subprocess.run([LLMTOP, "report", str(rec)], capture_output=True, text=True, env=env, timeout=60)
    assert report.returncode == 0, report.stderr
    return under, ends, report.stdout


def test_recording_ends_with_the_scripts_exit_code(project: Path) -> None:
    under, ends, report = record_and_report(project, "main.py")  # main.py 0: exit 0
    assert under.returncode == 0 and [(e.exit_code, e.signal) for e in ends] == [(0, None)]
    (project / "three.py").write_text("import sys\nprint('bye')\nsys.exit(3)\n")
    under, ends, report = record_and_report(project, "three.py")
    assert (under.returncode, under.stdout) == (3, "bye\n")
    assert len(ends) == 1 and (ends[0].exit_code, ends[0].signal, ends[0].reason) == (3, None, "exit")
    assert "exit: exit 3" in report


def test_recording_of_an_uncaught_exception_keeps_the_traceback(project: Path) -> None:
    under, ends, report = record_and_report(project, "boom.py")
    assert under.returncode == 1
    (end,) = ends
    assert (end.exit_code, end.reason) == (1, "exception")
    assert end.traceback is not None and "ZeroDivisionError: division by zero" in end.traceback
    assert "exit: exit 1" in report


def test_recording_of_a_script_killed_by_sigkill(project: Path) -> None:
    (project / "k9.py").write_text("import os, signal, time\ntime.sleep(0.2)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    under, ends, report = record_and_report(project, "k9.py")
    assert under.returncode == 128 + signal.SIGKILL  # SIGKILL cannot be re-raised on llmtop itself
    (end,) = ends
    assert (end.exit_code, end.signal, end.reason) == (None, signal.SIGKILL, "signal")
    assert f"killed by signal {int(signal.SIGKILL)}" in report


def test_recording_report_shows_the_torch_version_learnt_after_start(project: Path) -> None:
    import importlib.metadata

    torch_version = importlib.metadata.version("torch")
    (project / "uses_torch.py").write_text("import torch\nprint(torch.__version__)\n")
    under, ends, report = record_and_report(project, "uses_torch.py")  # the header predates `import torch`
    assert under.returncode == 0 and under.stdout.strip().startswith(torch_version.split("+")[0])
    assert f"torch {under.stdout.strip()}" in report
