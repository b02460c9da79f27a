"""`llmtop attach`: run a script (or any command) with the agent inside, and watch it.

The child is the real ``python script.py args…`` (or ``python -m module``, or any command), with
``agent/bootstrap`` first on ``PYTHONPATH`` so its ``sitecustomize`` starts the agent. Python's own
semantics hold: argv, ``__main__``, ``__file__``, ``sys.path[0]``, stdin, ``sys.exit(n)``,
tracebacks and the error for a missing script are exactly python's, and llmtop exits with the
child's code (or dies of the child's signal).

Headless, the child shares llmtop's terminal and process group. With the dashboard, the child's
stdout and stderr go to a pty owned by llmtop (progress bars behave as in a terminal) and it runs in
its own session, so closing llmtop's terminal never sends it SIGHUP (``Child.detach``).
Both streams share one pty, so their interleaving is exactly what a terminal would show.
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from llmtop.protocol.events import End, LogLine
from llmtop.protocol.paths import socket_dir

HELP = "Run a script (or any command after --) with the agent inside and open the dashboard on it."

SOCKET_WAIT_S = 30.0
MAX_LINES = 20_000  # log lines held for the dashboard between drains
MAX_LINE_CHARS = 8192
IDLE_FLUSH_S = 0.15  # an unterminated line (a progress bar) is shown after this much quiet
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
    return socket_dir() / f"attach-{os.getpid()}.sock"


def _clear_stale(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse a live one with a one-line error."""
    if not (path.exists() or path.is_symlink()):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise ValueError(f"{path} belongs to a running agent; unset LLMTOP_SOCKET or pick another path")


# --- the child ---------------------------------------------------------------------------------------


class _LineSplitter:
    """Turns a stream's text into LogLines as a terminal would show them.

    ``\\n`` ends a line. A ``\\r``-terminated segment (a progress bar update) and an unterminated
    line left quiet for a moment are provisional: the line that follows on the same stream is sent
    with ``replace=True``, meaning "overwrite the previous line of this stream" (as the viewer's
    ``SessionModel.add_log`` does).
    """

    def __init__(self, stream: str, out: deque[LogLine]) -> None:
        self.stream = stream
        self.out = out
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.partial = ""
        self.cr = False  # a chunk ended in \r: it may be the first half of \r\n
        self.shown = ""  # the partial text already shown provisionally
        self.provisional = False  # the last line sent on this stream will be overwritten

    def feed(self, data: bytes) -> None:
        text = self.decoder.decode(data)
        if self.cr:
            text = "\r" + text
            self.cr = False
        if text.endswith("\r"):
            self.cr = True
            text = text[:-1]
        text = text.replace("\r\n", "\n")
        parts = re.split(r"([\r\n])", text)
        for i in range(0, len(parts), 2):
            self.partial += parts[i]
            term = parts[i + 1] if i + 1 < len(parts) else ""
            if term == "\n":
                self._emit(provisional=False)
            elif term == "\r":
                if self.partial and self.partial == self.shown:
                    self.partial = self.shown = ""  # already on screen, provisionally
                elif self.partial.strip():
                    self._emit(provisional=True)
                else:  # "\r    \r" clears the line: the next text overwrites what was there
                    self.partial = ""
            if len(self.partial) > MAX_LINE_CHARS:
                self._emit(provisional=False)

    def idle(self) -> None:
        if self.cr:
            self.cr = False
            if self.partial.strip():
                self._emit(provisional=True)
            else:
                self.partial = ""
        elif self.partial and self.partial != self.shown:
            self.out.append(LogLine(t=time.time(), text=self.partial, stream=self.stream, replace=self.provisional))
            self.shown = self.partial
            self.provisional = True

    def close(self) -> None:
        self.partial += self.decoder.decode(b"", final=True)
        self.cr = False
        if self.partial:
            self._emit(provisional=False)

    def _emit(self, provisional: bool) -> None:
        self.out.append(LogLine(t=time.time(), text=self.partial, stream=self.stream, replace=self.provisional))
        self.provisional = provisional
        self.partial = ""
        self.shown = ""


_DRAINER = r"""
import os, select, sys
log = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
fds = [int(x) for x in sys.argv[2:]]
while fds:
    ready, _, _ = select.select(fds, [], [])
    for fd in ready:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if data:
            os.write(log, data)
        else:
            fds.remove(fd)
"""


