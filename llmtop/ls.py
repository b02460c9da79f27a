"""`llmtop ls`: live agents on this machine, from the info files beside their sockets.

The ranks of a distributed job are listed under one job line (job id, launcher, ranks seen / world
size, uptime, script), sorted by rank; single processes are listed as before. Launchers (torchrun,
accelerate launch, deepspeed) run no agent, so they never appear.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

from llmtop.protocol.paths import AgentInfo, list_agents, search_dirs, socket_dir

HELP = "List live llmtop agents on this machine (pid, uptime, script, socket; ranks under their job)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object per agent")


def _uptime(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class Job:
    """The ranks of one job seen on this machine."""

    job: str
    launcher: str
    ranks: list[AgentInfo] = field(default_factory=list)

    @property
    def world_size(self) -> int | None:
        sizes = [a.world_size for a in self.ranks if a.world_size]
        return max(sizes) if sizes else None

    @property
    def started(self) -> float:
        return min(a.started for a in self.ranks)


def group(agents: list[AgentInfo]) -> list[Job | AgentInfo]:
    """Jobs (ranks sorted by rank, then pid) and single processes, in order of start. Ranks group by
    job id, or, with none, by the ``llmtop attach`` that started them and their world size."""
    jobs: dict[tuple, Job] = {}
    out: list[Job | AgentInfo] = []
    for a in agents:
        if not a.distributed:
            out.append(a)
            continue
        key = (a.job,) if a.job else ("attach", a.attach, a.world_size)
        job = jobs.get(key)
        if job is None:
            job = jobs[key] = Job(a.job, a.launcher)
            out.append(job)
        job.ranks.append(a)
    for job in jobs.values():
        job.ranks.sort(key=lambda a: (a.rank if a.rank is not None else -1, a.pid))
    out.sort(key=lambda item: item.started)
    return out


def _script(argv: list[str]) -> str:
    """The command line without leading interpreter flags (torchrun starts ranks as ``python -u``)."""
    i = 0
    while i < len(argv) and argv[i] in ("-u", "-B", "-O", "-OO", "-E", "-s", "-S", "-I", "-q"):
        i += 1
    return " ".join(argv[i:]) or "?"


def run(args: argparse.Namespace) -> int:
    agents = list_agents()
    if args.json:
        for a in agents:
            print(json.dumps(a.to_json()))
        return 0
    if not agents:
        looked = ", ".join(str(d) for d in search_dirs()) or f"{socket_dir()} (not there yet)"
        print(f"no live llmtop agents (looked in {looked})")
        return 0
    now = time.time()
    print(f"{'PID':>7}  {'UPTIME':>8}  SCRIPT")
    for item in group(agents):
        if isinstance(item, AgentInfo):
            print(f"{item.pid:>7}  {_uptime(now - item.started):>8}  {item.script}   [{item.socket}]")
            continue
        world = item.world_size
        seen = f"{len(item.ranks)}/{world if world is not None else '?'} ranks"
        print(f"{'job':>7}  {_uptime(now - item.started):>8}  {_script(item.ranks[0].argv)}   "
              f"[{item.launcher or '?'} job {item.job or '?'}, {seen}]")
        for a in item.ranks:
            where = f"rank {a.rank}" + (f" local {a.local_rank}" if a.local_rank is not None else "")
            where += f" node {a.node_rank}" if a.node_rank is not None else ""
            where += f" restart {a.restart}" if a.restart else ""
            print(f"{a.pid:>7}  {_uptime(now - a.started):>8}    {where}   [{a.socket}]")
    return 0
