"""`llmtop export FILE --format chrome|csv|json|html -o OUT`: a recording in the tools people already use.

- ``chrome``: a Chrome / Perfetto trace (JSON object format, ``traceEvents``); load it in
  https://ui.perfetto.dev or ``chrome://tracing``. A job's recording (``run.rank{R}.lrec``): one
  process per rank (pid = rank), on one time axis.
- ``csv``: one row per step with every ``Step`` field (phases flattened to ``phase_<name>_ms``).
- ``json``: every event, grouped by kind, plus the ``llmtop report`` summary.
- ``html``: one self-contained page with inline SVG plots (``tui/commands/html.py``).

``docs/EXPORT.md`` documents each format's fields.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from llmtop.protocol.events import (
    PHASES,
    REGISTRY,
    End,
    Event,
    Session,
    Step,
)
from llmtop.protocol.recording import RecordingReader
from llmtop.protocol.recording.job import rank_of
from llmtop.tui.commands.chrome_trace import (
    DEFAULT_LAYER_STEPS,
    export_chrome,
    export_chrome_job,
)
from llmtop.tui.commands.common import fail, read_recordings
from llmtop.tui.commands.job_summary import rank_files
from llmtop.tui.commands.json_safe import clean, event_fields, restore

HELP = ("Export a recording as a Chrome/Perfetto trace, CSV (one row per step), JSON (everything) or one "
        "self-contained HTML page (plots, phases, layers).")
FORMATS = ("chrome", "csv", "json", "html")
JSON_FORMAT = "llmtop-export"
JSON_VERSION = 1

# --- CSV ---------------------------------------------------------------------------------------------

STEP_FIELDS = [f.name for f in dataclasses.fields(Step)]


def csv_columns(extra_phases: Iterable[str] = ()) -> list[str]:
    """Every Step field in schema order; ``phases`` becomes one ``phase_<name>_ms`` column per phase."""
    phases = list(PHASES) + [p for p in extra_phases if p not in PHASES]
    cols: list[str] = []
    for name in STEP_FIELDS:
        if name == "phases":
            cols += [f"phase_{p}_ms" for p in phases]
        else:
            cols.append(name)
    return cols


def write_csv(reader: RecordingReader, out: TextIO) -> int:
    steps = [e for e in reader.events() if isinstance(e, Step)]
    extra = sorted({p for s in steps for p in s.phases if p not in PHASES})
    cols = csv_columns(extra)
    w = csv.writer(out, lineterminator="\n")
    w.writerow(cols)
    for s in steps:
        row = event_fields(s)
        phases = row.pop("phases") or {}
        for p in list(PHASES) + extra:
            row[f"phase_{p}_ms"] = phases.get(p)
        w.writerow(["" if row[c] is None else row[c] for c in cols])
    return len(steps)


# --- JSON --------------------------------------------------------------------------------------------


def export_json(reader: RecordingReader) -> dict[str, Any]:
    from llmtop.tui.commands.summarize import summarize

    events: dict[str, list[dict[str, Any]]] = {}
    end: End | None = None
    for event in reader.events():
        if isinstance(event, Session):
            continue
        if isinstance(event, End):
            end = event
        events.setdefault(event.KIND, []).append(clean(event_fields(event)))
    summary = summarize(reader).to_json()
    return {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "recording": {"file": os.path.abspath(reader.path), "format": list(reader.format),
                      "start": reader.start, "duration_s": reader.duration, "steps": reader.steps,
                      "warning": reader.warning},
        "session": clean(event_fields(reader.session)),
        "events": events,
        "end": clean(event_fields(end)) if end is not None else None,
        "summary": clean(summary),
    }


def events_from_json(data: dict[str, Any]) -> list[Event]:
    """Back from an export to event objects (grouped by kind, each kind in recorded order)."""
    if data.get("format") != JSON_FORMAT:
        raise ValueError("not an llmtop JSON export")
    out: list[Event] = [Session(**restore(data["session"]))]
    for kind, rows in data["events"].items():
        cls = REGISTRY.get(kind)
        if cls is None:
            continue
        out += [cls(**restore(row)) for row in rows]
    return out

def write_csv_job(readers: dict[int, RecordingReader], out: TextIO) -> int:
    """A job's steps: the single-file columns with a leading ``rank`` column, rank by rank."""
    steps = {r: [e for e in rd.events() if isinstance(e, Step)] for r, rd in sorted(readers.items())}
    extra = sorted({p for rows in steps.values() for s in rows for p in s.phases if p not in PHASES})
    cols = csv_columns(extra)
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["rank", *cols])
    n = 0
    for rank, rows in steps.items():
        for s in rows:
            row = event_fields(s)
            phases = row.pop("phases") or {}
            for p in list(PHASES) + extra:
                row[f"phase_{p}_ms"] = phases.get(p)
            w.writerow([rank, *("" if row[c] is None else row[c] for c in cols)])
            n += 1
    return n


