"""The agent's Unix socket server: handshake, snapshot for late joiners, live frames to every client.

It runs on its own thread with non-blocking sockets and a selector, so a slow, stopped or dead
viewer can never block the script or the agent thread: each client has a bounded byte buffer, and
a frame that does not fit is dropped whole (never cut) and counted. A client whose buffer stays
full for ``stall_s`` seconds is disconnected.

The runtime publishes with ``broadcast(frames)`` while holding ``lock`` together with its history
update; a joining client's snapshot is taken under the same lock, so it misses and repeats nothing.
"""

from __future__ import annotations

import errno
import os
import secrets
import selectors
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtop.protocol.events import AgentWarning, Hello, SnapshotDone, Stats, check_hello, decode_one, encode
from llmtop.protocol.frames import FrameDecoder, ProtocolError
from llmtop.protocol.paths import (
    clean_stale,
    info_path,
    is_default_dir,
    open_private_dir,
    socket_is_live,
    write_json_atomic,
)

HELLO_TIMEOUT_S = 5.0  # default handshake deadline (Options.handshake_s)
MAX_PENDING = 16  # default cap on connections that have not said hello yet (Options.max_pending)
MAX_CLIENTS = 64  # default cap on all connections (Options.max_clients)
WARN_EVERY_S = 10.0  # refused connections are reported at most this often (a flood makes one warning)
STATS_EVERY_S = 1.0
SEND_CHUNK = 1 << 20


class AddressInUse(OSError):
    """Another live agent already listens on the socket path."""


class _Client:
    __slots__ = ("sock", "live", "frames", "out", "sent", "dropped", "full_since", "deadline",
                 "role", "pid", "close_when_sent", "writing", "refused")

    def __init__(self, sock: socket.socket, now: float, handshake_s: float = HELLO_TIMEOUT_S) -> None:
        self.sock = sock
        self.live = False
        self.frames = FrameDecoder(max_frame=65536)
        self.out = bytearray()
        self.sent = 0
        self.dropped = 0
        self.full_since: float | None = None
        self.deadline = now + handshake_s
        self.role = "?"
        self.pid = 0
        self.close_when_sent = False
        self.writing = False
        self.refused = False  # told why it may not connect; waits for the peer to hang up

    @property
    def pending(self) -> int:
        return len(self.out) - self.sent

    def enqueue(self, frame: bytes, limit: int, now: float, force: bool = False) -> None:
        if not force and self.pending + len(frame) > limit:
            self.dropped += 1
            if self.full_since is None:
                self.full_since = now
            return
        self.out += frame


def prepare_socket_dir(path: Path, private: bool) -> None:
    """Make ready the socket's directory. ``private`` (the default directory, or its fallback): it
    must be ours and 0700 (``UnsafeDirectory`` otherwise, see protocol/paths.py), and files that
    dead agents left there are removed. A directory the user chose is created 0700 if missing."""
    directory = path.parent
    if private or is_default_dir(directory):
        os.close(open_private_dir(directory))
        clean_stale(directory)
    elif not directory.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def bind_unix(path: Path) -> socket.socket:
    """Bind a listening socket at ``path`` (0600). A stale socket file is replaced; a live one is not."""
    if len(os.fsencode(str(path))) >= 108:
        raise OSError(errno.ENAMETOOLONG, f"socket path too long ({len(str(path))} bytes, limit 107)")
    if path.exists() or path.is_symlink():
        if socket_is_live(path):
            raise AddressInUse(errno.EADDRINUSE, f"{path} is in use by a live agent")
        path.unlink(missing_ok=True)  # nobody listens: left over from a killed process (never follows a link)
    # Bound and listening under a temporary name first, then linked into place: a client that sees
    # the path never meets a socket that is not listening yet (ECONNREFUSED), and link() fails on an
    # existing entry instead of replacing it.
    tmp = path.with_name(f".{secrets.token_hex(4)}.s")
    direct = len(os.fsencode(str(tmp))) >= 108
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        where = path if direct else tmp
        sock.bind(str(where))
        # bind() created a new inode here (it fails on any existing entry, a symlink included)
        os.chmod(where, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        if not direct:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise AddressInUse(errno.EADDRINUSE, f"{path} was taken by another agent meanwhile") from None
            finally:
                os.unlink(tmp)
    except BaseException:
        sock.close()
        raise
    return sock


def write_info(sock_path: Path, argv: list[str], started: float, extra: dict[str, Any] | None = None) -> Path:
    """The info file beside the socket (``protocol.paths.AgentInfo``): pid, socket, argv, started, and
    ``extra`` (the rank fields, host, attach). Rewritten whole (atomic rename) when they change."""
    data = {"pid": os.getpid(), "socket": str(sock_path), "argv": argv, "started": started, **(extra or {})}
    return write_json_atomic(info_path(sock_path), data)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux SO_PEERCRED), else None."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
    except OSError:
        return None
    return uid


