"""Which rank of which distributed job this process is, from its launcher's environment.

``identity(env)`` is a pure function of the environment (tested with each launcher's real variables):

| launcher | detected by | job | rank / local / world / node |
|---|---|---|---|
| torchrun, ``python -m torch.distributed.run/launch`` | ``TORCHELASTIC_RUN_ID`` | the run id | ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``GROUP_RANK`` (restart: ``TORCHELASTIC_RESTART_COUNT``) |
| accelerate launch | torchrun's variables plus ``ACCELERATE_*`` | as torchrun (or master) | as torchrun |
| DeepSpeed (``deepspeed``) | ``RANK`` … with ``CROSS_RANK``/``LOCAL_SIZE`` | master address:port@start | ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``CROSS_RANK`` |
| Slurm (``srun``) | ``SLURM_PROCID`` | ``slurm:<SLURM_JOB_ID>[.<SLURM_STEP_ID>]`` | ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, ``SLURM_NODEID`` |
| MPI (Open MPI, MPICH/Intel MPI) | ``OMPI_COMM_WORLD_*``, ``PMI_RANK``/``PMI_SIZE`` | PMIx namespace, Open MPI job id, else master or host+parent | the launcher's rank, local rank, size, node rank |
| anything setting ``MASTER_ADDR``/``MASTER_PORT`` and ``RANK``/``WORLD_SIZE`` | those | ``address:port@start`` | ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``GROUP_RANK`` / ``NODE_RANK`` |

"start" is the launching process's start time (the ranks' common parent on a host), so two runs on
the same port are told apart. ``torch.multiprocessing.spawn`` children have none of these: their
identity is learnt late, from ``torch.distributed`` once it is initialised (``from_dist``: launcher
``spawn`` or ``dist``), by the agent thread at each tick.

``launcher_of(argv)`` names launcher processes (torchrun, accelerate launch, deepspeed): they start no
agent, their children (the ranks) do. ``recording_path`` says which file a rank records to.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SPAWN = "spawn"  # launcher name of torch.multiprocessing.spawn children (learnt late)
DIST = "dist"  # launcher name when only torch.distributed itself told us


@dataclass
class RankIdentity:
    job: str = ""
    launcher: str = ""
    rank: int | None = None
    local_rank: int | None = None
    world_size: int | None = None
    node_rank: int | None = None
    restart: int | None = None  # torchelastic's restart count (0: first attempt)

    @property
    def known(self) -> bool:
        return self.rank is not None

    @property
    def distributed(self) -> bool:
        """One rank of several: recorded to its own rank file, grouped under its job by ``llmtop ls``."""
        return self.rank is not None and (self.world_size or 0) > 1

    def fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _int(env: Mapping[str, str], *names: str) -> int | None:
    """The first of ``names`` that holds a non-negative integer."""
    for name in names:
        raw = env.get(name, "").strip()
        if raw.isdigit():
            return int(raw)
    return None


def _master_job(env: Mapping[str, str], started: float | None) -> str:
    addr, port = env.get("MASTER_ADDR", "").strip(), env.get("MASTER_PORT", "").strip()
    if not addr and not port:
        return ""
    job = f"{addr or '?'}:{port or '?'}"
    return f"{job}@{int(started)}" if started else job


def identity(env: Mapping[str, str], parent_started: float | None = None) -> RankIdentity:
    """This process's place in a distributed job, from its environment alone (no torch, no I/O).

    ``parent_started``: the start time of the process that launched this one, used with the master
    address and port as the job id when no launcher gives one. Empty identity for a single process."""
    accelerate = any(k in env for k in _ACCELERATE_VARS)
    if env.get("TORCHELASTIC_RUN_ID"):
        return RankIdentity(job=env["TORCHELASTIC_RUN_ID"], launcher="accelerate" if accelerate else "torchrun",
                            rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK"),
                            world_size=_int(env, "WORLD_SIZE"), node_rank=_int(env, "GROUP_RANK"),
                            restart=_int(env, "TORCHELASTIC_RESTART_COUNT"))
    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env and "RANK" not in env:
        step = env.get("SLURM_STEP_ID", "").strip()
        job = f"slurm:{env['SLURM_JOB_ID']}" + (f".{step}" if step else "")
        return RankIdentity(job=job, launcher="slurm", rank=_int(env, "SLURM_PROCID"),
                            local_rank=_int(env, "SLURM_LOCALID"),
                            world_size=_int(env, "SLURM_NTASKS", "SLURM_NPROCS"),
                            node_rank=_int(env, "SLURM_NODEID"))
    if "OMPI_COMM_WORLD_RANK" in env or ("PMI_RANK" in env and "RANK" not in env):
        job = (env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid") or env.get("PMI_JOBID")
               or _master_job(env, parent_started))
        if not job:
            job = f"mpi:{env.get('HOSTNAME', '')}@{int(parent_started)}" if parent_started else "mpi"
        return RankIdentity(job=job, launcher="mpi",
                            rank=_int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK"),
                            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"),
                            world_size=_int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"),
                            node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK"))
    if "RANK" in env and "WORLD_SIZE" in env:
        deepspeed = "CROSS_RANK" in env or ("LOCAL_SIZE" in env and "CROSS_SIZE" in env)
        launcher = "deepspeed" if deepspeed else "accelerate" if accelerate else "env"
        return RankIdentity(job=_master_job(env, parent_started), launcher=launcher,
                            rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK"),
                            world_size=_int(env, "WORLD_SIZE"),
                            node_rank=_int(env, "CROSS_RANK", "GROUP_RANK", "NODE_RANK"))
    return RankIdentity()


# Variables `accelerate launch` sets for its children (accelerate/utils/launch.py), never the user.
_ACCELERATE_VARS = frozenset({"ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_CPU",
                              "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_CONFIG_DS_FIELDS",
                              "ACCELERATE_DYNAMO_MODE", "ACCELERATE_DYNAMO_USE_FULLGRAPH"})


def from_dist(dist: Any, before: RankIdentity, env: Mapping[str, str], launcher: str,
              parent: str) -> RankIdentity | None:
    """The identity once ``torch.distributed`` is initialised in this process (the late path), or
    None while it is not. Reads the default group's rank and size: no collective, no wait.
    ``parent``: a string naming the spawning process (host and pid), the job id when the environment
    names none."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    rank, world = int(dist.get_rank()), int(dist.get_world_size())
    job = before.job or _master_job(env, None) or parent
    return RankIdentity(job=job, launcher=before.launcher or launcher, rank=rank,
                        local_rank=before.local_rank if before.local_rank is not None else _int(env, "LOCAL_RANK"),
                        world_size=world, node_rank=before.node_rank, restart=before.restart)


