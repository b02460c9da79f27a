"""`llmtop bridge [JOB|PID|all]`: relay this host's agents over stdio, for ``llmtop watch ssh://HOST``.

Run by the viewer through the user's own ssh (``ssh HOST llmtop bridge 1234``); nothing listens, so
authentication and encryption are ssh's. It connects to each local agent that matches the target as a
viewer would (role ``bridge``), through the same private socket directories ``llmtop ls`` reads, and
writes their frames to stdout in the envelope of ``protocol/bridge.py``; it keeps looking for agents
(ranks that start late, elastic restarts) and reconnects to one that dropped it while it lives.

One thread and one selector: the agents' sockets and stdin. Stdin carries nothing: its end (the ssh
connection closed) ends the bridge. A write to stdout blocks while ssh is slow; meanwhile each agent
keeps its own bounded buffer for us and drops (and counts) what does not fit, as for any slow viewer,
so the run is never slowed. One bad agent (refused hello, oversized frame) closes its stream only.
Anything ``print``ed by accident goes to stderr: fd 1 is moved aside for the envelopes at start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmtop.protocol import bridge as envelope
from llmtop.protocol.events import Hello, check_hello, decode_one, encode
from llmtop.protocol.frames import PROTOCOL_VERSION, ProtocolError, unpack_map
from llmtop.protocol.paths import AgentInfo, list_agents, open_private_dir
from llmtop.tui.commands.common import fail

HELP = ("Relay this host's llmtop agents over stdin/stdout, for `llmtop watch ssh://HOST` "
        "(run through ssh, not by hand).")
SCAN_S = 1.0  # how often the socket directories are listed for new agents
RETRY_MAX_S = 30.0  # the longest wait before reconnecting to an agent that dropped or refused us
CONNECT_S = 2.0
READ_CHUNK = 262144


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", default="all",
                        help="which agents: all (default), a PID (an agent's, or the `llmtop attach` "
                             "that started a job), or a job id (see `llmtop ls`)")


def matches(info: AgentInfo, target: str) -> bool:
    """Does the agent described by ``info`` belong to ``target``? Fields added to the info file for
    distributed jobs (job, attach) are read with defaults: older agents' files lack them."""
    if target in ("", "all"):
        return True
    job = str(getattr(info, "job", "") or "")
    if target.isdigit() and int(target) in (info.pid, getattr(info, "attach", None)):
        return True
    return job == target


def candidate_dirs() -> list[Path]:
    """Socket directories beyond ``list_agents``'s own: an agent started outside this ssh session (a
    Slurm batch job, a tmux pane) may have had no ``$XDG_RUNTIME_DIR`` and used ``/tmp/llmtop-<uid>``
    while ours has one (systemd's ``/run/user/<uid>``), or the reverse. Both standard places are
    searched, each after the same ownership check; a ``$XDG_RUNTIME_DIR`` set elsewhere on purpose
    is respected alone."""
    uid = os.getuid()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.normpath(runtime) != f"/run/user/{uid}":
        return []
    out = []
    for path in (Path(f"/tmp/llmtop-{uid}"), Path(f"/run/user/{uid}/llmtop")):
        try:
            os.close(open_private_dir(path, create=False))
        except OSError:
            continue
        out.append(path)
    return out


def discover(target: str) -> list[AgentInfo]:
    """The live agents matching ``target``, one per socket."""
    seen: dict[str, AgentInfo] = {}
    for info in list_agents():
        seen.setdefault(info.socket, info)
    for d in candidate_dirs():
        for info in list_agents(d):
            seen.setdefault(info.socket, info)
    return [info for info in seen.values() if matches(info, target)]


def info_map(info: AgentInfo) -> dict:
    """The info file's fields for the ``open`` envelope (plain values only)."""
    try:
        data = asdict(info)
    except TypeError:
        data = dict(vars(info))
    return {k: v for k, v in data.items() if v is None or isinstance(v, (str, int, float, bool, list))}


@dataclass
class Stream:
    """One agent's connection."""

    sid: int
    info: AgentInfo
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    greeted: bool = False  # the agent's hello was read and accepted


@dataclass
class Retry:
    at: float
    wait: float


