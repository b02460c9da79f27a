"""The dashboard in a real terminal: tmux runs `llmtop attach` on the demo (and `llmtop watch` on a
headless run), `send-keys` walks the views, `capture-pane` reads what a person would see."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import LLMTOP, ROOT, child_env

pytestmark = [pytest.mark.tmux, pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")]

DEMO = ROOT / "examples" / "train_tiny_gpt.py"
SCRIPT = ROOT / "tests" / "scripts" / "tui_train.py"


class Tmux:
    """One private tmux server (its own -L socket) with one session of a fixed size."""

    def __init__(self, command: str, env: dict[str, str], width: int = 120, height: int = 40) -> None:
        self.server = f"llmtop-test-{uuid.uuid4().hex[:8]}"
        self.env = env
        # the pane stays after the program ends, so a failure shows what it printed last (a traceback)
        self._tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), command,
                   ";", "set-option", "-t", "t", "remain-on-exit", "on")

    def _tmux(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-L", self.server, *args], env=self.env, capture_output=True, text=True,
                             timeout=20)
        return out.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def history(self) -> str:
        """The screen and every line scrolled above it."""
        return self._tmux("capture-pane", "-p", "-S", "-", "-t", "t").rstrip("\n")

    def keys(self, *keys: str) -> None:
        """Send keys one at a time, with a person's pause: a lone Escape followed at once by more
        bytes reads as an escape sequence in any terminal."""
        if keys and keys[0] == "-l":
            self._tmux("send-keys", "-t", "t", *keys)
        else:
            for key in keys:
                self._tmux("send-keys", "-t", "t", key)
                time.sleep(0.3)
        time.sleep(0.2)

    def alive(self) -> bool:
        """Whether the program in the pane still runs (the pane itself stays: remain-on-exit)."""
        return self._tmux("display-message", "-p", "-t", "t", "#{pane_dead}").strip() == "0"

    def wait(self, predicate: Callable[[str], bool], timeout: float = 60.0, what: str = "") -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.25)
        if not self.alive():  # what it printed last has scrolled above the "Pane is dead" line
            screen = self.history()
            what = f"{what} (the program had ended)"
        raise AssertionError(f"timed out waiting for {what or predicate}; the screen was:\n{screen}")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], env=self.env, capture_output=True)


def step_of(screen: str) -> int:
    found = re.search(r"step (\d+)", screen.splitlines()[0] if screen else "")
    return int(found.group(1)) if found else -1


def env_for(sock: Path) -> dict[str, str]:
    env = child_env(LLMTOP_SOCKET=str(sock), TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    env.pop("TMUX", None)
    return env


@pytest.mark.timeout(240)
def test_attach_demo_walks_every_view(sock_path: Path) -> None:
    env = env_for(sock_path)
    tmux = Tmux(f"cd {ROOT} && {LLMTOP} attach {DEMO} --steps 600 --log-every 5", env)
    try:
        first = tmux.wait(lambda s: step_of(s) >= 3, 150, "the step counter")
        assert "train_tiny_gpt.py" in first and "running" in first
        assert "Overview" in first and "Diagnoses" in first and "step ms" in first

        tmux.keys("2")
        layers = tmux.wait(lambda s: "modules ·" in s and "h.0" in s and "GPT2Block" in s, 30, "the layer tree")
        assert "GPT2LMHeadModel" in layers and "fwd ms" in layers
        tmux.keys("x")  # expand to the hottest layer: its full path shows in the info line
        tmux.wait(lambda s: re.search(r"▸ (transformer\.h\.\d|lm_head)", s) is not None, 20, "a layer path")
        tmux.keys("/")
        tmux.wait(lambda s: "filter modules by name" in s, 20, "the filter box")
        tmux.keys("-l", "h.0")
        filtered = tmux.wait(lambda s: "filter “h.0”" in s, 20, "the filter")
        assert "attn" in filtered and "h.1 " not in filtered
        tmux.keys("Escape", "Escape")
        tmux.wait(lambda s: "filter “h.0”" not in s, 20, "the filter to clear")

        tmux.keys("3")
        tmux.wait(lambda s: "RSS" in s and "Top allocating layers" in s, 20, "the memory view")
        tmux.keys("4")
        tmux.wait(lambda s: "category" in s or "no spans yet" in s, 20, "the spans view")
        tmux.keys("5")
        tmux.wait(lambda s: "no op profile yet" in s or "profile of step" in s, 20, "the ops view")
        tmux.keys("6")
        tmux.wait(lambda s: "TTFT" in s, 20, "the inference view")
        tmux.keys("7")
        logs = tmux.wait(lambda s: "loss" in s and "lines" in s, 30, "the script's output")
        assert "\x1b" not in logs

        before = step_of(tmux.screen())
        tmux.keys("1")
        tmux.wait(lambda s: step_of(s) > before, 60, "the step counter to move")
        tmux.keys("?")
        tmux.wait(lambda s: "llmtop keys" in s, 20, "the help screen")
        tmux.keys("Escape")
        tmux.keys("q")
        tmux.wait(lambda s: "is still running" in s, 20, "the quit dialog")
        tmux.keys("s")  # stop the script: SIGINT, then SIGTERM after the grace period
        deadline = time.monotonic() + 30
        while tmux.alive() and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not tmux.alive()
    finally:
        tmux.kill()


@pytest.mark.timeout(120)
def test_watch_shows_connection_lost_when_the_agent_is_killed(sock_path: Path) -> None:
    env = env_for(sock_path)
    proc = subprocess.Popen([LLMTOP, "attach", "--headless", str(SCRIPT), "--steps", "5000", "--sleep", "0.05"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmux = None
    try:
        deadline = time.monotonic() + 60
        while not sock_path.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        tmux = Tmux(f"cd {ROOT} && {LLMTOP} watch {sock_path}", env, 100, 30)
        tmux.wait(lambda s: step_of(s) >= 3 and "live" in s, 60, "live steps")
        tmux.keys("2")
        tmux.wait(lambda s: "blocks.0" in s, 20, "the layer tree")
        shown = re.search(r"pid (\d+)", tmux.screen())  # one capture: the screen changes between two
        pid = int(shown.group(1)) if shown else None
        # the agent lives in the script's process (the headless launcher is its parent)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        target = pid or int(children[0])
        os.kill(target, signal.SIGKILL)
        lost = tmux.wait(lambda s: "connection lost" in s, 20, "connection lost")
        assert "blocks.0" in lost and step_of(lost) >= 3  # the last state stays on screen
        tmux.keys("q")
        deadline = time.monotonic() + 10
        while tmux.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not tmux.alive()
    finally:
        if tmux is not None:
            tmux.kill()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


ASKING = """
import sys, time
for i in range(5):
    print(f"line {i}", flush=True)
