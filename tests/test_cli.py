"""The `llmtop` command dispatcher and `llmtop ls`, as real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import LLMTOP, child_env


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LLMTOP, *args], capture_output=True, text=True, env=child_env(**env), timeout=60)


def test_usage_and_unknown_command() -> None:
    out = run()
    assert out.returncode == 2 and "usage: llmtop COMMAND" in out.stdout
    assert "attach" in out.stdout and "graph" in out.stdout
    bad = run("frobnicate")
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr
    assert run("--version").stdout.startswith("llmtop ")


def test_ls_lists_only_live_agents(short_tmp: Path) -> None:
    runtime = short_tmp / "rt"
    (runtime / "llmtop").mkdir(parents=True)
    live = subprocess.Popen(["sleep", "30"])
    try:
        for pid, name in ((live.pid, "live"), (999_999_99, "dead")):
            sock = runtime / "llmtop" / f"{pid}.sock"
            sock.touch()
            sock.with_suffix(".json").write_text(
                json.dumps({"pid": pid, "socket": str(sock), "argv": [f"{name}.py"], "started": time.time() - 65})
            )
        out = run("ls", XDG_RUNTIME_DIR=str(runtime))
        assert out.returncode == 0
        assert "live.py" in out.stdout and str(live.pid) in out.stdout and "1:0" in out.stdout
        assert "dead.py" not in out.stdout
        as_json = [json.loads(line) for line in run("ls", "--json", XDG_RUNTIME_DIR=str(runtime)).stdout.splitlines()]
        assert [a["pid"] for a in as_json] == [live.pid]
    finally:
        live.kill()
        live.wait()


def test_ls_with_no_agents(short_tmp: Path) -> None:
    out = run("ls", XDG_RUNTIME_DIR=str(short_tmp))
    assert out.returncode == 0 and "no live llmtop agents" in out.stdout
    assert os.fspath(short_tmp) in out.stdout


# --- Unix manners: help with examples, closed pipes, completion ----------------------------------------


def test_every_command_has_examples_and_exit_status_in_its_help() -> None:
    from llmtop.cli import COMMANDS, build_parser

    for name in COMMANDS:
        text = build_parser(name).format_help()
        assert "examples:" in text and f"llmtop {name} " in text.split("examples:", 1)[1], name
        assert "exit status: 0 ok, 1 a failed check, 2 usage or unreadable input" in text, name
    out = run("report", "--help")
    assert out.returncode == 0 and "llmtop report run.lrec --json" in out.stdout
    assert "exit status" in run("--help").stdout


def closed_pipe(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run with standard output a pipe whose reader is already gone, as `| head` leaves it."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([LLMTOP, *args], stdout=w, stderr=subprocess.PIPE, env=child_env(), timeout=120)
    finally:
        os.close(w)


def test_closed_pipes_end_quietly(tmp_path: Path) -> None:
    from tests.test_recording import run_events, write

    rec = tmp_path / "run.lrec"
    write(rec, run_events(30))
    for args in (("report", str(rec)), ("report", str(rec), "--json"), ("export", str(rec), "-f", "csv"),
                 ("completion", "bash"), ("--help",), ("ls",)):
        done = closed_pipe(*args)
        assert done.stderr == b"", (args, done.stderr.decode()[-500:])
        assert done.returncode == 141, args  # 128 + SIGPIPE, as a shell reports for `cmd | head`
    done = closed_pipe("report", "--help")  # argparse itself ignores a failed write of its help
    assert (done.returncode, done.stderr) == (0, b"")


def test_report_through_head_in_a_real_shell(tmp_path: Path) -> None:
    from tests.test_recording import run_events, write

    rec = tmp_path / "run.lrec"
    write(rec, run_events(30))
    done = subprocess.run(["bash", "-c", f"'{LLMTOP}' report '{rec}' --json | head -1"], capture_output=True,
                          text=True, env=child_env(), timeout=60)
    assert done.stdout == "{\n" and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_bash_completion_is_generated_from_the_parsers() -> None:
    from llmtop.cli import COMMANDS
    from llmtop.completion import commands

    script = run("completion", "bash").stdout

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        prog = f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _llmtop; printf "%s\\n" "${{COMPREPLY[@]}}"'
        return subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=30).stdout.split()

    assert complete("llmtop", "rep") == ["replay", "report"]
    assert set(complete("llmtop", "")) >= set(COMMANDS)
    assert complete("llmtop", "export", "run.lrec", "--format", "") == ["chrome", "csv", "json", "html"]
    assert complete("llmtop", "report", "--j") == ["--json"]
    # every option of every command completes
    for cmd in commands():
        offered = set(complete("llmtop", cmd.name, "-"))
        assert offered == {f for o in cmd.options for f in o.flags if f.startswith("-")}, cmd.name


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_completion(shell: str) -> None:
    from llmtop.completion import commands

    out = run("completion", shell)
    assert out.returncode == 0
    for cmd in commands():
        assert cmd.name in out.stdout
        for o in cmd.options:
            long = [f for f in o.flags if f.startswith("--")]
            if long:
                needle = long[0] if shell == "zsh" else f"-l {long[0][2:]}"
                assert needle in out.stdout, (cmd.name, long[0])
    binary = shutil.which(shell)
    if binary is None:
        pytest.skip(f"{shell} is not installed: the script's syntax is not checked")
    check = subprocess.run([binary, "-n"], input=out.stdout, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
