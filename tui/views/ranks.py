"""Ranks: one row per rank of a distributed job, worst skew first, with the job's figures on top.

Shown only when the viewer follows more than one stream (a job); ``enter`` on a row makes that
rank the one every other view shows. Rows are computed by ``JobModel.rows`` (plain data); this view
only formats them and keeps the table in step by row key.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from llmtop.protocol.events import PHASES, CollectiveWait
from llmtop.tui.session import fmt
from llmtop.tui.session.job import JobModel, JobSummary, RankRow
from llmtop.tui.session.ranks_diagnoses import (
    LAST_STEPS,
    LAYER_POINTS,
    hang_short_text,
    hangs,
    recent,
    short_text,
    straggler_from_models,
)
from llmtop.tui.views.tree_table import Column, TreeTable
from llmtop.tui.views.widgets import PHASE_GLYPHS, PHASE_STYLES, show_text
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Static

COLUMNS = (Column("rank", "rank"), Column("status", "status"), Column("step", "step", "right"),
           Column("ms", "last/p50", "right"), Column("comm", "comm", "right"), Column("skew", "skew", "right"),
           Column("tokens", "tok/s", "right"), Column("mem", "mem", "right"), Column("loss", "loss", "right"),
           Column("phases", "phase"), Column("spark", "trend"))
PHASE_CELLS = 5
SPARK_MIN, SPARK_MAX = 6, 40
STATUS_WIDTH = 7
EVEN = 0.02  # skew below this is noise: the ranks are called even
EVENT_LINES = 4  # lines under the job line: waits, lost and failed ranks, the straggler
BLOCKS = "▁▂▃▄▅▆▇█"
STATE_STYLES = {"live": "green", "waiting": "bold yellow", "lost": "bold red", "connecting": "dim"}


def spark_text(values: Sequence[float], width: int) -> str:
    """A sparkline in block characters (the newest ``width`` values, scaled to their max)."""
    values = [v for v in values if math.isfinite(v)][-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi <= lo * 1.02:  # flat within 2 %: a level line, not noise blown up to full height
        return BLOCKS[3] * len(values)
    return "".join(BLOCKS[min(7, max(0, round((v - lo) / (hi - lo) * 7)))] for v in values)


def phase_cells(shares: dict[str, float], width: int = PHASE_CELLS) -> Text:
    """A tiny stacked bar of a rank's phases (glyphs as in the Overview, so it reads without colour)."""
    text = Text()
    if not shares:
        return Text(fmt.DASH, style="dim")
    used = 0
    for i, phase in enumerate(PHASES):
        share = shares.get(phase, 0.0)
        cells = round(share * width) if i < len(PHASES) - 1 else width - used
        cells = max(0, min(cells, width - used))
        used += cells
        text.append(PHASE_GLYPHS[phase] * cells, style=PHASE_STYLES[phase])
    return text


def short_bytes(value: int | None) -> str:
    """"1.5G", "812M": memory in four characters (the Overview has the long form)."""
    if value is None:
        return fmt.DASH
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= size:
            v = value / size
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return f"{value}B"


def skew_text(skew: float | None) -> Text:
    if skew is None:
        return Text(fmt.DASH, style="dim")
    style = "bold red" if skew >= 0.2 else ("yellow" if skew >= 0.05 else "")
    return Text("0%" if abs(skew) < 0.005 else f"{skew * 100:+.0f}%", style=style)


def row_cells(row: RankRow, spark_width: int) -> tuple[Any, ...]:
    label = row.label + (f" ↻{row.restarts}" if row.restarts else "")
    status = row.status if len(row.status) <= STATUS_WIDTH else row.status[: STATUS_WIDTH - 1] + "…"
    times = f"{fmt.ms(row.last_ms)}/{fmt.ms(row.p50_ms)}"
    loss = fmt.DASH if row.loss is None else (f"{row.loss:.3f}" if math.isfinite(row.loss) else str(row.loss))
    return (label, Text(status, style=STATE_STYLES.get(row.state, "")),
            fmt.DASH if row.step is None else str(row.step), times,
            fmt.DASH if row.comm_ms is None else fmt.ms(row.comm_ms), skew_text(row.skew),
            fmt.rate(row.tokens_s, ""), short_bytes(row.memory), loss, phase_cells(row.phases),
            spark_text(row.spark, spark_width))


