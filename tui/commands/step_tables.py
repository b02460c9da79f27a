"""Layer tables paired with their step records, in stream order, for the tools that read recordings
(report's summary pass, export's trace).

A ``LayerStats`` names its step by number, and a number is unique only within one numbering: an
evaluation's record (``Step`` mode "eval") carries the number of the training step it precedes, and the
agent counts from 0 again once training follows inference records (an evaluation or ``generate`` calls
before the first training step). The rule is the live viewer's (tui/session/flops.py): a training or
inference ``Step`` whose number is not above the previous one's starts a new numbering of steps, and a
``LayerStats`` whose number is not above the previous table's starts a new numbering of tables.

The agent sends a step's table in the tick the step ends, before or after its ``Step`` record. So a table
waits until a step of its numbering numbered at least as high arrives (or a later numbering begins), and is
then paired with the record of its own number in its own numbering. Evaluation records are never paired:
the agent sends no table of an evaluation. The first numbering of tables belongs to the numbering of
steps that is current when a step record first finds tables waiting (a run whose evaluation before
training had no timed step has its first table in the training numbering); each later one to the next.
One order stays ambiguous: when the only table before training is the last inference step's, a tick
late, and no training table has come yet when the first training record does, that table is taken for
the training numbering's and the training tables then find no record (they are counted unpaired).
"""

from __future__ import annotations

from collections import OrderedDict

from llmtop.protocol.events import LayerStats, Step
from llmtop.tui.commands.layer_tables import LayerMerger

STEPS_KEPT = 256  # recent step records kept for tables that arrive after them
TABLES_WAITING = 256  # tables waiting for a step past this are released unpaired (a loop with no steps)


class StepTables:
    """Feed every ``Step`` and ``LayerStats`` in stream order; each call returns the (table, step record)
    pairs it completed, the record None when the recording holds none for that table's step."""

    def __init__(self) -> None:
        self.steps: OrderedDict[tuple[int, int], Step] = OrderedDict()  # (step numbering, number) -> record
        self.step_numbering = 0
        self.last_step: int | None = None
        self.table_numbering = 0
        self.last_table: int | None = None
        self.base: int | None = None  # the step numbering of the first table numbering, once known
        self.pending: dict[int, LayerMerger] = {}  # table numbering -> its waiting tables
        self.waiting = 0

    def table(self, e: LayerStats, keep: bool = True) -> list[tuple[LayerStats, Step | None]]:
        """A layer table; ``keep=False`` only notes its number (a table the caller samples out still
        tells where a numbering restarts)."""
        if self.last_table is not None and e.step <= self.last_table:
            self.table_numbering += 1
        self.last_table = e.step
        if not keep:
            return []
        self.pending.setdefault(self.table_numbering, LayerMerger()).add(e)
        self.waiting += 1
        if self.waiting <= TABLES_WAITING:
            return []
        oldest = min(self.pending)  # nobody ends steps: the oldest waiting tables go out as they are
        return self._release(oldest, self.pending.pop(oldest).ready())

    def step(self, s: Step) -> list[tuple[LayerStats, Step | None]]:
        """A step record: the tables it completes, paired."""
        if s.mode == "eval":  # numbered as the training step it precedes, and never has a table
            return []
        restart = self.last_step is not None and s.step <= self.last_step
        if restart:
            self.step_numbering += 1
        self.last_step = s.step
        self.steps[(self.step_numbering, s.step)] = s
        self.steps.move_to_end((self.step_numbering, s.step))
        while len(self.steps) > STEPS_KEPT:
            self.steps.popitem(last=False)
        if self.base is None and self.pending:
            # The first record to find tables waiting: the oldest are its numbering's, unless it starts a
            # numbering, whose tables are then the newest (older ones were the last steps', a tick late).
            self.base = self.step_numbering - (max(self.pending) if restart else min(self.pending))
        out: list[tuple[LayerStats, Step | None]] = []
        for numbering in sorted(self.pending):
            at = self._numbering_of(numbering)
            if at > self.step_numbering:
                break
            merger = self.pending[numbering]
            out += self._release(numbering, merger.ready(None if at < self.step_numbering else s.step))
            if not merger.pending:
                del self.pending[numbering]
        return out

    def flush(self) -> list[tuple[LayerStats, Step | None]]:
        """Every table still waiting (the recording ended), paired where its step was recorded."""
        if self.base is None and self.pending:
            self.base = self.step_numbering - min(self.pending)
        out: list[tuple[LayerStats, Step | None]] = []
        for numbering in sorted(self.pending):
            out += self._release(numbering, self.pending[numbering].ready())
        self.pending.clear()
        return out

    def _numbering_of(self, table_numbering: int) -> int:
        return (self.base or 0) + table_numbering

    def _release(self, numbering: int, tables: list[LayerStats]) -> list[tuple[LayerStats, Step | None]]:
        self.waiting -= len(tables)
        at = self._numbering_of(numbering)
        return [(t, self.steps.get((at, t.step))) for t in tables]
