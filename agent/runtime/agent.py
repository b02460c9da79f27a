"""The running agent: the agent thread, history for late joiners, clean stop, abandon in a forked child.

Hooks (instruments) call ``emit()`` from any thread; it only appends to a bounded deque. Every
tick the agent thread polls the instruments, samples the host and the GPUs, encodes each event
once, keeps it in the history rings and hands the bytes to the socket server and the recording.
Options from the environment and the socket choice are in options.py; process-wide start/stop,
exit and exception hooks and the fork handlers in process.py.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from llmtop.agent.instruments.host import HostSampler
from llmtop.agent.instruments.nvml import NvmlSampler
from llmtop.agent.runtime import core, ranks
from llmtop.agent.runtime.core import Options
from llmtop.agent.runtime.history import History
from llmtop.agent.runtime.options import options_from_env, resolve_socket
from llmtop.protocol.events import (
    AgentWarning,
    End,
    Event,
    Session,
    Step,
    encode,
)
from llmtop.protocol.paths import socket_dir, socket_path_for

# A kill -9 loses at most this much of the agent's own recording (README, tests/test_recording.py):
# events reach the writer at the next tick, and a block is written at the last tick before its oldest
# frame would be older than RECORD_LOSS_S - tick.
RECORD_LOSS_S = 1.0
QUEUE_MAX = 200_000  # events waiting for the next tick; beyond this the oldest are lost (and counted)
EXIT_BUDGET_S = 2.0
EXIT_HARD_LIMIT_S = 15.0  # the longest the exit waits for a tick that is inside torch


def record_flush_s(tick_s: float) -> float:
    """The writer's block age for a recording that loses at most ``RECORD_LOSS_S`` (or one tick, when
    ticks are longer) to a kill -9: an event waits up to one tick to reach the writer."""
    return max(0.0, RECORD_LOSS_S - tick_s)


class Agent:
    """Implements ``core.Context`` for instruments and the calls ``llmtop.agent`` makes."""

    def __init__(self, options: Options | None = None, instruments: list[Any] | None = None) -> None:
        self.options = options or options_from_env()
        self.pid = os.getpid()
        self.current_step = 0
        self.started = time.time()
        self.socket_path: Path | None = None
        self.server: Any = None
        self.writer: Any = None
        self.ticks = 0
        self.cpu_s = 0.0  # agent thread CPU time (the server thread keeps its own)
        self.exc_text: str | None = None
        self._instruments_given = instruments
        self._instruments: list[Any] = []
        self._queue: deque[Event] = deque(maxlen=QUEUE_MAX)
        self._lock = threading.Lock()
        # Held for the length of a tick. fork() waits for it (at most FORK_WAIT_S), so a child is
        # not forked while the agent thread is inside torch holding its internal locks.
        self._tick_lock = threading.RLock()
        self._history = History(self.options.history)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._manual: Any = None
        self._manual_last: float | None = None
        self._stopped = False
        self._abandoned = False
        self._bad_kinds: set[str] = set()
        self.queue_dropped = 0  # events lost because QUEUE_MAX waited for one tick (oldest first)
        self._queue_dropped_told = 0
        self._cpu_mark = (time.monotonic(), 0.0)
        self._cpu_pct: float | None = None
        self._host: HostSampler | None = None
        self._nvml: NvmlSampler | None = None
        self._versions = ("", "")
        # Which rank of which job, from the launcher's environment; a torch.multiprocessing.spawn
        # child learns it late, from torch.distributed (checked each tick while unknown).
        self._spawned = ranks.is_spawned()
        env = os.environ
        self.identity = ranks.identity(env, ranks.parent_started() if "MASTER_ADDR" in env else None)
        self._rank_pending = not self.identity.known
        self._record_pending = False  # recording under a pid name until the rank is known
        self.session = self._make_session()

    # --- Context (any thread, never blocks) -------------------------------------------------------

    def emit(self, event: Event) -> None:
        q = self._queue
        if len(q) == q.maxlen:  # the append below pushes the oldest out: count it
            self.queue_dropped += 1
        q.append(event)

    def warn(self, source: str, message: str) -> None:
        self.emit(AgentWarning(t=time.time(), source=source, message=message))

    @property
    def stopping(self) -> bool:
        """True once the agent is shutting down: instruments should not start expensive work."""
        return self._stop.is_set()

    def set_manual_step(self, fn: Any) -> None:
        self._manual = fn

    def manual_step(self) -> None:
        fn = self._manual
        if fn is not None:
            fn()
            return
        # No step tracker installed: still count steps and time them wall-clock.
        now = time.perf_counter()
        last, self._manual_last = self._manual_last, now
        self.current_step += 1
        if last is not None:
            dur = (now - last) * 1e3
            self.emit(Step(step=self.current_step, t=time.time(), dur_ms=dur, phases={"other": dur}))

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> Agent:
        opts = self.options
        try:
            self._host = HostSampler()
        except Exception as exc:
            self.warn("host", f"host sampling disabled: {exc}")
        self._nvml = NvmlSampler()
        if self._nvml.enabled:
            self.session.devices = list(self._nvml.names)
        self._start_server()
        requested = opts.socket
        if opts.record:
            # LLMTOP_RECORD is inherited by every process of a launch: each rank of a job writes its
            # own stem.rank{R}.lrec, a spawn child stem.pid{P}.lrec until its rank is known, and of
            # a single process's Python helpers only the process owning the requested socket writes.
            owner = not requested or self.socket_path == Path(str(requested))
            self._record_pending = self._spawned and not self.identity.known
            path = ranks.recording_path(opts.record, self.identity, self.pid, owner, self._record_pending)
            if path is not None:
                if self.identity.distributed:
                    ranks.keep_earlier_attempt(path, self.identity.restart)
                self._start_writer(path)
        self._publish([self.session])
        if self.server is not None:
            # accepting only now: a viewer connecting at once still gets the session first
            self.server.start()
        instruments = self._instruments_given
        if instruments is None:
            from llmtop.agent.instruments import default_instruments

            instruments = default_instruments(opts, self._instrument_lost)
        for inst in instruments:
            try:
                inst.install(self)
            except Exception as exc:
                name = str(getattr(inst, "name", type(inst).__name__))
                self._instrument_lost(name, f"install failed, instrument disabled: {type(exc).__name__}: {exc}")
                self._safe_uninstall(inst)
                continue
            self._instruments.append(inst)
        self._thread = threading.Thread(target=self._run, name="llmtop-agent", daemon=True)
        self._thread.start()
        return self

    def _start_server(self) -> None:
        from llmtop.agent.runtime.server import AddressInUse, Server

        opts = self.options
        wanted = resolve_socket(opts)
        candidates = [wanted]
        fallback = wanted.parent / f"{self.pid}.sock"
        if fallback != wanted:
            candidates.append(fallback)
        if socket_path_for(self.pid) not in candidates:
            candidates.append(socket_path_for(self.pid))
        last: Exception | None = None
        for path in candidates:
            try:
                self.server = Server(
                    path, self._lock, self._history.snapshot, self.warn,
                    client_buffer=opts.client_buffer, stall_s=float(opts.stall_s),
                    cpu_pct=lambda: self._cpu_pct, started=self.started,
                    private_dir=path.parent == socket_dir(),
                    max_clients=opts.max_clients, max_pending=opts.max_pending, handshake_s=opts.handshake_s,
                    argv=self.session.argv, info=self.info_fields(),
                )
            except AddressInUse as exc:
                last = exc
                continue
            except OSError as exc:
                last = exc
                continue
            self.socket_path = path
            return
        print(f"llmtop: agent running without a socket ({last})", file=sys.stderr)

    def _start_writer(self, path: str) -> None:
        from llmtop.protocol.recording import RecordingWriter  # only a recording agent needs it

        try:
            self.writer = RecordingWriter(path, self.session, flush_s=record_flush_s(self.options.tick_s))
        except Exception as exc:
            print(f"llmtop: cannot record to {path}: {exc}", file=sys.stderr)
            self.warn("recording", f"cannot record to {path}: {exc}")

    def stop(self, reason: str = "exit", traceback_text: str | None = None,
             timeout: float = EXIT_BUDGET_S) -> None:
        """Final poll, flush and ``End``; close the socket and the recording. Idempotent."""
        if self._stopped or self._abandoned:
            return
        self._stopped = True
        deadline = time.monotonic() + timeout
        self._stop.set()
        thread = self._thread
        clean = True
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout * 0.5)
            if thread.is_alive():
                # A tick is still running, maybe inside torch (a FLOP count, an op profile). Wait
                # for it: a daemon thread that is in C++ with the GIL released when the interpreter
                # finalizes is killed by pthread_exit through C++ frames, and the process aborts
                # ("terminate called without an active exception"), losing the exit code.
                thread.join(EXIT_HARD_LIMIT_S)
            clean = not thread.is_alive()
        end = End(t=time.time(), traceback=traceback_text, reason=reason if not traceback_text else "exception")
        if clean:
            self._tick()
        # the reverse of install order: two instruments wrapping the same function unwind cleanly
        for inst in reversed(self._instruments):
            self._safe_uninstall(inst)
        self._instruments = []
        try:
            frame = encode(end)
        except Exception:
            frame = encode(End(t=end.t, reason=end.reason))
        with self._lock:
            self._history.add(end, frame)
        if self.server is not None:
            self.server.close([frame], timeout=max(0.1, deadline - time.monotonic() - 0.3))
        if self.writer is not None:
            try:
                self.writer.close(end)
            except Exception:
                pass
            self.writer = None
        if self._nvml is not None:
            self._nvml.close()

    def abandon(self) -> None:
        """In a forked child: drop the agent silently, leaving the parent's socket and files alone."""
        self._abandoned = True
        self._stop.set()
        self._instruments = []
        if self.server is not None:
            try:
                self.server.abandon()
            except Exception:
                pass
        self.server = None
        self.writer = None  # the parent owns the file; never flush or close it here

    # --- agent thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        tick = self.options.tick_s
        while not self._stop.wait(tick):
            self._tick()

    def _tick(self) -> None:
        with self._tick_lock:
            self._tick_locked()

    def _tick_locked(self) -> None:
        t0 = time.thread_time()
        try:
            now = time.time()
            events = self._drain()
            for inst in list(self._instruments):
                core.let_script_run()
                try:
                    events.extend(inst.poll(now) or ())
                except Exception as exc:
                    self._report(inst, "poll", exc)
                    self._instruments.remove(inst)
                    self._safe_uninstall(inst)
            if self._host is not None:
                try:
                    events.append(self._host.sample(now))
                except Exception as exc:
                    self._host = None
                    self.warn("host", f"host sampling stopped: {type(exc).__name__}: {exc}")
            if self._nvml is not None and self._nvml.enabled:
                try:
                    events.extend(self._nvml.sample(now))
                except Exception as exc:
                    self._nvml.enabled = False
                    self.warn("nvml", f"GPU sampling stopped: {type(exc).__name__}: {exc}")
            if self._refresh_versions() | self._learn_rank():
                events.append(self.session)
            events.extend(self._drain())
            self._publish(events, now)
        except Exception as exc:  # the agent thread must survive anything
            try:
                self.warn("agent", f"tick failed: {type(exc).__name__}: {exc}")
            except Exception:
                pass
        self.ticks += 1
        self.cpu_s += time.thread_time() - t0
        self._update_cpu_pct()

    def _drain(self) -> list[Event]:
        out: list[Event] = []
        q = self._queue
        try:
            while True:
                out.append(q.popleft())
        except IndexError:
            pass
        lost = self.queue_dropped - self._queue_dropped_told
        if lost:  # said in the stream, so the viewer and the recording know what is missing
            self._queue_dropped_told += lost
            out.append(AgentWarning(t=time.time(), source="agent",
                                    message=f"{lost} events lost: more than {q.maxlen} waited for one tick "
                                            f"({self.queue_dropped} in all)"))
        return out

    def _publish(self, events: list[Event], now: float | None = None) -> None:
        pairs: list[tuple[Event, bytes]] = []
        for i, ev in enumerate(events):
            if i % core.YIELD_EVERY == core.YIELD_EVERY - 1:
                core.let_script_run()
            try:
                pairs.append((ev, encode(ev)))
            except Exception as exc:
                if ev.KIND not in self._bad_kinds:
                    self._bad_kinds.add(ev.KIND)
                    warning = AgentWarning(t=time.time(), source="encode",
                                           message=f"a {ev.KIND!r} event could not be encoded and was skipped "
                                                   f"(further ones are skipped silently): {exc}")
                    pairs.append((warning, encode(warning)))
        if not pairs:
            return
        with self._lock:
            for ev, frame in pairs:
                self._history.add(ev, frame)
            if self.server is not None:
                self.server.broadcast([f for _, f in pairs])
        writer = self.writer
        if writer is not None:
            try:
                for ev, frame in pairs:
                    writer.append(frame, ev)
                mono = time.monotonic()
                if writer.wants_keyframe(mono):
                    with self._lock:
                        snap = self._history.snapshot()
                    writer.keyframe(snap)
                # written now if waiting for the next tick would leave the oldest frame over flush_s old
                writer.maybe_flush(mono + self.options.tick_s)
            except Exception as exc:
                self.writer = None
                self.warn("recording", f"recording stopped: {type(exc).__name__}: {exc}")

    def _update_cpu_pct(self) -> None:
        t_mark, cpu_mark = self._cpu_mark
        now = time.monotonic()
        cpu = self.total_cpu_s
        if now - t_mark >= 1.0:
            self._cpu_pct = 100.0 * (cpu - cpu_mark) / (now - t_mark)
            self._cpu_mark = (now, cpu)

    @property
    def total_cpu_s(self) -> float:
        """CPU time of the agent thread and the server thread together."""
        return self.cpu_s + (self.server.cpu_s if self.server is not None else 0.0)

    def _instrument_lost(self, source: str, message: str) -> None:
        """An instrument that could not be loaded or installed: the run goes on without it, and the
        user is told once, on stderr (one line) and as an ``AgentWarning`` for the viewers."""
        print(f"llmtop: {source}: {message}", file=sys.stderr)
        self.warn(source, message)

    def _report(self, inst: Any, where: str, exc: BaseException) -> None:
        name = getattr(inst, "name", type(inst).__name__)
        self.warn(str(name), f"{where} failed, instrument disabled: {type(exc).__name__}: {exc}")

    @staticmethod
    def _safe_uninstall(inst: Any) -> None:
        try:
            inst.uninstall()
        except Exception:
            pass

    # --- session -------------------------------------------------------------------------------------

    def _make_session(self) -> Session:
        if self._spawned:  # `python -c "from multiprocessing.spawn …"`: the parent's argv says what runs
            argv = list(sys.argv)
        else:
            argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:])
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self.options).items()}
        session = Session(pid=self.pid, argv=argv, cwd=os.getcwd(), started=self.started,
                          hostname=socket.gethostname(), python=platform.python_version(),
                          devices=["cpu"], options=options)
        self._apply_identity(session)
        return session

    def _apply_identity(self, session: Session) -> None:
        for name, value in self.identity.fields().items():
            setattr(session, name, value)

    def info_fields(self) -> dict[str, Any]:
        """What the info file beside the socket says besides pid, socket, argv and started."""
        attach = os.environ.get("LLMTOP_ATTACH", "")
        return {**self.identity.fields(), "host": self.session.hostname,
                "attach": int(attach) if attach.isdigit() else None}

    def _learn_rank(self) -> bool:
        """The late path (torch.multiprocessing.spawn children, or a script that initialises
        torch.distributed itself with no launcher): once the default process group exists, take its
        rank and size (no collective), rewrite the info file and claim the rank's recording file.
        True when the session changed. Only looks if the script imported torch.distributed."""
        if not self._rank_pending:
            return False
        dist = sys.modules.get("torch.distributed")
        if dist is None:
            return False
        launcher = ranks.SPAWN if self._spawned else ranks.DIST
        try:
            found = ranks.from_dist(dist, self.identity, os.environ, launcher,
                                    f"{launcher}:{self.session.hostname}:{os.getppid()}")
        except (AttributeError, ImportError):
            return False  # torch is still being imported on the script's thread: look again next tick
        except Exception as exc:
            self._rank_pending = False
            self.warn("ranks", f"cannot read the rank from torch.distributed: {type(exc).__name__}: {exc}")
            return False
        if found is None:
            return False
        self._rank_pending = False
        self.identity = found
        self._apply_identity(self.session)
        if self.server is not None:
            try:
                self.server.update_info(self.info_fields())
            except Exception as exc:
                self.warn("ranks", f"cannot rewrite the agent's info file: {type(exc).__name__}: {exc}")
        self._claim_rank_recording()
        return True

    def _claim_rank_recording(self) -> None:
        writer = self.writer
        if writer is None or not self._record_pending or not self.identity.distributed:
            return
        self._record_pending = False
        wanted = ranks.rank_path(str(self.options.record), int(self.identity.rank or 0))
        if ranks.claim_rank_file(writer.path, wanted):
            writer.path = wanted
        else:
            self.warn("recording", f"{wanted} is being written by another process; this rank records to "
                                   f"{writer.path}")

    def _refresh_versions(self) -> bool:
        """Torch and transformers are imported after the agent starts; send their versions once known."""
        found = tuple(getattr(sys.modules.get(m), "__version__", "") or "" for m in ("torch", "transformers"))
        found = tuple(str(v) for v in found)
        if found == self._versions:
            return False
        self._versions = found
        self.session.torch, self.session.transformers = found
        return True
