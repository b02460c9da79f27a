"""The script under ``llmtop attach``: ``Child`` starts it (headless, sharing llmtop's terminal, or on
a pty in its own session, with the holder of ``pty_log.py`` copying its output into the log), waits for
its agent's socket, follows its output as LogLines, types into its stdin when it waits for input,
passes signals on to it, and tells how it ended. Linux ``/proc`` tells when the script waits for input.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from llmtop.protocol.events import End, LogLine
from llmtop.pty_log import _HOLDER, _LineSplitter, _open_log

SOCKET_WAIT_S = 30.0
MAX_LINES = 20_000  # log lines held for the dashboard between drains
IDLE_FLUSH_S = 0.15  # an unterminated line (a progress bar) is shown after this much quiet
OUTPUT_SETTLE_S = 0.5  # after the script ends, output still arriving this late is left to the log file


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
