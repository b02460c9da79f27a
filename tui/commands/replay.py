"""`llmtop replay FILE`: the dashboard on a recording, with play/pause, seek, step and speed controls.

A job's recording (``run.rank{R}.lrec`` per rank) replays every rank on one clock in the job view
(``JobRecordingSource``); ``--rank R`` replays one of them alone. The Textual side (``ReplayApp``, the
transport bar) is in ``llmtop.tui.views.replay``; it is imported only once the arguments are known to
be good.
"""

from __future__ import annotations

import argparse
import sys

from llmtop.protocol.recording import RecordingError
from llmtop.protocol.recording.job import job_files, rank_of
from llmtop.tui.commands.common import add_view_arguments, check_view_arguments, fail, read_recordings
from llmtop.tui.commands.job_summary import rank_files
from llmtop.tui.session.job_recording_source import JobRecordingSource
from llmtop.tui.session.recording_source import MAX_SPEED, MIN_SPEED, RecordingSource

HELP = "Open the dashboard on a recording, with play/pause, seek, step and speed controls."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="+",
                        help="a recording (LLMTOP_RECORD, `llmtop attach --record`, `llmtop record`). A job's "
                        "run.lrec, any of its run.rank{R}.lrec or several rank files replay every rank on one "
                        "clock in the job view (Ranks view, [ and ] choose the rank shown)")
    parser.add_argument("--rank", type=int, default=None, metavar="R",
                        help="replay only rank R of a job's recording")
    parser.add_argument("--speed", type=float, default=1.0, metavar="X",
                        help=f"replay speed, {MIN_SPEED:g} to {MAX_SPEED:g} (default 1)")
    parser.add_argument("--end", action="store_true",
                        help="open at the end of the run (its final state), paused")
    parser.add_argument("--paused", action="store_true", help="open paused")
    add_view_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if not MIN_SPEED <= args.speed <= MAX_SPEED:
        return fail("replay", f"--speed must be between {MIN_SPEED:g} and {MAX_SPEED:g}")
    bad = check_view_arguments("replay", args)
    if bad is not None:
        return bad
    if len(args.file) > 1 and args.rank is not None:
        return fail("replay", "--rank takes one file: the job's run.lrec or one of its rank files")
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
    # A job's replay goes on while any rank can (the others' defects are notes on screen).
    source.on_error = lambda: app.call_from_thread(app.exit)
    try:
        app.run()
    finally:
        source.stop()
    if source.error:
        return fail("replay", source.error)
    return 0


def job_of(files: list[str]) -> list[str] | None:
    """The rank files to replay together: every file of the job one path names (``job_files``), or
    the files given; None when that is a single recording (replayed alone)."""
    found = [str(f) for f in job_files(files[0])] if len(files) == 1 else list(files)
    return found if len(found) > 1 else None


def replay_path(path: str, rank: int | None = None) -> tuple[str, str | None]:
    """The file to replay for one rank (``rank``, else the file named, else the lowest rank), and a
    note saying so when ``path`` names a job; ``RecordingError`` when the job has no such rank."""
    files = rank_files(path)
    if files is None:
        if rank is not None:
            raise RecordingError(f"{path} is not a job's recording: --rank needs its run.rank{{R}}.lrec files")
        return path, None
    named = rank_of(path)
    if rank is not None and rank not in files:
        raise RecordingError(f"no recording of rank {rank} (recorded ranks: {', '.join(map(str, sorted(files)))})")
    if rank is None:
        rank = named if named is not None and named in files else min(files)
    others = "; without --rank every rank replays in the job view" if len(files) > 1 else ""
    return str(files[rank]), f"a job of {len(files)} recorded ranks: replaying rank {rank} ({files[rank]}){others}"


def _open(args: argparse.Namespace, opened: list[RecordingSource]) -> int:
    start, playing = ("end", False) if args.end else ("begin", not args.paused)
    files = job_of(args.file) if args.rank is None else None
    if files is not None:
        primary = args.file[0] if len(args.file) == 1 and rank_of(args.file[0]) is not None else None
        opened.append(JobRecordingSource(files, path=" ".join(args.file), primary=primary, speed=args.speed,
                                         start=start, playing=playing))
        return 0
    path, note = replay_path(args.file[0], args.rank)
    if note:
        print(f"llmtop replay: {note}", file=sys.stderr)
    opened.append(RecordingSource(path, speed=args.speed, start=start, playing=playing))
    return 0


def job_at_end(path: str) -> JobRecordingSource:
    """Every rank's recording of the job ``path`` names, at the end of the run and paused."""
    return JobRecordingSource(job_of([path]) or [path], path=path, start="end", playing=False)