class Child:
    """The script under ``llmtop attach``, as the dashboard sees it.

    ``returncode`` is Popen's (None while running, ``-N`` if killed by signal N); ``signal`` is N
    then; ``exit_code`` is what a shell would report (``128+N`` for a signal).
    """

    def __init__(self, proc: subprocess.Popen[bytes], socket_path: Path, argv: list[str],
                 masters: dict[str, int] | None = None, own_session: bool = False) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.socket_path = socket_path
        self.argv = argv
        self.own_session = own_session
        self.detached = False
        self.log_path: Path | None = None
        self._masters = dict(masters or {})
        self._lines: deque[LogLine] = deque(maxlen=MAX_LINES)
        self._splitters = {name: _LineSplitter(name, self._lines) for name in self._masters}
        self._reading = True
        self._reader: threading.Thread | None = None
        if self._masters:
            self._reader = threading.Thread(target=self._read_loop, name="llmtop-child-output", daemon=True)
            self._reader.start()

    # --- spawning ----------------------------------------------------------------------------------

    @classmethod
    def spawn(cls, argv: list[str], env: dict[str, str], socket_path: Path, headless: bool,
              wait_socket_s: float = SOCKET_WAIT_S) -> Child:
        if headless:
            proc = subprocess.Popen(argv, env=env)
            child = cls(proc, socket_path, argv)
        else:
            import pty

            # One pty for stdout and stderr, as in a terminal: their interleaving stays exact (two
            # ptys would tell the streams apart but reorder them), so lines are labelled "stdout".
            master, slave = pty.openpty()
            os.set_inheritable(master, False)
            _set_winsize(slave)
            stdin: Any = None if not _isatty(0) else subprocess.DEVNULL
            try:
                proc = subprocess.Popen(argv, env=env, stdin=stdin, stdout=slave, stderr=slave,
                                        start_new_session=True)
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            child = cls(proc, socket_path, argv, {"stdout": master}, own_session=True)
        child.wait_for_socket(wait_socket_s)
        return child

    def wait_for_socket(self, timeout: float) -> bool:
        """True once the agent's socket exists; False if the child ended first or time ran out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket_path.exists():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return self.socket_path.exists()

    # --- state ---------------------------------------------------------------------------------------

    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def signal(self) -> int | None:
        rc = self.proc.returncode
        return -rc if rc is not None and rc < 0 else None

    @property
    def exit_code(self) -> int | None:
        rc = self.proc.returncode
        if rc is None:
            return None
        return 128 - rc if rc < 0 else rc

    def wait(self, timeout: float | None = None) -> int:
        """The returncode; raises ``subprocess.TimeoutExpired`` if ``timeout`` passes first."""
        return self.proc.wait(timeout)

    def end_event(self) -> End:
        rc = self.proc.poll()
        if rc is None:
            return End(t=time.time(), reason="detached" if self.detached else "running")
        if rc < 0:
            return End(t=time.time(), signal=-rc, reason="signal")
        return End(t=time.time(), exit_code=rc, reason="exit")

    # --- control -------------------------------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is not None:
            return
        try:
            if self.own_session:
                os.killpg(self.pid, sig)  # like a terminal: the whole job, its workers included
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def interrupt(self) -> None:
        self.send_signal(signal.SIGINT)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGINT now, SIGTERM if still running after ``grace_s``. Returns at once."""
        self.interrupt()

        def escalate() -> None:
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGTERM)

        threading.Thread(target=escalate, name="llmtop-stop", daemon=True).start()

    # --- output --------------------------------------------------------------------------------------

    def drain_output(self) -> list[LogLine]:
        out: list[LogLine] = []
        lines = self._lines
        try:
            while True:
                out.append(lines.popleft())
        except IndexError:
            return out

    def _read_loop(self) -> None:
        fds = {fd: name for name, fd in self._masters.items()}
        last_data = time.monotonic()
        idle_done = True
        while fds and self._reading:
            try:
                ready, _, _ = select.select(list(fds), [], [], 0.05)
            except (OSError, ValueError):
                break
            if not ready:
                if not idle_done and time.monotonic() - last_data >= IDLE_FLUSH_S:
                    for sp in self._splitters.values():
                        sp.idle()
                    idle_done = True
                continue
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: every writer of the pty is gone
                    data = b""
                name = fds[fd]
                if not data:
                    del fds[fd]
                    self._splitters[name].close()
                    continue
                self._splitters[name].feed(data)
                last_data = time.monotonic()
                idle_done = False
        if not fds:
            self._close_masters()

    def _close_masters(self) -> None:
        for fd in self._masters.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._masters = {}

    def detach(self) -> Path:
        """Leave the child running after llmtop exits; its output goes on into the returned log file."""
        self.detached = True
        directory = self.socket_path.parent
        path = directory / f"{self.pid}.log"
        if self.log_path is not None:
            return self.log_path
        self.log_path = path
        self._reading = False
        if self._reader is not None:
            self._reader.join(1.0)
        pending = self.drain_output()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            for sp in self._splitters.values():
                if sp.partial:
                    pending.append(LogLine(t=time.time(), text=sp.partial, stream=sp.stream))
                    sp.partial = ""
            if pending:
                os.write(fd, "".join(line.text + "\n" for line in pending if not line.replace).encode())
        finally:
            os.close(fd)
        if self._masters and self.proc.poll() is None:
            # A small process of its own keeps draining the pty: the child never blocks on a full
            # pty or gets EIO/SIGHUP when llmtop exits.
            fds = list(self._masters.values())
            env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTOP")}
            subprocess.Popen([sys.executable, "-I", "-c", _DRAINER, str(path), *map(str, fds)],
                             pass_fds=fds, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        self._close_masters()
        return path


def _set_winsize(fd: int) -> None:
    """Give the pty the terminal's size: a fresh pty is 0x0, and progress bars then draw nothing."""
    import fcntl
    import shutil
    import struct
    import termios

    cols, rows = shutil.get_terminal_size((120, 40))
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    except OSError:
        pass


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


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
    if child.detached and child.poll() is None:
        print(f"llmtop: pid {child.pid} keeps running; output goes to {child.log_path}", file=sys.stderr)
        return 0
    child.wait()
    finish_recording(args.record, child, since)
    return _exit_like(child)
