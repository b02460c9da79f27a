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
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from llmtop.protocol.events import End, LogLine
from llmtop.protocol.paths import create_exclusive, private_socket_dir, socket_is_live

HELP = "Run a script (or any command after --) with the agent inside and open the dashboard on it."

SOCKET_WAIT_S = 30.0
MAX_LINES = 20_000  # log lines held for the dashboard between drains
MAX_LINE_CHARS = 8192
IDLE_FLUSH_S = 0.15  # an unterminated line (a progress bar) is shown after this much quiet
OUTPUT_SETTLE_S = 0.5  # after the script ends, output still arriving this late is left to the log file
SCROLLBACK_LINES = 2000  # after the dashboard, at most this many lines are printed back (tmux's default)
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


# The holder: owns the pty's reading end from the start and copies it into the log, so the script
# never blocks on a full pty nor gets EIO/SIGHUP when llmtop goes (even by kill -9). It ends when
# every writer of the pty is gone. A failed write (disk full) drops output rather than block.
_HOLDER = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
log, master = int(sys.argv[1]), int(sys.argv[2])
while True:
    try:
        data = os.read(master, 65536)
    except OSError:
        break
    if not data:
        break
    try:
        while data:
            data = data[os.write(log, data):]
    except OSError:
        pass
"""


class Child:
    """The script under ``llmtop attach``, as the dashboard sees it.

    ``returncode`` is Popen's (None while running, ``-N`` if killed by signal N); ``signal`` is N
    then; ``exit_code`` is what a shell would report (``128+N`` for a signal).
    """

    def __init__(self, proc: subprocess.Popen[bytes], socket_path: Path, argv: list[str],
                 log: tuple[Path, int] | None = None, holder: subprocess.Popen[bytes] | None = None,
                 stdin_fd: int | None = None, own_session: bool = False) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.socket_path = socket_path
        self.argv = argv
        self.own_session = own_session
        self.detached = False
        self.started = time.time()
        self.ended_at: float | None = None
        self.log_path: Path | None = log[0] if log else None
        self.holder = holder
        self._stdin_fd = stdin_fd  # the pty's master, kept to type into the script's stdin
        self._log_fd = log[1] if log else None
        self._lines: deque[LogLine] = deque(maxlen=MAX_LINES)
        self._splitters = {"stdout": _LineSplitter("stdout", self._lines)} if log else {}
        self._reading = True
        self.output_done = log is None
        self._reader: threading.Thread | None = None
        if log:
            self._reader = threading.Thread(target=self._read_loop, name="llmtop-child-output", daemon=True)
            self._reader.start()

    # --- spawning ----------------------------------------------------------------------------------

    @classmethod
    def spawn(cls, argv: list[str], env: dict[str, str], socket_path: Path, headless: bool,
              wait_socket_s: float = SOCKET_WAIT_S, pty_stdin: bool | None = None) -> Child:
        """``pty_stdin`` (dashboard): the script reads the pty (default: when llmtop's own stdin is a
        terminal, which the dashboard then owns); otherwise it inherits llmtop's stdin."""
        if headless:
            proc = subprocess.Popen(argv, env=env)
            child = cls(proc, socket_path, argv)
        else:
            child = cls._spawn_dashboard(argv, env, socket_path, _isatty(0) if pty_stdin is None else pty_stdin)
        child.wait_for_socket(wait_socket_s)
        return child

    @classmethod
    def _spawn_dashboard(cls, argv: list[str], env: dict[str, str], socket_path: Path, pty_stdin: bool) -> Child:
        import pty

        # One pty for stdin, stdout and stderr, as in a terminal: the streams' interleaving stays
        # exact (two ptys would tell them apart but reorder them), so lines are labelled "stdout".
        master, slave = pty.openpty()
        os.set_inheritable(master, False)
        _set_winsize(slave)
        # The dashboard owns llmtop's terminal; the script reads the pty, which the dashboard feeds
        # when it sees the script waiting (see ``waiting_for_input``). A pipe or file given to
        # llmtop as stdin is passed on as it is.
        stdin: Any = slave if pty_stdin else None
        log_fd = -1
        try:
            proc = subprocess.Popen(argv, env=env, stdin=stdin, stdout=slave, stderr=slave, start_new_session=True)
            log_path, log_fd = _open_log(socket_path.parent, proc.pid)
            holder_env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTOP")}
            holder = subprocess.Popen([sys.executable, "-I", "-c", _HOLDER, str(log_fd), str(master)],
                                      pass_fds=(log_fd, master), env=holder_env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
            if log_fd >= 0:
                os.close(log_fd)
        read_fd = os.open(log_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        if not pty_stdin:
            os.close(master)  # the holder has its own copy; nobody types into this pty
        return cls(proc, socket_path, argv, log=(log_path, read_fd), holder=holder,
                   stdin_fd=master if pty_stdin else None, own_session=True)

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
        rc = self.proc.poll()
        if rc is not None and self.ended_at is None:
            self.ended_at = time.time()
        return rc

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
        rc = self.proc.wait(timeout)
        self.poll()  # notes when it ended
        return rc

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
        """Follow the log the holder writes, as lines; done once the script ended and its output
        stopped (the holder exited, or nothing came for ``OUTPUT_SETTLE_S``)."""
        fd = self._log_fd
        assert fd is not None
        splitter = self._splitters["stdout"]
        last_data = time.monotonic()
        idle_done = True
        try:
            while self._reading:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if data:
                    splitter.feed(data)
                    last_data = time.monotonic()
                    idle_done = False
                    continue
                now = time.monotonic()
                if self.proc.poll() is not None and (
                        (self.holder is None or self.holder.poll() is not None) or now - last_data >= OUTPUT_SETTLE_S):
                    if self.holder is None or self.holder.poll() is not None:
                        while data := os.read(fd, 65536):  # what the holder wrote just before it ended
                            splitter.feed(data)
                    splitter.close()
                    self.output_done = True
                    break
                if not idle_done and now - last_data >= IDLE_FLUSH_S:
                    splitter.idle()
                    idle_done = True
                time.sleep(0.03)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
            self._log_fd = None

    # --- input ---------------------------------------------------------------------------------------

    def waiting_for_input(self) -> bool:
        """True while a thread of the script is blocked reading its stdin (the pty).

        Read from ``/proc/<pid>/task/*/syscall`` (the parent may read it): a ``read`` on fd 0."""
        if self._stdin_fd is None or self.proc.poll() is not None:
            return False
        nrs = _READ_SYSCALLS.get(os.uname().machine)
        if nrs is None:
            return False
        read_nr, select_nrs = nrs
        try:
            tasks = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return False
        for tid in tasks:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/syscall") as f:
                    fields = f.read().split()
            except OSError:
                continue
            if len(fields) < 2 or not fields[0].isdigit():
                continue
            nr, arg0 = int(fields[0]), int(fields[1], 16)
            # input() is read(0, …); with the readline module loaded it waits in select(1, {0}, …)
            if (nr == read_nr and arg0 == 0) or (nr in select_nrs and arg0 == 1):
                return True
        return False

    def send_input(self, text: str) -> None:
        """Type ``text`` into the script's terminal (the pty echoes it, as a terminal would)."""
        if self._stdin_fd is None:
            raise OSError("the script's stdin is not a terminal llmtop can type into")
        data = text.encode()
        while data:
            data = data[os.write(self._stdin_fd, data):]

    def _close_stdin(self) -> None:
        if self._stdin_fd is not None:
            try:
                os.close(self._stdin_fd)
            except OSError:
                pass
            self._stdin_fd = None

    def detach(self) -> Path | None:
        """Leave the child running after llmtop exits. Its output goes on into the log file the
        holder has written from the start (returned); llmtop just stops following it."""
        self.detached = True
        self._reading = False
        if self._reader is not None:
            self._reader.join(1.0)
        self._close_stdin()
        return self.log_path

    def close(self) -> None:
        """The dashboard is gone: stop following the output."""
        self._reading = False
        if self._reader is not None:
            self._reader.join(1.0)
        self._close_stdin()


# machine -> (read, (select-like calls)) syscall numbers
_READ_SYSCALLS: dict[str, tuple[int, tuple[int, ...]]] = {"x86_64": (0, (23, 270)), "aarch64": (63, (72,))}


def _open_log(directory: Path, pid: int) -> tuple[Path, int]:
    """Create ``directory/<pid>.log`` afresh (``O_EXCL|O_NOFOLLOW``, relative to the directory);
    in a directory that will not have it (someone else's entry in a shared /tmp), a private one."""
    try:
        return directory / f"{pid}.log", create_exclusive(directory, f"{pid}.log")
    except OSError:
        fallback = private_socket_dir()
        return fallback / f"{pid}.log", create_exclusive(fallback, f"{pid}.log")


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


# --- after the dashboard -----------------------------------------------------------------------------


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
