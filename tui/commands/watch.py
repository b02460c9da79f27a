"""`llmtop watch PID|SOCKET`: open the dashboard on a running agent; `q` detaches, the run goes on."""

from __future__ import annotations

import argparse

from llmtop.protocol.paths import UnreachableTarget, resolve_target
from llmtop.tui.commands.common import add_view_arguments, check_view_arguments, fail

HELP = "Open the dashboard on a running llmtop agent (PID or socket path); q detaches, the run goes on."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="the agent's process id or its socket path (see `llmtop ls`)")
    add_view_arguments(parser, zoom_hint=True)


def run(args: argparse.Namespace) -> int:
    from llmtop.tui.commands import watch_remote  # ssh:// targets, --hosts, a Slurm allocation
    if watch_remote.wanted(args):
        return watch_remote.run(args)
    try:
        path = resolve_target(args.target)
    except ValueError as exc:
        return fail("watch", str(exc), 2 if isinstance(exc, UnreachableTarget) else 1)
    bad = check_view_arguments("watch", args)
    if bad is not None:
        return bad
    from llmtop.tui.session.source import SocketSource
    from llmtop.tui.views.app import LlmtopApp

    source = SocketSource(path)
    app = LlmtopApp(source, refresh_hz=args.refresh, window_s=args.window)
    try:
        app.run()
    finally:
        source.stop()
    return 0