# --- command -----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a recording")
    parser.add_argument("--format", "-f", choices=FORMATS, required=True, help="chrome, csv, json or html")
    parser.add_argument("-o", "--output", metavar="OUT", help="output file (default: standard output)")
    parser.add_argument("--all-layers", action="store_true",
                        help=f"chrome: layer slices for every step (default: at most {DEFAULT_LAYER_STEPS} "
                             "steps, evenly spread)")


def _write(out: TextIO, fmt: str, reader: RecordingReader, all_layers: bool) -> None:
    if fmt == "csv":
        write_csv(reader, out)
    elif fmt == "json":
        json.dump(export_json(reader), out, allow_nan=False)
        out.write("\n")
    elif fmt == "html":
        from llmtop.tui.commands.html import write_html

        write_html(reader, out)
    else:
        json.dump(export_chrome(reader, all_layers=all_layers), out, allow_nan=False)
        out.write("\n")


def run(args: argparse.Namespace) -> int:
    return read_recordings("export", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    files = rank_files(args.file)
    if files is not None and args.format in ("chrome", "csv"):
        return _run_job(args, files)
    path = args.file
    if files is not None:
        # json and html describe one process: the file named, or the lowest rank for the job's name.
        named = rank_of(path)
        rank = named if named is not None and named in files else min(files)
        path = str(files[rank])
        print(f"llmtop export: {args.format} of rank {rank} only ({path}); chrome and csv export every rank "
              "of the job", file=sys.stderr)
    with RecordingReader(path) as reader:
        if reader.warning:
            print(f"llmtop export: {reader.warning}", file=sys.stderr)
        if args.output:
            tmp = f"{args.output}.tmp"
            try:
                with open(tmp, "w", encoding="utf-8", newline="") as out:
                    _write(out, args.format, reader, args.all_layers)
                os.replace(tmp, args.output)  # never leave a half-written export under the real name
            except OSError as exc:
                return fail("export", f"cannot write {args.output}: {exc.strerror or exc}", 1)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)  # a file that failed to read half-way leaves nothing behind
        else:
            buf = io.StringIO()
            _write(buf, args.format, reader, args.all_layers)
            sys.stdout.write(buf.getvalue())
    return 0


def _run_job(args: argparse.Namespace, files: dict[int, Any]) -> int:
    with contextlib.ExitStack() as stack:
        readers = {r: stack.enter_context(RecordingReader(str(f))) for r, f in files.items()}
        for r, reader in readers.items():
            if reader.warning:
                print(f"llmtop export: rank {r}: {reader.warning}", file=sys.stderr)

        def write(out: TextIO) -> None:
            if args.format == "csv":
                write_csv_job(readers, out)
            else:
                json.dump(export_chrome_job(readers, all_layers=args.all_layers), out, allow_nan=False)
                out.write("\n")

        if not args.output:
            buf = io.StringIO()
            write(buf)
            sys.stdout.write(buf.getvalue())
            return 0
        tmp = f"{args.output}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8", newline="") as out:
                write(out)
            os.replace(tmp, args.output)
        except OSError as exc:
            return fail("export", f"cannot write {args.output}: {exc.strerror or exc}", 1)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return 0
