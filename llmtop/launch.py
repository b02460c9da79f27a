"""`llmtop attach`: run a script (or any command) with the agent inside, and watch it.

The child is the real ``python script.py args…`` (or ``python -m module``, or any command), with
``agent/bootstrap`` first on ``PYTHONPATH`` so its ``sitecustomize`` starts the agent. Python's own
semantics hold: argv, ``__main__``, ``__file__``, ``sys.path[0]``, stdin, ``sys.exit(n)``,
tracebacks and the error for a missing script are exactly python's, and llmtop exits with the
child's code (or dies of the child's signal).

Headless, the child shares llmtop's terminal and process group. With the dashboard, the child's
stdin, stdout and stderr are a pty (progress bars and ``input()`` behave as in a terminal) and it runs
in its own session, so closing llmtop's terminal never sends it SIGHUP. The pty's reading end
belongs from the start to a tiny *holder* process (its own session too) that copies the output into
``<socket dir>/<pid>.log``; the dashboard follows that file. So the script outlives its viewer in
every mode: `q` → detach, a closed terminal or even ``kill -9`` of llmtop leave it running, its
output still going to the log that ``llmtop watch`` shows. Both streams share one pty, so their
interleaving is exactly what a terminal would show. When the dashboard closes, the launcher prints
the script's output as ``python script.py`` would have left it, then one status line.

This module is the command: its arguments, the child's command line and environment, the socket,
signals and the exit status. The child is in ``child.py``; the holder, its log and the line splitter
in ``pty_log.py``; what is printed after the dashboard in ``after_dashboard.py``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from llmtop.after_dashboard import _script_name, print_output_after, summary_line
from llmtop.child import Child
from llmtop.protocol.paths import private_socket_dir, socket_is_live

HELP = "Run a script (or any command after --) with the agent inside and open the dashboard on it."

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--headless", action="store_true",
                        help="no dashboard: the script keeps the terminal, the socket stays open for watchers")
    parser.add_argument("--record", metavar="FILE", help="record the session to FILE (written by the agent)")
    parser.add_argument("--refresh", metavar="HZ", type=float, default=4.0, help="dashboard refresh rate")
    parser.add_argument("--window", metavar="S", type=float, default=120.0,
                        help="seconds of history in the dashboard's charts")
    parser.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE",
                        help="run a library module as a script, like python -m")
    parser.add_argument("target", nargs=argparse.REMAINDER, metavar="script.py args… | -- CMD args…",
                        help="the script and its arguments, or any command after --")


# --- building the child's command line and environment ---------------------------------------------


def bootstrap_dir() -> Path:
    """The folder whose sitecustomize starts the agent (works for editable and regular installs)."""
    import importlib.util

    spec = importlib.util.find_spec("llmtop.agent.runtime.bootstrap")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llmtop's agent bootstrap is missing from this installation")
    return Path(list(spec.submodule_search_locations)[0])


def build_command(args: argparse.Namespace) -> tuple[list[str], bool]:
    """The child's argv, and whether it is a Python script/module we start ourselves (vs any command)."""
    if args.module:
        return [sys.executable, "-m", *args.module], True
    target = list(args.target)
    if target and target[0] == "--":
        target = target[1:]
    if not target:
        raise ValueError("nothing to run: give a script (llmtop attach train.py), -m module, or -- CMD")
    first = target[0]
    if first.endswith(".py") or first.endswith(".pyw") or (os.path.isfile(first) and not os.access(first, os.X_OK)):
        return [sys.executable, *target], True
    return target, False