# --- launcher processes ------------------------------------------------------------------------------

_LAUNCHER_SCRIPTS = {"torchrun": "torchrun", "accelerate-launch": "accelerate", "deepspeed": "deepspeed",
                     "ds": "deepspeed"}
_LAUNCHER_MODULES = {"torch.distributed.run": "torchrun", "torch.distributed.launch": "torchrun",
                     "accelerate.commands.launch": "accelerate", "deepspeed.launcher.launch": "deepspeed",
                     "deepspeed.launcher.runner": "deepspeed"}
_OPTS_WITH_VALUE = ("-W", "-X", "-Q")


def launcher_of(argv: list[str]) -> str | None:
    """The launcher a Python process is (its full ``sys.orig_argv``), or None for anything else:
    ``torchrun``, ``python -m torch.distributed.run|launch``, ``accelerate launch``, ``deepspeed``
    and the per-node ``deepspeed.launcher.launch``. A launcher only starts and watches the ranks."""
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-m", "-c", "-"):
        i += 2 if argv[i] in _OPTS_WITH_VALUE else 1
    if i >= len(argv):
        return None
    if argv[i] == "-m":
        return _LAUNCHER_MODULES.get(argv[i + 1]) if i + 1 < len(argv) else None
    if argv[i] in ("-c", "-"):
        return None
    name = os.path.basename(argv[i])
    if name == "accelerate":
        return "accelerate" if argv[i + 1:i + 2] == ["launch"] else None
    return _LAUNCHER_SCRIPTS.get(name)