def job_line(summary: JobSummary) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(summary.ranks_text(), style="bold")
    t.append(f" · {summary.live} running")
    if summary.tokens_s is not None:
        t.append(f" · job {fmt.rate(summary.tokens_s, ' tok/s')}")
    if summary.steps_s is not None:
        t.append(f" · {summary.steps_s:.2f} steps/s")
    if summary.launcher or summary.job:
        t.append(f" · {summary.launcher or 'job'} {summary.job}".rstrip(), style="dim")
    return t


def event_lines(summary: JobSummary, rows: list[RankRow], notes: list[str]) -> Text:
    """What needs attention: waits in collectives (and who never arrived), lost and ended ranks, the
    straggler diagnosis."""
    t = Text(no_wrap=True, overflow="ellipsis")
    lines: list[tuple[str, str]] = []
    if summary.waiting:
        waiting = ", ".join(r.label for r in summary.waiting)
        ops = sorted({r.status for r in summary.waiting})
        line = f"⧗ rank {waiting} waiting: {'; '.join(ops)}"
        if summary.world_size:
            present = {r.rank for r in summary.waiting}
            missing = [str(r) for r in range(summary.world_size) if r not in present]
            if missing:
                line += f" · not in it: {', '.join(missing[:16])}{'…' if len(missing) > 16 else ''}"
        lines.append((line, "bold yellow"))
    if summary.lost:
        lines.append((f"✖ lost: rank {', '.join(r.label for r in summary.lost)}", "bold red"))
    failed = [r for r in summary.ended if r.status != "done"]
    if failed:
        lines.append(("✖ " + ", ".join(f"rank {r.label} {r.status}" for r in failed), "bold red"))
    for note in notes:
        lines.append((note, "yellow"))
    if not lines:
        skews = [r.skew for r in rows if r.skew is not None]
        skewed = next((r for r in rows if r.skew is not None), None)
        if skewed is not None and skewed.skew is not None and skewed.skew >= EVEN:
            lines.append((f"slowest: rank {skewed.label}, {skewed.skew * 100:+.0f}% busy time vs the median rank",
                          "dim"))
        elif len(skews) > 1:
            spread = max(abs(v) for v in skews)
            lines.append((f"ranks even: busy time within ±{max(spread * 100, 1):.0f}% of the median rank", "dim"))
        else:
            lines.append(("no step records with times yet", "dim"))
    for i, (line, style) in enumerate(lines[:EVENT_LINES]):
        if i:
            t.append("\n")
        t.append(line, style=style)
    return t


DIAGNOSE_EVERY_S = 1.0  # the straggler diagnosis of 64 ranks costs ~0.1 s: not every frame


@dataclass
class _RankData:
    """What the diagnoses read of one rank, copied under its model's lock."""

    steps: list[Any]
    host: list[Any]
    waits: list[CollectiveWait]
    started: float
    ended: str | None
    model: Any = field(repr=False)
    _layers: dict[int, _LayerData] | None = field(default=None, repr=False)

    @property
    def layers(self) -> dict[int, _LayerData]:
        """Each layer's recent points, copied under the model's lock when a diagnosis first asks: only a
        forward or backward straggler needs them, and 64 ranks' layers cost ~80 ms to copy."""
        if self._layers is None:
            with self.model.lock:
                found = ((mid, la.path, recent(la.history, LAYER_POINTS)) for mid, la in self.model.layers.items())
                self._layers = {mid: _LayerData(path, pts) for mid, path, pts in found if pts}
        return self._layers


@dataclass
class _LayerData:
    path: str
    history: list[Any]


def _rank_data(job: JobModel) -> tuple[dict[int, _RankData], int | None]:
    """The newest stream of each known rank, copied one model at a time (no lock held across ranks)."""
    out: dict[int, _RankData] = {}
    world = None
    for key, model in job.items():
        with model.lock:
            ident = job.identity(key, model)
            if ident.rank is None or model.session is None:
                continue
            started = model.session.started or 0.0
            if ident.rank in out and out[ident.rank].started > started:
                continue
            world = max(world or 0, ident.world_size or 0) or world
            ended = (model.exit_text() or "ended") if model.end is not None else None
            out[ident.rank] = _RankData(list(model.steps)[-(LAST_STEPS + 8):], list(model.host)[-64:],
                                        list(model.waits), started, ended, model)
    return out, world


