"""The `llmtop` command dispatcher and `llmtop ls`, as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

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
