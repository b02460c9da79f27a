"""`llmtop replay FILE`: the dashboard on a recording, with play/pause, seek, step and speed controls.

The Textual side (``ReplayApp``, the transport bar) is in ``llmtop.tui.views.replay``; it is imported
only once the arguments are known to be good.
"""

from __future__ import annotations

import argparse
import sys

from llmtop.protocol.recording import RecordingError
from llmtop.tui.session.recording_source import MAX_SPEED, MIN_SPEED, RecordingSource

HELP = "Open the dashboard on a recording, with play/pause, seek, step and speed controls."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a recording (LLMTOP_RECORD, `llmtop attach --record`, `llmtop record`)")
    parser.add_argument("--speed", type=float, default=1.0, metavar="X",
                        help=f"replay speed, {MIN_SPEED:g} to {MAX_SPEED:g} (default 1)")
    parser.add_argument("--end", action="store_true", help="open at the end of the run (its final state)")
    parser.add_argument("--paused", action="store_true", help="open paused")
    parser.add_argument("--refresh", type=float, default=4.0, metavar="HZ", help="screen refresh rate in Hz")
    parser.add_argument("--window", type=float, default=120.0, metavar="S",
                        help="sparkline time window in seconds (default 120)")



def run(args: argparse.Namespace) -> int:
    if not MIN_SPEED <= args.speed <= MAX_SPEED:
        print(f"llmtop replay: --speed must be between {MIN_SPEED:g} and {MAX_SPEED:g}", file=sys.stderr)
        return 2
    if args.refresh <= 0 or args.window <= 0:
        print("llmtop replay: --refresh and --window must be positive", file=sys.stderr)
        return 2
    try:
        source = RecordingSource(args.file, speed=args.speed, start="end" if args.end else "begin",
                                 playing=not (args.paused or args.end))
    except RecordingError as exc:
        print(f"llmtop replay: {exc}", file=sys.stderr)
        return 1
    if source.warning:
        print(f"llmtop replay: {source.warning}", file=sys.stderr)
    from llmtop.tui.views.replay import ReplayApp

    app = ReplayApp(source, refresh_hz=args.refresh, window_s=args.window)
    try:
        app.run()
    finally:
        source.stop()
    return 0
