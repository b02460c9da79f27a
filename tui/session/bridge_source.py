"""The viewer end of ``llmtop bridge``: one remote host's agents, through the user's own ssh.

``BridgeSource(host, target, ssh_command)`` runs ``ssh HOST llmtop bridge TARGET`` (the ssh command
from the argument, else ``$LLMTOP_SSH``, else ``ssh``; the remote llmtop from ``$LLMTOP_REMOTE``, else
``llmtop``), reads the envelopes of ``protocol/bridge.py`` from its stdout and feeds each agent stream
into ``job.model_for(f"{host}:{pid}")`` exactly as ``SocketSource`` feeds a model (``with model.lock:
model.apply(event)``). ``run(job)`` blocks (call it in a worker thread); ``stop()`` ends it soon.

A dropped connection (ssh ended, the bridge died, 20 s of silence) is retried with a growing pause;
meanwhile every model of the host keeps what it had and says "reconnecting to HOST" (connection
``lost`` with that note). After reconnecting, the bridge relays each agent's snapshot again; it is
gathered apart and swapped in at its end (``snapshot_done``), so a model never shows an empty state
in between. An agent gone meanwhile stays as it was, marked "no longer on HOST" (or ended).

Hostile or broken input never escapes ``run``: a bad envelope is one line on every model of the host
and in ``status`` (then a reconnection); a bad agent frame ends that stream only; a bridge of another
version is refused in one line (``status``), and retried at the longest pause.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llmtop.protocol import bridge as envelope
from llmtop.protocol.events import Event, EventDecoder, SnapshotDone
from llmtop.protocol.frames import FrameDecoder, ProtocolError
from llmtop.tui.session.job import JobModel
from llmtop.tui.session.model import CONNECTING, ENDED, LIVE, LOST, SessionModel
from llmtop.tui.session.source import one_line

SSH_OPTIONS = ["-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3"]
READ_CHUNK = 262144
PENDING_MAX = 200_000  # events of a re-sent snapshot gathered before the swap (the agent's is smaller)


def ssh_argv(host: str, target: str, ssh_command: str | Sequence[str] | None = None,
             remote_llmtop: str | None = None) -> list[str]:
    """The command that runs the bridge on ``host``. Options are added only when the program is
    ssh itself (a wrapper gets ``HOST COMMAND``); the user's own options come first, and ssh keeps
    the first value it reads for an option, so theirs win. ``BatchMode``: no password prompt can
    fight the dashboard for the terminal (ssh runs in its own session, without one)."""
    if ssh_command is None:
        ssh_command = os.environ.get("LLMTOP_SSH") or "ssh"
    argv = shlex.split(ssh_command) if isinstance(ssh_command, str) else list(ssh_command)
    if not argv:
        raise ValueError("the ssh command is empty")
    if not host or host.startswith("-") or any(c.isspace() for c in host):
        raise ValueError(f"bad host {host!r}")  # never an ssh option (-oProxyCommand=…)
    remote = remote_llmtop or os.environ.get("LLMTOP_REMOTE") or "llmtop"
    is_ssh = os.path.basename(argv[0]) == "ssh"
    dest = host
    if is_ssh:
        argv += SSH_OPTIONS
        if ":" in host.rsplit("@", 1)[-1] and not host.startswith("["):
            dest = f"ssh://{host}"  # user@host:port: OpenSSH takes the port from an ssh:// destination
    return [*argv, dest, f"{remote} bridge {shlex.quote(target or 'all')}"]


@dataclass
class _Stream:
    """One agent stream of the current connection."""

    key: str
    model: SessionModel
    frames: FrameDecoder = field(default_factory=FrameDecoder)
    decoder: EventDecoder = field(default_factory=EventDecoder)
    pending: list[Event] | None = None  # a re-sent snapshot being gathered (the model keeps its state)
    live: bool = False
    dead: bool = False  # a bad frame: the rest of this stream is ignored


class BridgeSource:
    """One host's agents through ``ssh HOST llmtop bridge TARGET``, into a ``JobModel``."""

    def __init__(self, host: str, target: str = "all", ssh_command: str | Sequence[str] | None = None, *,
                 remote_llmtop: str | None = None, retry_s: float = 1.0, retry_max_s: float = 15.0,
                 silence_s: float = 20.0, on_status: Callable[[str, str], None] | None = None) -> None:
        self.host = host
        self.target = target or "all"
        self.argv = ssh_argv(host, self.target, ssh_command, remote_llmtop)
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self.silence_s = silence_s
        self.on_status = on_status
        self.status = "connecting"
        self.last_error = ""
        self.connections = 0  # bridges that said hello
        self.attempts = 0
        self.remote: dict = {}  # the bridge's hello: host, pid, llmtop version
        self.keys: set[str] = set()  # every stream key ever opened from this host
        self._streams: dict[int, _Stream] = {}
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: deque[str] = deque(maxlen=20)
        self._had_hello = False  # the current connection's bridge said hello

    # --- status --------------------------------------------------------------------------------

    def _say(self, text: str, error: bool = False) -> None:
        text = one_line(text)
        if error:
            self.last_error = text
        if text != self.status:
            self.status = text
            if self.on_status is not None:
                with contextlib.suppress(Exception):
                    self.on_status(self.host, text)

    def _mark_all(self, job: JobModel, state: str, note: str) -> None:
        """Set every model of this host that has not ended (set_connection keeps an ended one ended)."""
        for key in sorted(self.keys):
            model = job.model_for(key)
            with model.lock:
                model.set_connection(state, note)

    # --- the loop ------------------------------------------------------------------------------

    def run(self, job: JobModel) -> None:
        failures = 0
        while not self._stop.is_set():
            self.attempts += 1
            refused = False
            try:
                why, refused = self._connect_once(job)
            except Exception as exc:  # noqa: BLE001 - the reader thread must never die on input
                why = f"internal error reading the bridge ({type(exc).__name__}: {exc}); please report it"
            self._kill()
            self._streams.clear()
            if self._stop.is_set():
                return
            failures = 0 if self._had_hello and not refused else failures + 1
            wait = self.retry_max_s if refused else min(self.retry_max_s, self.retry_s * 2 ** min(max(0, failures - 1), 20))
            self._say(f"{self.host}: {why}" if refused else f"reconnecting to {self.host} in {wait:g} s: {why}",
                      error=True)
            self._mark_all(job, LOST, f"reconnecting to {self.host}: {one_line(why)}")
            self._stop.wait(wait)

    def _connect_once(self, job: JobModel) -> tuple[str, bool]:
        """One ssh connection, until it ends: why it ended, and whether the bridge was refused."""
        self._had_hello = False
        self._stderr.clear()
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, bufsize=0)
        except OSError as exc:
            return f"cannot run {shlex.join(self.argv[:1])}: {exc.strerror or exc}", False
        self._proc = proc
        threading.Thread(target=self._drain_stderr, args=(proc,), name=f"ssh-stderr-{self.host}",
                         daemon=True).start()
        decoder = envelope.EnvelopeDecoder()
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        last_data = time.monotonic()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not sel.select(0.5):
                    if time.monotonic() - last_data > self.silence_s:
                        return f"no data from {self.host} for {self.silence_s:g} s", False
                    continue
                try:
                    chunk = os.read(fd, READ_CHUNK)
                except OSError as exc:
                    chunk = b""
                    self._stderr.append(str(exc))
                if not chunk:
                    return self._ended(proc, decoder), False
                last_data = time.monotonic()
                try:
                    for env in decoder.feed(chunk):
                        if not self._had_hello:
                            self._hello(decoder)
                        self._handle(job, env)
                    if decoder.hello is not None and not self._had_hello:
                        self._hello(decoder)
                except ProtocolError as exc:
                    return str(exc), isinstance(exc, envelope.BridgeRefused)
        return "stopped", False

    def _hello(self, decoder: envelope.EnvelopeDecoder) -> None:
        self._had_hello = True
        self.connections += 1
        self.remote = dict(decoder.hello or {})
        self._say(f"{self.host}: connected (llmtop bridge {self.remote.get('llmtop', '?')})")

    def _ended(self, proc: subprocess.Popen[bytes], decoder: envelope.EnvelopeDecoder) -> str:
        """Why the bridge's output ended, in one line: its exit status and ssh's last words."""
        try:
            code = proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            code = None
        time.sleep(0.05)  # let the stderr thread take the last lines
        said = next((line for line in reversed(self._stderr) if line.strip()), "")
        if decoder.hello is None and decoder.received:
            return f"not an llmtop bridge: its output ended after {decoder.received} bytes" + (f" ({said})" if said else "")
        status = "ended" if code is None else f"exited with status {code}"
        where = "the bridge" if decoder.hello is not None else f"`{shlex.join(self.argv[:1])} {self.host}`"
        return f"{where} {status}" + (f": {said}" if said else "")

    def _drain_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        stream = proc.stderr
        if stream is None:
            return
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(stream.readline, b""):
                self._stderr.append(raw.decode("utf-8", "replace").rstrip())

    # --- envelopes -----------------------------------------------------------------------------

    def _handle(self, job: JobModel, env: dict) -> None:
        kind = env["k"]
        if kind == "data":
            stream = self._streams.get(env["s"])
            if stream is None:
                raise ProtocolError(f"bad bridge envelope: data for stream {env['s']} that was never opened")
            self._data(stream, env["d"])
        elif kind == "open":
            self._open(job, env)
        elif kind == "close":
            self._close(env)
        elif kind == "listed":
            opened = {s.key for s in self._streams.values()}
            for key in sorted(self.keys - opened):
                model = job.model_for(key)
                with model.lock:
                    if model.connection != ENDED:
                        model.set_connection(LOST, f"no longer on {self.host}")
            if not self._streams:
                self._say(f"{self.host}: connected, no agent yet")
        elif kind == "note":
            self._say(f"{self.host}: {env['why']}")

    def _open(self, job: JobModel, env: dict) -> None:
        if env["s"] in self._streams:
            raise ProtocolError(f"bad bridge envelope: stream {env['s']} opened twice")
        key = f"{self.host}:{env['pid']}"
        model = job.model_for(key)
        self.keys.add(key)
        stream = _Stream(key, model)
        with model.lock:
            if model.session is not None:
                stream.pending = []  # keep showing what we had until the new snapshot is complete
            else:
                model.set_connection(CONNECTING, f"via {self.host}")
        self._streams[env["s"]] = stream
        self._say(f"{self.host}: {len(self._streams)} agent stream{'s' if len(self._streams) != 1 else ''}")

    def _data(self, stream: _Stream, data: bytes) -> None:
        if stream.dead:
            return
        model = stream.model
        try:
            events = [e for e in (stream.decoder.decode(body) for body in stream.frames.feed(data)) if e is not None]
            if stream.pending is not None:
                stream.pending.extend(events)
                done = any(isinstance(e, SnapshotDone) for e in events)
                if not done and len(stream.pending) < PENDING_MAX:
                    return
                events, stream.pending = stream.pending, None
                with model.lock:
                    model.reset()  # the agent's snapshot is its whole state: swap it in at once
                    for event in events:
                        model.apply(event)
                    model.set_connection(LIVE)
                stream.live = True
                return
            with model.lock:
                for event in events:
                    model.apply(event)
                if not stream.live:
                    stream.live = True
                    model.set_connection(LIVE)
        except Exception as exc:  # noqa: BLE001 - a bad agent frame ends this stream, not the others
            stream.dead = True
            why = str(exc) if isinstance(exc, ProtocolError) else f"bad event ({type(exc).__name__}: {exc})"
            with model.lock:
                model.set_connection(LOST, one_line(f"{stream.key}: {why}"))

    def _close(self, env: dict) -> None:
        stream = self._streams.pop(env["s"], None)
        if stream is None:
            raise ProtocolError(f"bad bridge envelope: close of stream {env['s']} that was never opened")
        model = stream.model
        with model.lock:
            model.skipped += stream.decoder.skipped
            if stream.dead:
                return  # its own error stays on the status line
            if model.ended:
                model.set_connection(ENDED)
            else:
                model.set_connection(LOST, one_line(f"{env['why']} (on {self.host}; the bridge retries while it runs)"))

    # --- stopping ------------------------------------------------------------------------------

    def _kill(self) -> None:
        """End the ssh process we started: its stdin closed first (the bridge ends on EOF), then
        terminated, then killed."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()

    def stop(self) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()


class JobSources:
    """Several job sources (one ``BridgeSource`` per host) feeding one ``JobModel``: ``run(job)``
    blocks until every one has returned (after ``stop()``); each runs in its own thread, so a host
    that is slow to answer never holds up the others."""

    def __init__(self, sources: Sequence[BridgeSource]) -> None:
        self.sources = list(sources)
        self._threads: list[threading.Thread] = []

    def run(self, job: JobModel) -> None:
        self._threads = [threading.Thread(target=source.run, args=(job,), name=f"bridge-{source.host}",
                                          daemon=True) for source in self.sources]
        for thread in self._threads:
            thread.start()
        for thread in self._threads:
            thread.join()

    def stop(self) -> None:
        for source in self.sources:
            source.stop()

    def status(self) -> str:
        """One line: each host's state."""
        return "; ".join(source.status for source in self.sources)
