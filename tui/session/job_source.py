"""The local job source: every agent of one job on this host, each stream into its own model.

A job is chosen by a ``JobMatch``: the pid of the ``llmtop attach`` that started the process tree
(``attach``), a job id (``job``), or the pid of one rank (resolved to its job). Discovery runs again
every ``discover_s`` (ranks come up late; an elastic restart brings new pids for the same rank) and
starts one ``SocketSource`` per new agent in its own thread, feeding ``job.model_for("host:pid")``.
A source whose process is gone stops retrying; its model keeps what it had (lost, or ended).

Agent info files gain ``job``/``rank``/``attach`` (another part of issue 16); until a file has them
they read as absent, and the process tree stands in: an agent belongs to an attach run if its
process descends from the attach pid, and a rank's job is its launcher's other children.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from llmtop.protocol.events import CollectiveWait, End, Event, LayerStats, Session, Step
from llmtop.protocol.paths import AgentInfo, list_agents, pid_alive
from llmtop.tui.session.job import Identity, JobModel
from llmtop.tui.session.model import LIVE, LOST, SessionModel
from llmtop.tui.session.source import SocketSource

# processes that launch ranks and are not ranks themselves (they may still carry an agent from an
# older llmtop: they never have steps)
LAUNCHER_WORDS = ("torchrun", "torch.distributed.run", "torch.distributed.launch", "accelerate", "deepspeed")
HOST = socket.gethostname()


@dataclass(frozen=True)
class JobMatch:
    """Which agents belong to the job: by attach pid, by job id, or the launcher's children (``parent``)."""

    attach: int | None = None
    job: str = ""
    parent: int | None = None  # the launcher whose children are the ranks (info files without a job)
    pids: frozenset[int] = frozenset()  # these processes are in, whatever else

    def matches(self, info: AgentInfo) -> bool:
        if info.pid in self.pids:
            return True
        job = str(getattr(info, "job", "") or "")
        if self.job and job == self.job:
            return True
        if self.attach is not None:
            attach = getattr(info, "attach", None)
            if attach is not None:
                return int(attach) == self.attach
            return descends_from(info.pid, self.attach)
        if self.parent is not None and not job:
            return parent_pid(info.pid) == self.parent
        return False


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` from /proc (None where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        # the command name may hold spaces and parentheses: the fields after its last ")" are safe
        return int(data[data.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descends_from(pid: int, ancestor: int, depth: int = 32) -> bool:
    for _ in range(depth):
        if pid == ancestor:
            return True
        parent = parent_pid(pid)
        if parent is None or parent <= 1:
            return False
        pid = parent
    return False


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def identity_from_env(pid: int) -> Identity | None:
    """Rank and world size from the launcher's variables in a local process's environment (readable
    for our own processes): for agents whose Session does not carry them."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            pairs = [p.split(b"=", 1) for p in f.read().split(b"\0") if b"=" in p]
    except OSError:
        return None
    env = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
                                ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")):
        rank, world = env.get(rank_var, ""), env.get(world_var, "")
        if rank.isdigit():
            job = env.get("TORCHELASTIC_RUN_ID", "") or env.get("SLURM_JOB_ID", "")
            launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else ""
            return Identity(int(rank), int(world) if world.isdigit() else None, job, launcher)
    return None


def is_launcher(argv: list[str]) -> bool:
    """A launcher's command line (``torchrun …``, ``python -m torch.distributed.run …``)."""
    head = " ".join(argv[:3])
    return any(word in head for word in LAUNCHER_WORDS)


def match_for_pid(pid: int, agents: list[AgentInfo] | None = None) -> JobMatch | None:
    """The job of the agent in process ``pid``: its job id, else its attach run, else its launcher's
    children; None when no agent runs in ``pid`` (an ``llmtop attach`` pid is matched by ``attach``)."""
    agents = list_agents() if agents is None else agents
    info = next((a for a in agents if a.pid == pid), None)
    if info is None:
        if any(getattr(a, "attach", None) == pid or descends_from(a.pid, pid) for a in agents):
            return JobMatch(attach=pid)
        return None
    job = str(getattr(info, "job", "") or "")
    if job:
        return JobMatch(job=job, pids=frozenset({pid}))
    parent = parent_pid(pid)
    if parent is not None and is_launcher(cmdline(parent)):
        return JobMatch(parent=parent, pids=frozenset({pid}))
    return JobMatch(pids=frozenset({pid}))


def job_agents(match: JobMatch, agents: list[AgentInfo] | None = None) -> list[AgentInfo]:
    """The live agents of this host that belong to the job (launchers left out)."""
    agents = list_agents() if agents is None else agents
    return [a for a in agents if match.matches(a) and not is_launcher(a.argv)]


class JobSource:
    """Feeds ``job`` from every local agent that ``match`` selects, discovering again every ``discover_s``.

    ``primary`` (optional): a socket to follow from the start whether or not discovery lists it
    (``llmtop attach``'s own socket, claimed by the first rank); its stream key is ``primary_key``.
    ``give_up`` (optional) is asked between discoveries: True ends discovery (the attached launcher
    has ended); the sources already running end when their processes do.
    """

    def __init__(self, job: JobModel, match: JobMatch, *, primary: str | os.PathLike[str] | None = None,
                 discover_s: float = 0.5, give_up: Callable[[], bool] | None = None,
                 primary_give_up: Callable[[], bool] | None = None, primary_key: str | None = None,
                 lister: Callable[[], list[AgentInfo]] = list_agents) -> None:
        self.job = job
        self.match = match
        self.discover_s = discover_s
        self.give_up = give_up
        self.lister = lister
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.sources: dict[str, SocketSource] = {}  # stream key → its source
        self.paths: dict[str, Path] = {}  # stream key → its socket (the record key records the rank shown)
        self.threads: dict[str, threading.Thread] = {}  # stream key → the thread running its source
        self.primary = Path(primary) if primary is not None else None
        self.primary_key = primary_key or (f"{HOST}:{self.primary.name}" if self.primary is not None else None)
        self.path = self.primary  # what the app records from (R) and reads the log beside
        self.primary_give_up = primary_give_up
        if self.primary_key is not None:
            job.model_for(self.primary_key)  # there from the start: the app shows it first

    def run(self, model: SessionModel | None = None) -> None:
        """Discover until stopped (the Source interface; ``model`` is unused: each stream has its own)."""
        if self.primary is not None:
            self._start(self.primary, self.primary_key or "", self.primary_give_up)
        while not self._stop.is_set():
            self.discover()
            if self.give_up is not None and self.give_up():
                self.discover()  # a rank that came up just before the end
                break
            self._stop.wait(self.discover_s)
        for t in list(self.threads.values()):
            while t.is_alive() and not self._stop.is_set():
                t.join(0.2)

    def discover(self) -> int:
        """Start a source for every agent of the job not followed yet; returns how many started."""
        try:
            agents = job_agents(self.match, self.lister())
        except Exception:  # noqa: BLE001 - an unreadable directory now may be readable at the next pass
            return 0
        started = 0
        for info in agents:
            if self.primary is not None and Path(info.socket) == self.primary and self._following(self.primary_key):
                # the primary source follows whoever listens there (a restarted rank 0 too)
                if self.primary_key is not None and self.primary_key not in self.job.hints:
                    hint = identity_from_env(info.pid)
                    if hint is not None:
                        self.job.hints[self.primary_key] = hint
                continue
            key = f"{getattr(info, 'host', '') or HOST}:{info.pid}"
            if key in self.sources:
                continue  # one source per process: a new process on an old socket path is a new stream
            pid = info.pid
            hint = identity_from_env(pid)
            if hint is not None:
                self.job.hints[key] = hint
            self._start(Path(info.socket), key, lambda pid=pid: not pid_alive(pid))
            started += 1
        return started

    def _following(self, key: str | None) -> bool:
        thread = self.threads.get(key or "")
        return thread is not None and thread.is_alive()

    def _start(self, path: Path, key: str, give_up: Callable[[], bool] | None) -> None:
        with self._lock:
            if self._stop.is_set() or key in self.sources:
                return
            source = SocketSource(path, give_up=give_up)
            self.sources[key] = source
            self.paths[key] = path
            model = self.job.model_for(key)
            self.job.hosts[key] = key.rsplit(":", 1)[0]
            thread = threading.Thread(target=_run_quietly, args=(source, model), name=f"job-{key}", daemon=True)
            self.threads[key] = thread
        thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            sources = list(self.sources.values())
        for source in sources:
            source.stop()


def _run_quietly(source: SocketSource, model: SessionModel) -> None:
    try:
        source.run(model)
    except Exception as exc:  # noqa: BLE001 - one rank's broken stream must not end the others
        with model.lock:
            model.set_connection(LOST, f"source failed: {exc}")


def describe(match: JobMatch) -> str:
    if match.job:
        return f"job {match.job}"
    if match.attach is not None:
        return f"the processes of llmtop attach {match.attach}"
    return "pid " + ", ".join(str(p) for p in sorted(match.pids))


class JobEventsSource:
    """Fixed event lists, one per stream (tests, benchmarks, demos): each applied to its model as a
    live source would, then ``done`` is set."""

    def __init__(self, job: JobModel, streams: dict[str, list[Event]], lost: Iterable[str] = ()) -> None:
        self.job = job
        self.streams = streams
        self.lost = set(lost)  # streams whose connection ends lost (their process died)
        self.done = threading.Event()
        self._stop = threading.Event()
        for key in streams:
            job.model_for(key)

    def run(self, model: SessionModel | None = None) -> None:
        for key, events in self.streams.items():
            m = self.job.model_for(key)
            with m.lock:
                m.set_connection(LIVE)
                for event in events:
                    if self._stop.is_set():
                        break
                    m.apply(event)
                if key in self.lost:
                    m.set_connection(LOST, "connection lost")
        self.done.set()

    def stop(self) -> None:
        self._stop.set()


def synthetic_job(ranks: int, steps: int = 40, *, slow_rank: int | None = None, slow: float = 1.3,
                  job: str = "run-42", waiting: int | None = None,
                  ended: int | None = None) -> dict[str, list[Event]]:
    """Streams of a synthetic ``ranks``-rank DDP job built from the canned session's real events:
    rank ``slow_rank`` computes ``slow`` times longer and the others wait for it in collectives
    (``comm_ms``); ``waiting`` is stuck in an all_reduce; ``ended`` exited with code 1."""
    from llmtop.tui.session.canned import PID, session_events

    streams: dict[str, list[Event]] = {}
    for r in range(ranks):
        events = session_events(steps, seed=r, n_layer=2, generations=0, step_ms=100.0)
        out: list[Event] = []
        factor = slow if r == slow_rank else 1.0
        for e in events:
            if isinstance(e, Session):
                e = replace(e, pid=PID + r, job=job, launcher="torchrun", rank=r, local_rank=r % 8,
                            world_size=ranks, node_rank=r // 8)
            elif isinstance(e, Step):
                busy = e.dur_ms * factor / slow if slow_rank is not None else e.dur_ms * 0.8
                e = replace(e, dur_ms=e.dur_ms, comm_ms=max(0.0, e.dur_ms - busy), comm_calls=3,
                            comm_bytes=4 * 124_000_000)
            elif isinstance(e, LayerStats) and factor != 1.0:
                e = replace(e, fwd_ms=[v * factor for v in e.fwd_ms])
            out.append(e)
        last_t = max((getattr(e, "t", 0.0) for e in out), default=0.0)
        if r == waiting:
            out.append(CollectiveWait(t=last_t + 6.0, op="all_reduce", since=last_t, seq=steps * 3, step=steps))
        if r == ended:
            out.append(End(t=last_t, exit_code=1, reason="exception"))
        streams[f"box:{PID + r}"] = out
    return streams


def find_job(target: str, agents: list[AgentInfo]) -> tuple[JobMatch, AgentInfo | None] | None:
    """What ``llmtop watch TARGET`` means as a job: a rank's pid (its job, the agent itself first),
    an ``llmtop attach`` pid, or a job id. None when the target is none of these, or names a single
    process (then it is watched alone, as ever)."""
    if target.isdigit():
        pid = int(target)
        info = next((a for a in agents if a.pid == pid), None)
        match = match_for_pid(pid, agents)
        if match is None:
            return None
        members = job_agents(match, agents)
        world = int(getattr(info, "world_size", None) or 0) if info is not None else 0
        if len(members) > 1 or world > 1 or (info is None and members):
            return match, info
        return None
    match = JobMatch(job=target)
    return (match, None) if job_agents(match, agents) else None
