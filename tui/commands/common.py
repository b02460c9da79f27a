"""What the commands share: one-line failures, reading recordings safely, the dashboard's options.

A recording is untrusted input. ``read_recordings`` runs a command's body and turns any defect of
the files into one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from llmtop.protocol.frames import ProtocolError

BAD_INPUT = 2  # the exit status for unusable input (arguments or files)


def fail(command: str, message: str, status: int = BAD_INPUT) -> int:
    """Say what is wrong in one line on stderr; return the exit status to use."""
    text = " ".join(str(message).split())  # one line, whatever the message holds
    print(f"llmtop {command}: {text}", file=sys.stderr)
    return status


def read_recordings(command: str, body: Callable[[], int]) -> int:
    """Run ``body`` (which opens and reads recordings) and return its status. A recording that
    cannot be read (``RecordingError``, or a wire-level ``ProtocolError``) is one line and exit 2.

    Anything else escaping is a defect of llmtop, not of the file; it is still one line (the file's
    reader must not leave a traceback on a user's terminal), marked as an internal error so that
    nobody mistakes it for a diagnosis of the file. The fuzz tests fail on such lines."""
    try:
        return body()
    except ProtocolError as exc:  # RecordingError is one
        return fail(command, str(exc))
    except (KeyboardInterrupt, SystemExit, BrokenPipeError):
        raise  # BrokenPipeError: the reader of our output went away (`| head`); the CLI ends quietly
    except Exception as exc:  # noqa: BLE001 - the last resort, said as such
        return fail(command, f"internal error while reading ({type(exc).__name__}: {exc}); please report it")


def add_view_arguments(parser: argparse.ArgumentParser, *, zoom_hint: bool = False) -> None:
    """``--refresh`` and ``--window``, for the dashboard commands (watch, replay)."""
    parser.add_argument("--refresh", type=float, default=4.0, metavar="HZ",
                        help="screen refresh rate in Hz (default 4); the agent's sampling is separate")
    parser.add_argument("--window", type=float, default=120.0, metavar="S",
                        help="sparkline time window in seconds (default 120"
                             + ("; + and - zoom)" if zoom_hint else ")"))


def check_view_arguments(command: str, args: argparse.Namespace) -> int | None:
    """The exit status for bad ``--refresh``/``--window`` values (after saying why), else None."""
    if not args.refresh > 0 or not args.window > 0:  # `not >` also refuses nan
        return fail(command, "--refresh and --window must be positive")
    return None
