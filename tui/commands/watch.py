"""`llmtop watch PID|SOCKET`: open the dashboard on a running agent; `q` detaches, the run goes on."""

from __future__ import annotations

import argparse
import sys

from llmtop.protocol.paths import UnreachableTarget, resolve_target

HELP = "Open the dashboard on a running llmtop agent (PID or socket path); q detaches, the run goes on."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="the agent's process id or its socket path (see `llmtop ls`)")
    parser.add_argument("--refresh", type=float, default=4.0, metavar="HZ",
                        help="screen refresh rate in Hz (default 4); the agent's sampling is separate")
    parser.add_argument("--window", type=float, default=120.0, metavar="S",
                        help="sparkline time window in seconds (default 120; + and - zoom)")


def run(args: argparse.Namespace) -> int:
    try:
        path = resolve_target(args.target)
    except ValueError as exc:
        print(f"llmtop watch: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UnreachableTarget) else 1
    if args.refresh <= 0 or args.window <= 0:
        print("llmtop watch: --refresh and --window must be positive", file=sys.stderr)
        return 2
    from llmtop.tui.session.source import SocketSource
    from llmtop.tui.views.app import LlmtopApp

    source = SocketSource(path)
    app = LlmtopApp(source, refresh_hz=args.refresh, window_s=args.window)
    try:
        app.run()
    finally:
        source.stop()
    return 0