def diagnosis_notes(job: JobModel, clock: float | None = None) -> list[str]:
    """The job's diagnoses, one line each: ranks stuck in a collective (and who never arrived), then
    the straggler with its cause (``tui/session/ranks_diagnoses.py``). Worked out at most once a
    second per job; never an error here. ``clock``: the app's time (a replay's: the recording's)."""
    lines, fresh, _ = _cached(job, clock)
    return lines if fresh and lines is not None else _work_out(job, clock)


def diagnosis_notes_soon(job: JobModel, clock: float | None = None) -> list[str]:
    """``diagnosis_notes`` for a frame, which never waits for it once there are lines: a stale set is
    shown while the next is worked out on a thread (64 ranks: ~0.17 s of CPU, once a second). The
    first lines, and those after a replay's clock jumps, are worked out at once."""
    lines, fresh, jumped = _cached(job, clock)
    if lines is None or jumped:
        return _work_out(job, clock)
    if not fresh and id(job) not in _PENDING:
        global _EXECUTOR
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmtop-diagnosis")
        _PENDING.add(id(job))
        _EXECUTOR.submit(_work_out, job, clock)
    return lines


def _cached(job: JobModel, clock: float | None) -> tuple[list[str] | None, bool, bool]:
    """(the last lines worked out for ``job``, whether they are under a second old, whether the app's
    clock moved other than forward by about that since: a replay's seek)."""
    cached = _NOTES.get(id(job))
    if cached is None:
        return None, False, False
    when, then, lines = cached
    jumped = clock is not None and then is not None and not 0.0 <= clock - then < 2 * DIAGNOSE_EVERY_S
    return lines, time.monotonic() - when < DIAGNOSE_EVERY_S and not jumped, jumped


def _work_out(job: JobModel, clock: float | None) -> list[str]:
    now = time.monotonic()
    notes: list[str] = []
    try:
        data, world = _rank_data(job)
        ended = {r: d.ended for r, d in data.items() if d.ended is not None}
        for h in hangs({r: d.waits for r, d in data.items() if d.waits}, world, time.time() if clock is None else clock, ended):
            if h.ongoing:
                notes.append(hang_short_text(h))
        found = straggler_from_models(data) if len(data) > 1 else None
        if found is not None:
            notes.append(short_text(found))
    except Exception:  # noqa: BLE001 - a diagnosis must never take the view down
        pass
    _NOTES[id(job)] = (now, clock, notes)
    _PENDING.discard(id(job))
    return notes


_NOTES: dict[int, tuple[float, float | None, list[str]]] = {}  # id(job) -> (when, app clock, lines)
_PENDING: set[int] = set()  # jobs whose next lines are being worked out on the thread
_EXECUTOR: ThreadPoolExecutor | None = None


class RanksView(Vertical):
    DEFAULT_CSS = """
    RanksView #ranks-info { height: auto; max-height: 5; padding: 0 1; text-wrap: nowrap;
        text-overflow: ellipsis; }
    RanksView TreeTable { height: 1fr; }
    """

    class Choose(Message):
        """A rank was chosen: every other view shows its stream."""

        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

    _shown: tuple[JobSummary, list[RankRow], list[str], str | None] | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="ranks-info")
        yield TreeTable(COLUMNS, id="ranks-table")

    def spark_width(self) -> int:
        """What is left of the line for the sparkline (wider terminals get longer histories)."""
        return max(SPARK_MIN, min(SPARK_MAX, self.size.width - 74))  # 80 columns: 6 (78 with the scrollbar)

    def show(self, summary: JobSummary, rows: list[RankRow], notes: list[str], selected: str | None) -> None:
        self._shown = (summary, rows, notes, selected)
        info = Text(no_wrap=True, overflow="ellipsis")
        info.append_text(job_line(summary))
        info.append("\n")
        info.append_text(event_lines(summary, rows, notes))
        show_text(self.query_one("#ranks-info", Static), info)
        width = self.spark_width()
        cells = []
        for row in rows:
            c = row_cells(row, width)
            c = (Text(("▸" if row.key == selected else " ") + c[0], style="bold" if row.key == selected else ""),
                 *c[1:])
            cells.append((row.key, c))
        self.query_one(TreeTable).sync(cells)

    def on_resize(self) -> None:
        """The sparklines take what is left of the line: draw them again at the new width (a paused
        replay sends no new frame)."""
        if self._shown is not None:
            self.show(*self._shown)

    def on_tree_table_row_selected(self, event: TreeTable.RowSelected) -> None:
        event.stop()
        self.post_message(self.Choose(event.key))