class Bridge:
    def __init__(self, target: str, out_fd: int, in_fd: int, *, scan_s: float = SCAN_S) -> None:
        self.target = target
        self.out_fd = out_fd
        self.in_fd = in_fd
        self.scan_s = scan_s
        self.sel = selectors.DefaultSelector()
        self.streams: dict[str, Stream] = {}  # by socket path
        self.retry: dict[str, Retry] = {}  # by socket path: when we may connect again
        self.next_sid = 1
        self.listed = False
        self.noted_empty = False

    # --- output ------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write everything (blocking); a closed pipe (ssh went away) raises BrokenPipeError."""
        view = memoryview(data)
        while view:
            n = os.write(self.out_fd, view)
            view = view[n:]

    # --- agents ------------------------------------------------------------------------------

    def scan(self, now: float) -> None:
        found = discover(self.target)
        live = {info.socket for info in found}
        for gone in [path for path in self.retry if path not in live]:
            del self.retry[gone]  # that agent has ended: forget it
        for info in found:
            if info.socket in self.streams:
                continue
            retry = self.retry.get(info.socket)
            if retry is not None and now < retry.at:
                continue
            self.connect(info)
        if not self.listed:
            self.listed = True
            self.send(envelope.pack("listed"))
        if not found and not self.streams and not self.noted_empty:
            self.noted_empty = True  # said once; the bridge keeps looking
            what = "no llmtop agent" if self.target in ("", "all") else f"no llmtop agent matches {self.target}"
            self.send(envelope.pack("note", why=f"{what} on {socket.gethostname()} yet; waiting"))
        if found:
            self.noted_empty = False

    def connect(self, info: AgentInfo) -> None:
        sid = self.next_sid
        self.next_sid += 1
        self.send(envelope.pack("open", s=sid, pid=info.pid, socket=info.socket, info=info_map(info)))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_S)
            sock.connect(info.socket)
            sock.sendall(encode(Hello(role="bridge", pid=os.getpid())))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self.closed(Stream(sid, info, sock), f"cannot connect to {info.socket}: {exc.strerror or exc}")
            return
        stream = Stream(sid, info, sock)
        self.streams[info.socket] = stream
        self.sel.register(sock, selectors.EVENT_READ, stream)

    def closed(self, stream: Stream, why: str) -> None:
        """Say the stream ended and plan a reconnection if the agent lives on (it may have dropped a
        stalled bridge); the wait doubles for an agent that keeps refusing."""
        if self.streams.get(stream.info.socket) is stream:
            del self.streams[stream.info.socket]
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(stream.sock)
            stream.sock.close()
        self.send(envelope.pack("close", s=stream.sid, why=why))
        old = self.retry.get(stream.info.socket)
        wait = min(RETRY_MAX_S, old.wait * 2) if old is not None else self.scan_s
        self.retry[stream.info.socket] = Retry(time.monotonic() + wait, wait)

    def read(self, stream: Stream) -> None:
        try:
            chunk = stream.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.closed(stream, f"connection to the agent failed: {exc.strerror or exc}")
            return
        if not chunk:
            self.closed(stream, "the agent closed the connection")
            return
        stream.buf += chunk
        try:
            frames = envelope.split_frames(stream.buf)
            if frames and not stream.greeted:
                check_hello(decode_one(unpack_map(frames[0][4:])))
                stream.greeted = True
                frames = frames[1:]
                self.retry.pop(stream.info.socket, None)  # a good connection: reconnect quickly next time
        except Exception as exc:  # noqa: BLE001 - one bad agent must never stop the others
            why = str(exc) if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
            self.closed(stream, f"bad stream from the agent: {' '.join(why.split())[:200]}")
            return
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            if batch and size + len(frame) > envelope.DATA_CHUNK:
                self.send(envelope.pack("data", s=stream.sid, d=b"".join(batch)))
                batch, size = [], 0
            batch.append(frame)
            size += len(frame)
        if batch:
            self.send(envelope.pack("data", s=stream.sid, d=b"".join(batch)))

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        from llmtop import __version__

        self.send(envelope.hello(socket.gethostname(), os.getpid(), self.target, __version__, PROTOCOL_VERSION))
        try:
            self.sel.register(self.in_fd, selectors.EVENT_READ, None)
            os.set_blocking(self.in_fd, False)
        except (OSError, ValueError):  # /dev/null or a file: epoll refuses them; they end at once
            while os.read(self.in_fd, 65536):
                pass
            return 0
        next_scan = next_tick = 0.0
        while True:
            now = time.monotonic()
            if now >= next_scan:
                self.scan(now)
                next_scan = now + self.scan_s
            if now >= next_tick:
                self.send(envelope.pack("tick", t=time.time()))
                next_tick = now + envelope.TICK_S
            timeout = max(0.0, min(next_scan, next_tick) - time.monotonic())
            for key, _ in self.sel.select(timeout):
                if key.data is None:
                    if not self.drain_stdin():
                        return 0
                else:
                    self.read(key.data)

    def drain_stdin(self) -> bool:
        """False once stdin has ended: the ssh connection is gone."""
        try:
            return bool(os.read(self.in_fd, 4096))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    def close(self) -> None:
        for stream in list(self.streams.values()):
            stream.sock.close()
        self.sel.close()


def run(args: argparse.Namespace) -> int:
    target = str(args.target or "all").strip()
    if not (target == "all" or target.isdigit() or (target.isprintable() and " " not in target)):
        return fail("bridge", f"bad target {target!r}: all, a PID or a job id")
    if os.isatty(1):
        return fail("bridge", "stdout is a terminal: this command is run by `llmtop watch ssh://HOST` "
                              "through ssh; to look at agents here use `llmtop ls` or `llmtop watch`")
    out_fd = os.dup(1)  # the envelopes' own descriptor ...
    os.dup2(2, 1)  # ... so that a stray print() lands on stderr, never inside the byte stream
    bridge = Bridge(target, out_fd, 0)
    try:
        return bridge.run()
    except BrokenPipeError:
        return 0  # the viewer went away: the normal end
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback in the viewer's status
        return fail("bridge", f"internal error ({type(exc).__name__}: {exc}); please report it")
    finally:
        bridge.close()
        with contextlib.suppress(OSError):
            os.close(out_fd)