for i in range(4):
    sys.stderr.write(f"\\rbar {i}/3")
    sys.stderr.flush()
    time.sleep(0.1)
sys.stderr.write("\\n")
name = input("name? ")
print(f"hello {name}", flush=True)
sys.exit(3)
"""


@pytest.mark.timeout(180)
def test_input_in_the_dashboard_and_the_output_left_after_it(short_tmp: Path) -> None:
    """The script's input() is answered from the dashboard; after `q` the terminal holds the
    script's output as `python script.py` would have left it, then one status line."""
    script = short_tmp / "ask.py"
    script.write_text(ASKING)
    env = env_for(short_tmp / "a.sock")
    tmux = Tmux(f"cd {short_tmp} && {LLMTOP} attach ask.py; echo rc=$?; sleep 120", env, 100, 30)
    try:
        tmux.wait(lambda s: "waiting for input on stdin" in s and "name?" in s, 90, "the stdin prompt")
        tmux.keys("-l", "bob")
        tmux.keys("Enter")
        tmux.wait(lambda s: "ended (exit 3)" in s, 60, "the script to end")
        tmux.keys("q")
        after = tmux.wait(lambda s: "rc=3" in s, 30, "the shell again")
        rows = [row.rstrip() for row in after.splitlines() if row.strip()]
        expected = ["line 0", "line 1", "line 2", "line 3", "line 4", "bar 3/3", "name? bob", "hello bob"]
        assert rows[: len(expected)] == expected, after
        status = rows[len(expected)]
        assert status.startswith("llmtop: ask.py exited with status 3 after "), after
        assert rows[len(expected) + 1] == "rc=3"
    finally:
        tmux.kill()