def spawn_child(argv: list[str]) -> bool:
    """A ``multiprocessing`` spawn child (``-c 'from multiprocessing.spawn import spawn_main …'
    --multiprocessing-fork``): a ``torch.multiprocessing.spawn`` rank, or a helper such as a
    DataLoader worker with the spawn start method; which one is known only once it unpickles its target."""
    return "--multiprocessing-fork" in argv and any("spawn_main" in a for a in argv)


def parent_started(ppid: int | None = None) -> float | None:
    """The start time of our parent process (the launcher on this host), or None if unknown."""
    try:
        import psutil

        return float(psutil.Process(os.getppid() if ppid is None else ppid).create_time())
    except Exception:
        return None


# --- recordings --------------------------------------------------------------------------------------


def rank_path(requested: str, rank: int) -> str:
    stem, suffix = os.path.splitext(requested)
    return f"{stem}.rank{rank}{suffix or '.lrec'}"


def pid_path(requested: str, pid: int) -> str:
    stem, suffix = os.path.splitext(requested)
    return f"{stem}.pid{pid}{suffix or '.lrec'}"


def recording_path(requested: str, ident: RankIdentity, pid: int, owner: bool, pending: bool) -> str | None:
    """Which file this process records to when ``LLMTOP_RECORD=requested``.

    A rank of a job of several ranks: ``stem.rank{R}.lrec`` beside ``requested``. A spawn child whose
    rank is not known yet (``pending``): ``stem.pid{P}.lrec``, renamed to its rank file once known
    (``claim_rank_file``). A single process: ``requested`` itself, by the process that owns the
    requested socket only (Python helpers of the script inherit ``LLMTOP_RECORD`` too); others: None.
    The writer locks its file, so a second live writer of one name writes beside it (RecordingWriter)."""
    if ident.distributed and ident.rank is not None:
        return rank_path(requested, ident.rank)
    if pending:
        return pid_path(requested, pid)
    return requested if owner else None


def _rename_unless_locked(src: str, dst: str, locked: str) -> bool:
    """Rename ``src`` to ``dst`` unless a live writer holds ``locked`` (RecordingWriter keeps an
    exclusive ``flock`` on its file for its life; a missing file holds no lock). True when renamed."""
    import fcntl

    try:
        fd = os.open(locked, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        fd = None
    except OSError:
        return False
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
        os.rename(src, dst)
        return True
    except OSError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def claim_rank_file(current: str, wanted: str) -> bool:
    """Rename the recording ``current`` (open, written by us) to ``wanted``, unless a live writer holds
    ``wanted`` (we keep our pid name then). A stale ``wanted`` (an earlier run's) is replaced atomically."""
    return _rename_unless_locked(current, wanted, wanted)


def keep_earlier_attempt(path: str, restart: int | None) -> str | None:
    """Before a restarted rank (torchelastic restart N > 0) records to ``path``: the failed attempt's
    file there is kept as ``stem.attempt{N-1}.rank{R}.lrec`` (not matched by ``stem.rank*.lrec``)
    instead of being emptied, unless a live writer holds it. Returns the new name, or None."""
    if not restart:
        return None
    folder, name = os.path.split(path)
    stem, _, rest = name.partition(".rank")
    if not rest or not os.path.exists(path):
        return None
    kept = os.path.join(folder, f"{stem}.attempt{restart - 1}.rank{rest}")
    return kept if _rename_unless_locked(path, kept, path) else None


def describe(ident: RankIdentity) -> str:
    """One line for messages: "rank 1/4 (local 1, node 0) of torchrun job 3f2a"."""
    if not ident.known:
        return "single process"
    parts = [f"local {ident.local_rank}" if ident.local_rank is not None else "",
             f"node {ident.node_rank}" if ident.node_rank is not None else ""]
    extra = ", ".join(p for p in parts if p)
    return (f"rank {ident.rank}/{ident.world_size if ident.world_size is not None else '?'}"
            + (f" ({extra})" if extra else "") + f" of {ident.launcher} job {ident.job or '?'}")


def is_spawned() -> bool:
    return spawn_child(list(getattr(sys, "orig_argv", sys.argv)))