def child_env(sock: Path, python_child: bool, record: str | None,
              base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    boot = str(bootstrap_dir())
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = boot + (os.pathsep + old if old else "")
    env["LLMTOP_SOCKET"] = str(sock)
    # Every agent of this process tree names us in its info file: `llmtop ls` and `watch` find the
    # ranks that one `llmtop attach -- torchrun …` started.
    env["LLMTOP_ATTACH"] = str(os.getpid())
    if python_child:
        # Only our direct child claims LLMTOP_SOCKET; Python processes it starts get pid sockets.
        env["LLMTOP_PARENT_PID"] = str(os.getpid())
    else:
        env.pop("LLMTOP_PARENT_PID", None)
    if record:
        env["LLMTOP_RECORD"] = os.path.abspath(record)
    return env


def choose_socket() -> Path:
    chosen = os.environ.get("LLMTOP_SOCKET")
    if chosen:
        return Path(chosen)
    return private_socket_dir() / f"attach-{os.getpid()}.sock"


def _clear_stale(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse a live one with a one-line error."""
    if not (path.exists() or path.is_symlink()):
        return
    if socket_is_live(path):
        raise ValueError(f"{path} belongs to a running agent; unset LLMTOP_SOCKET or pick another path")
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot remove the stale {path}: {exc.strerror or exc}") from None


def _terminal_delivers_to_child() -> bool:
    """True if llmtop is in its terminal's foreground group: then a terminal SIGINT/SIGHUP already
    reached the child (same group), and forwarding it would deliver it twice."""
    for fd in (0, 1, 2):
        try:
            return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


def _exit_like(child: Child) -> int:
    rc = child.wait()
    if rc < 0:
        sig = -rc
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        try:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            time.sleep(1.0)  # the signal is delivered before this returns; this is a fallback
        except (OSError, ValueError):
            pass
        return 128 + sig
    return rc


def finish_recording(record: str | None, child: Child, since: float) -> None:
    """Add the script's real exit status to its recording: the agent inside could not know it.

    ``since`` is when the child was started: a file not written since then is an old recording
    (the agent never started), left as it is."""
    if not record or child.poll() is None:
        return
    path = os.path.abspath(record)
    try:
        if os.stat(path).st_mtime < since - 1.0:
            return
    except OSError:
        return  # nothing was recorded (not a Python child, or the agent could not start)
    try:
        from llmtop.protocol.recording import append_exit

        append_exit(path, exit_code=child.returncode if child.signal is None else None, signal=child.signal)
    except Exception as exc:  # the script's own exit status is what matters: say so and go on
        print(f"llmtop: could not add the exit status to {path}: {exc}", file=sys.stderr)


def run_headless(argv: list[str], env: dict[str, str], sock: Path, record: str | None = None) -> int:
    child: Child | None = None

    def forward(signum: int, _frame: Any) -> None:
        if child is None:
            return
        if signum in (signal.SIGINT, signal.SIGHUP) and _terminal_delivers_to_child():
            return
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        since = time.time()
        child = Child.spawn(argv, env, sock, headless=True)
        child.wait()
        finish_recording(record, child, since)
        return _exit_like(child)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    try:
        argv, python_child = build_command(args)
        sock = choose_socket()
        _clear_stale(sock)
    except (ValueError, RuntimeError) as exc:
        print(f"llmtop attach: {exc}", file=sys.stderr)
        return 2
    env = child_env(sock, python_child, args.record)
    if args.headless:
        return run_headless(argv, env, sock, args.record)
    try:
        from llmtop.tui.views.app import run_attached
    except ImportError as exc:
        print(f"llmtop: dashboard unavailable ({exc}); running headless", file=sys.stderr)
        return run_headless(argv, env, sock, args.record)
    since = time.time()
    child = Child.spawn(argv, env, sock, headless=False)
    def pass_on_and_die(signum: int, _frame: Any) -> None:
        # The child has its own session, so a hang-up or a kill aimed at llmtop would not reach it:
        # pass it on, then end as llmtop would have without this handler (with no terminal left,
        # the dashboard could never be quit).
        child.send_signal(signum)
        signal.signal(signum, signal.SIG_DFL)
        if signum == signal.SIGHUP:
            os.kill(os.getpid(), signum)  # the terminal is gone: nothing to restore
        # Unwinding the dashboard restores the terminal; should the app swallow the exception, the
        # default action (restored above) ends llmtop a moment later.
        threading.Timer(3.0, os.kill, (os.getpid(), signum)).start()
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, pass_on_and_die) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        run_attached(child, args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    child.close()
    if child.detached and child.poll() is None:
        print_output_after(child, keep_log=True)
        print(f"llmtop: {_script_name(child)} keeps running as pid {child.pid} (detached); its output goes to "
              f"{child.log_path}; `llmtop watch {child.pid}` opens the dashboard again", file=sys.stderr)
        return 0
    child.wait()
    finish_recording(args.record, child, since)
    print_output_after(child, keep_log=False)
    print(summary_line(child, args.record), file=sys.stderr)
    return _exit_like(child)