class Server:
    def __init__(self, path: Path, lock: threading.Lock, snapshot: Callable[[], list[bytes]],
                 warn: Callable[[str, str], None], client_buffer: int = 4 << 20, stall_s: float = 30.0,
                 cpu_pct: Callable[[], float | None] = lambda: None, argv: list[str] | None = None,
                 started: float | None = None, private_dir: bool = False, max_clients: int = MAX_CLIENTS,
                 max_pending: int = MAX_PENDING, handshake_s: float = HELLO_TIMEOUT_S,
                 info: dict[str, Any] | None = None) -> None:
        self.path = path
        self.lock = lock
        self.snapshot = snapshot
        self.warn = warn
        self.limit = client_buffer
        self.stall_s = stall_s
        self.cpu_pct = cpu_pct
        self.argv = list(sys.orig_argv[1:] if argv is None else argv)
        self.started = time.time() if started is None else started
        self.info = dict(info or {})
        self.cpu_s = 0.0  # this thread's own CPU time
        self.total_dropped = 0
        self.max_clients = max(1, int(max_clients))
        self.max_pending = max(1, min(int(max_pending), self.max_clients))
        self.handshake_s = max(0.1, float(handshake_s))
        self.refused: dict[str, int] = {}  # why -> connections refused since the last warning
        self.refused_total: dict[str, int] = {}  # why -> connections refused since the start
        self._refused_warned_at = -WARN_EVERY_S
        self._inbox: deque[bytes] = deque()
        self._clients: dict[int, _Client] = {}
        self._closing = False
        self._final: list[bytes] = []
        self._deadline = 0.0
        self._thread: threading.Thread | None = None
        self._stats_at = 0.0
        prepare_socket_dir(path, private_dir)
        self._listener = bind_unix(path)
        try:
            self._info = write_info(path, self.argv, self.started, self.info)
        except OSError:
            self._info = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    # --- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmtop-server", daemon=True)
        self._thread.start()

    @property
    def clients(self) -> int:
        return sum(1 for c in list(self._clients.values()) if c.live)

    def broadcast(self, frames: list[bytes]) -> None:
        """Queue frames for every live client. Call with ``lock`` held (see the module docstring)."""
        if frames and not self._closing:
            thread = self._thread
            if thread is not None and not thread.is_alive():
                return  # the server stopped (see its warning): never let the inbox grow
            self._inbox.extend(frames)
            self._wake()

    def update_info(self, info: dict[str, Any]) -> None:
        """Rewrite the info file with new fields (a rank learnt late). Not after close."""
        self.info = dict(info)
        if self._info is not None and not self._closing:
            self._info = write_info(self.path, self.argv, self.started, self.info)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # pipe full: the server is already due to wake up
            pass

    def close(self, final: list[bytes], timeout: float = 1.0) -> None:
        """Send ``final`` frames to every client (best effort, within ``timeout``), then shut down."""
        self._final = final
        self._deadline = time.monotonic() + timeout
        self._closing = True
        self._wake()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout + 0.5)
        self._remove_files()

    def abandon(self) -> None:
        """In a forked child: release the inherited descriptors, touch no files, send nothing."""
        self._closing = True
        for c in list(self._clients.values()):
            try:
                c.sock.close()
            except OSError:
                pass
        self._clients.clear()
        for closer in (self._listener.close, lambda: os.close(self._wake_r), lambda: os.close(self._wake_w)):
            try:
                closer()
            except OSError:
                pass

    def _remove_files(self) -> None:
        for p in (self.path, self._info):
            if p is not None:
                try:
                    os.unlink(p)
                except OSError:
                    pass

    # --- server thread ------------------------------------------------------------------------

    def _run(self) -> None:
        t0 = time.thread_time()
        try:
            while not self._closing:
                for key, mask in self._sel.select(timeout=0.25):
                    self._dispatch(key, mask)
                self._distribute()
                self._housekeeping()
                self.cpu_s = time.thread_time() - t0
            self._finish()
        except Exception as exc:  # never let the server die loudly inside the user's process
            self.warn("server", f"socket server stopped: {type(exc).__name__}: {exc}")
            self._finish_quietly()
        self.cpu_s = time.thread_time() - t0

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == "listen":
            self._accept()
        elif key.data == "wake":
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except OSError:
                pass
        else:
            client: _Client = key.data
            if mask & selectors.EVENT_READ:
                self._read(client)
            if mask & selectors.EVENT_WRITE and client.sock.fileno() in self._clients:
                self._flush(client)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE included: the backlog waits in the kernel, costing the script nothing
                return
            pending = sum(1 for c in self._clients.values() if not c.live)
            if len(self._clients) >= self.max_clients or pending >= self.max_pending:
                # Accept-and-close at once: a flood of connections that never say hello holds at
                # most max_pending descriptors, each for at most handshake_s.
                why = "too many connections" if len(self._clients) >= self.max_clients else "too many handshakes"
                self._count_refused(why)
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, time.monotonic(), self.handshake_s)
            self._clients[sock.fileno()] = client
            self._sel.register(sock, selectors.EVENT_READ, client)
            uid = peer_uid(sock)
            if uid is not None and uid not in (os.getuid(), 0):
                self._refuse_other_user(client, uid)

    def _refuse_other_user(self, client: _Client, uid: int) -> None:
        """Tell a client of another user why it is refused, then let it hang up (within the
        handshake deadline): closing first, with its hello unread, would reset the connection and
        could lose the message. It never sees the session."""
        self._count_refused(f"uid {uid} is not the owner")
        message = (f"refused: this llmtop agent belongs to uid {os.getuid()}; "
                   f"connections from uid {uid} are not accepted")
        client.refused = True
        client.enqueue(encode(Hello(role="agent", pid=0)), self.limit, 0, force=True)
        client.enqueue(encode(AgentWarning(t=time.time(), source="server", message=message)), self.limit, 0,
                       force=True)
        self._flush(client)
        if client.sock.fileno() in self._clients and not client.pending:
            try:
                client.sock.shutdown(socket.SHUT_WR)  # the peer reads the message, then end of stream
            except OSError:
                pass

    def _count_refused(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1
        self.refused_total[why] = self.refused_total.get(why, 0) + 1
        self._report_refused()

    def _report_refused(self) -> None:
        now = time.monotonic()
        if self.refused and now - self._refused_warned_at >= WARN_EVERY_S:
            self._refused_warned_at = now
            parts = ", ".join(f"{n} ({why})" for why, n in sorted(self.refused.items()))
            self.refused = {}
            self.warn("server", f"refused connections: {parts}; limits: {self.max_clients} connections, "
                      f"{self.max_pending} handshakes, {self.handshake_s:g} s to say hello")

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client(client)
            return
        if client.live or client.refused:
            return  # clients have nothing more to say; ignore whatever they send
        try:
            for body in client.frames.feed(data):
                hello = check_hello(decode_one(body))
                self._welcome(client, hello)
                return
        except ProtocolError as exc:
            self.warn("server", f"refused a client: {exc}")
            # Answer with our own hello so the peer can report the version it met, then hang up.
            client.enqueue(encode(Hello(role="agent", pid=os.getpid())), self.limit, 0, force=True)
            client.close_when_sent = True
            self._flush(client)

    def _welcome(self, client: _Client, hello: Hello) -> None:
        client.role, client.pid = hello.role, hello.pid
        now = time.monotonic()
        with self.lock:
            self._distribute()  # everything published before the snapshot goes to earlier clients only
            frames = self.snapshot()
            client.enqueue(encode(Hello(role="agent", pid=os.getpid())), self.limit, now, force=True)
            for frame in frames:
                client.enqueue(frame, self.limit, now, force=True)
            client.enqueue(encode(SnapshotDone(events=len(frames))), self.limit, now, force=True)
            client.live = True
        self._flush(client)

    def _distribute(self) -> None:
        inbox = self._inbox
        if not inbox:
            return
        frames: list[bytes] = []
        try:
            while True:
                frames.append(inbox.popleft())
        except IndexError:
            pass
        now = time.monotonic()
        for client in list(self._clients.values()):
            if not client.live:
                continue
            before = client.dropped
            for frame in frames:
                client.enqueue(frame, self.limit, now)
            self.total_dropped += client.dropped - before
            self._flush(client)

    def _flush(self, client: _Client) -> None:
        sock = client.sock
        while client.pending:
            try:
                n = sock.send(memoryview(client.out)[client.sent : client.sent + SEND_CHUNK])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop_client(client)
                return
            client.sent += n
            client.full_since = None
        if client.sent and (client.sent >= SEND_CHUNK or not client.pending):
            del client.out[: client.sent]
            client.sent = 0
        want_write = bool(client.pending)
        if want_write != client.writing:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            try:
                self._sel.modify(sock, events, client)
                client.writing = want_write
            except (KeyError, ValueError, OSError):
                pass
        if not client.pending and client.close_when_sent:
            self._drop_client(client)

    def _drop_client(self, client: _Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        try:
            self._sel.unregister(client.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            client.sock.close()
        except OSError:
            pass

    def _housekeeping(self) -> None:
        now = time.monotonic()
        send_stats = now - self._stats_at >= STATS_EVERY_S
        if send_stats:
            self._stats_at = now
        live = self.clients
        self._report_refused()
        for client in list(self._clients.values()):
            if not client.live:
                if now > client.deadline:
                    if not client.refused:
                        self._count_refused(f"no hello within {self.handshake_s:g} s")
                    self._drop_client(client)
                continue
            if client.full_since is not None and now - client.full_since > self.stall_s:
                self.warn("server", f"{client.role} pid {client.pid} read nothing for {self.stall_s:.0f} s "
                          f"({client.dropped} frames dropped); disconnected it")
                self._drop_client(client)
                continue
            if send_stats:
                stats = Stats(t=time.time(), dropped=client.dropped, clients=live, agent_cpu_pct=self.cpu_pct())
                client.enqueue(encode(stats), self.limit, now)
                self._flush(client)

    def _finish(self) -> None:
        self._distribute()
        now = time.monotonic()
        for client in list(self._clients.values()):
            if not client.live:
                self._drop_client(client)
                continue
            stats = Stats(t=time.time(), dropped=client.dropped, clients=self.clients, agent_cpu_pct=self.cpu_pct())
            client.enqueue(encode(stats), self.limit, now, force=True)
            for frame in self._final:
                client.enqueue(frame, self.limit, now, force=True)
            self._flush(client)
        # Best effort within the deadline: a stopped viewer simply misses the end.
        while any(c.pending for c in self._clients.values()) and time.monotonic() < self._deadline:
            for key, mask in self._sel.select(timeout=max(0.0, min(0.05, self._deadline - time.monotonic()))):
                if isinstance(key.data, _Client) and mask & selectors.EVENT_WRITE:
                    self._flush(key.data)
        self._finish_quietly()

    def _finish_quietly(self) -> None:
        for client in list(self._clients.values()):
            self._drop_client(client)
        for closer in (self._listener.close, self._sel.close, lambda: os.close(self._wake_r),
                       lambda: os.close(self._wake_w)):
            try:
                closer()
            except OSError:
                pass
        self._remove_files()
