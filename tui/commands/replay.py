"""`llmtop replay FILE`: the dashboard on a recording, with play/pause, seek, step and speed controls.

The Textual side (``ReplayApp``, the transport bar) is in ``llmtop.tui.views.replay``; it is imported
only once the arguments are known to be good.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llmtop.protocol.recording.job import rank_of
from llmtop.tui.commands.common import add_view_arguments, check_view_arguments, fail, read_recordings
from llmtop.tui.commands.job_summary import rank_files
from llmtop.tui.session.recording_source import MAX_SPEED, MIN_SPEED, RecordingSource

HELP = "Open the dashboard on a recording, with play/pause, seek, step and speed controls."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a recording (LLMTOP_RECORD, `llmtop attach --record`, `llmtop record`); "
                        "a job's run.lrec or run.rank{R}.lrec replays one rank, or with --end opens "
                        "every rank at the end of the run in the job view")
    parser.add_argument("--speed", type=float, default=1.0, metavar="X",
                        help=f"replay speed, {MIN_SPEED:g} to {MAX_SPEED:g} (default 1)")
    parser.add_argument("--end", action="store_true", help="open at the end of the run (its final state)")
    parser.add_argument("--paused", action="store_true", help="open paused")
    add_view_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if not MIN_SPEED <= args.speed <= MAX_SPEED:
        return fail("replay", f"--speed must be between {MIN_SPEED:g} and {MAX_SPEED:g}")
    bad = check_view_arguments("replay", args)
    if bad is not None:
        return bad
    if args.end and rank_files(args.file):
        return read_recordings("replay", lambda: _job_at_end(args))
    opened: list[RecordingSource] = []
    status = read_recordings("replay", lambda: _open(args, opened))
    if status:
        return status
    source = opened[0]
    if source.warning:
        print(f"llmtop replay: {source.warning}", file=sys.stderr)
    from llmtop.tui.views.replay import ReplayApp

    app = ReplayApp(source, refresh_hz=args.refresh, window_s=args.window)
    # Opening read the header and the index; a block found bad while replaying stops the worker
    # (never an exception in it) and closes the app, and the defect is then one line and exit 2.
    source.on_error = lambda: app.call_from_thread(app.exit)
    try:
        app.run()
    finally:
        source.stop()
    if source.error:
        return fail("replay", source.error)
    return 0


def replay_path(path: str) -> tuple[str, str | None]:
    """The file to replay, and a note when ``path`` names a job: the replay view shows one rank (the
    file named, else the lowest rank) until the job view reads recordings."""
    files = rank_files(path)
    if files is None:
        return path, None
    named = rank_of(path)
    rank = named if named is not None and named in files else min(files)
    return str(files[rank]), (f"a job of {len(files)} recorded ranks: replaying rank {rank} ({files[rank]}); "
                              "--end opens every rank at the end of the run in the job view")


def _open(args: argparse.Namespace, opened: list[RecordingSource]) -> int:
    path, note = replay_path(args.file)
    if note:
        print(f"llmtop replay: {note}", file=sys.stderr)
    opened.append(RecordingSource(path, speed=args.speed, start="end" if args.end else "begin",
                                  playing=not (args.paused or args.end)))
    return 0


def job_at_end(path: str) -> Any:
    """A source of every rank's recording read to its end (a ``JobEventsSource``, keyed host:pid)."""
    from llmtop.protocol.recording import RecordingReader
    from llmtop.tui.session.job import JobModel
    from llmtop.tui.session.job_source import JobEventsSource

    streams = {}
    for _, file in sorted((rank_files(path) or {}).items()):
        with RecordingReader(str(file)) as reader:
            streams[f"{reader.session.hostname or '?'}:{reader.session.pid}"] = list(reader.events())
    return JobEventsSource(JobModel(), streams)


def _job_at_end(args: argparse.Namespace) -> int:
    """Every rank's recording read to its end into one job view (Ranks view, straggler, rank choice):
    a job's final state. Time transport is for one rank at a time (without --end)."""
    from llmtop.tui.views.app import LlmtopApp

    source = job_at_end(args.file)
    app = LlmtopApp(source, refresh_hz=args.refresh, window_s=args.window, title=f"llmtop replay {args.file}")
    try:
        app.run()
    finally:
        source.stop()
    return 0
