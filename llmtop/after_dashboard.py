"""What ``llmtop attach`` prints once the dashboard closes: the script's output as ``python script.py``
would have left it on the terminal (all of it when it fits the scrollback, else the tail and the path of
the full log), then one status line: how the script ended, how long it ran, and where it was recorded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from llmtop.child import OUTPUT_SETTLE_S, Child

SCROLLBACK_LINES = 2000  # after the dashboard, at most this many lines are printed back (tmux's default)


def _script_name(child: Child) -> str:
    return os.path.basename(next((a for a in child.argv if a.endswith(".py")), child.argv[0]))


def print_output_after(child: Child, keep_log: bool, max_lines: int = SCROLLBACK_LINES) -> None:
    """Leave the terminal as ``python script.py`` would have: the script's output as it wrote it
    (all of it when it fits the scrollback, else the tail and the path of the full log). The log
    of a finished script that was printed in full is removed; otherwise it is kept."""
    path = child.log_path
    if path is None:
        return
    if child.holder is not None and child.poll() is not None:
        try:
            child.holder.wait(OUTPUT_SETTLE_S)  # the last bytes the script wrote reach the file
        except subprocess.TimeoutExpired:
            pass
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return
    parts = data.split(b"\n")
    trailing = parts[-1] == b""
    body = parts[:-1] if trailing else parts
    lines = len(body)
    cut = lines > max_lines
    if cut:
        data = b"\n".join(body[-max_lines:]) + (b"\n" if trailing else b"")
    out = sys.stdout
    try:
        out.flush()
        if cut:
            print(f"llmtop: the first {lines - max_lines} lines of output are in {path}", file=out, flush=True)
        out.buffer.write(data)
        if data and not data.endswith(b"\n"):
            out.buffer.write(b"\n")
        out.flush()
    except (OSError, ValueError):
        return
    if not cut and not keep_log:
        try:
            path.unlink()
            child.log_path = None
        except OSError:
            pass


def summary_line(child: Child, record: str | None) -> str:
    """One line after the output: how the script ended, how long it ran, and where it was recorded."""
    ended = child.ended_at or time.time()
    took = _duration(max(0.0, ended - child.started))
    if child.signal is not None:
        try:
            name = signal.Signals(child.signal).name
        except ValueError:
            name = f"signal {child.signal}"
        how = f"was killed by {name} (exit status {child.exit_code})"
    else:
        how = f"exited with status {child.exit_code}"
    text = f"llmtop: {_script_name(child)} {how} after {took}"
    if record:
        text += f"; recording: {os.path.abspath(record)}"
    if child.log_path is not None:
        text += f"; full output: {child.log_path}"
    return text


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
