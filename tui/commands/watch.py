"""`llmtop watch PID|SOCKET|JOB`: open the dashboard on a running agent; `q` detaches, the run goes on.

A PID that is one rank of a job (or the pid of an `llmtop attach` of a launcher, or a job id as
`llmtop ls` shows it) opens every rank of that job on this host, with the Ranks view; a single
process opens as it always did."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from llmtop.protocol.paths import UnreachableTarget, list_agents, resolve_target
from llmtop.tui.commands.common import add_view_arguments, check_view_arguments, fail

HELP = ("Open the dashboard on a running llmtop agent (PID, socket path, or a job: every rank on this host); "
        "q detaches, the run goes on.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="the agent's process id, its socket path, or a job id (see `llmtop ls`)")
    add_view_arguments(parser, zoom_hint=True)


def run(args: argparse.Namespace) -> int:
    from llmtop.tui.commands import watch_remote  # ssh:// targets, --hosts, a Slurm allocation
    if watch_remote.wanted(args):
        return watch_remote.run(args)
    job = None
    try:
        path: Path | None = resolve_target(args.target)
    except ValueError as exc:
        if isinstance(exc, UnreachableTarget):
            return fail("watch", str(exc), 2)
        job = _job(args.target)
        if job is None:
            return fail("watch", str(exc), 1)
        path = None
    else:
        if args.target.isdigit():
            job = _job(args.target)
    bad = check_view_arguments("watch", args)
    if bad is not None:
        return bad
    from llmtop.tui.session.source import SocketSource
    from llmtop.tui.views.app import LlmtopApp

    source: Any
    if job is not None:
        from llmtop.protocol.paths import pid_alive
        from llmtop.tui.session.job import JobModel
        from llmtop.tui.session.job_source import HOST, JobSource

        match, info = job
        primary = Path(info.socket) if info is not None else None
        source = JobSource(JobModel(), match, primary=primary,
                           primary_key=f"{HOST}:{info.pid}" if info is not None else None,
                           primary_give_up=(lambda pid=info.pid: not pid_alive(pid)) if info is not None else None)
    else:
        source = SocketSource(path)
    app = LlmtopApp(source, refresh_hz=args.refresh, window_s=args.window)
    try:
        app.run()
    finally:
        source.stop()
    return 0


def _job(target: str) -> Any:
    """(JobMatch, AgentInfo | None) when the target names a job of several ranks here, else None."""
    from llmtop.tui.session.job_source import find_job

    try:
        return find_job(target, list_agents())
    except (OSError, ValueError):
        return None
