"""A distributed job's recording (one ``run.rank{R}.lrec`` per rank) as one ``JobSummary``.

``open_job(path)`` is given ``run.lrec`` or any rank file (``protocol/recording/job.py``
``job_files``) and summarizes every rank's file with the one summary pass (``summarize.py``); it
returns None for a single process's recording, so every reader keeps its single-file behaviour. The
job's figures: a row per rank, the job's tokens/s (the ranks run at once: the sum of theirs), the
straggler and its cause and the hangs (``tui/session/ranks_diagnoses.py``), and the ranks that died
or left no recording. ``report``, ``export``, ``diff`` and ``replay`` read jobs through here.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtop.protocol.recording.job import job_files, rank_of
from llmtop.tui.commands.summarize import open_summary
from llmtop.tui.commands.summary import RunSummary
from llmtop.tui.session.ranks_diagnoses import Hang, Straggler, hangs, straggler_from_models


@dataclass
class JobSummary:
    path: str  # as given
    files: dict[int, Path]  # rank → its file
    ranks: dict[int, RunSummary]  # rank → its summary, by rank
    world_size: int
    job: str = ""
    launcher: str = ""
    _straggler: list[Straggler | None] = field(default_factory=list)

    @property
    def first(self) -> RunSummary:
        """The lowest rank's summary (rank 0 when it was recorded): the one shown in detail."""
        return self.ranks[min(self.ranks)]

    def straggler(self) -> Straggler | None:
        if not self._straggler:
            self._straggler.append(straggler_from_models({r: s.model for r, s in self.ranks.items()}))
        return self._straggler[0]

    def ended(self) -> dict[int, str]:
        """Rank → how it ended, for ranks that did not end normally (crashed, killed, no end recorded)."""
        out: dict[int, str] = {}
        for r, s in self.ranks.items():
            if s.crashed() or s.end is None:
                out[r] = s.exit_text()
        return out

    def unrecorded(self) -> list[int]:
        """Ranks of the world that left no file."""
        return [r for r in range(self.world_size) if r not in self.ranks]

    def hangs(self) -> list[Hang]:
        return hangs({r: s.waits for r, s in self.ranks.items()}, self.world_size, ended=self.ended())

    def tokens_per_s(self) -> float | None:
        """The job's tokens/s: every rank processes its own tokens at the same time, so the sum."""
        rates = [s.tokens_per_s() for s in self.ranks.values()]
        return sum(r for r in rates if r is not None) if any(r is not None for r in rates) else None

    def step_p50_ms(self) -> float | None:
        """The job's step time: its ranks step together, so the median of the ranks' medians."""
        meds = [m for s in self.ranks.values() if (m := s.step_ms.median()) is not None]
        return statistics.median(meds) if meds else None

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for r, s in sorted(self.ranks.items()):
            step_p50 = s.step_ms.median()
            comm_p50 = s.comm_ms.median()
            out.append({
                "rank": r, "file": str(self.files[r]), "hostname": s.session.hostname, "pid": s.session.pid,
                "steps": s.steps, "step_p50_ms": step_p50, "comm_p50_ms": comm_p50,
                "comm_share_pct": (100.0 * s.comm_total_ms / s.busy_ms
                                   if s.comm_ms.n and s.busy_ms > 0 else None),
                "comm_calls": s.comm_calls, "comm_bytes": s.comm_bytes,
                "tokens_per_s": s.tokens_per_s(), "last_loss": _finite(s.last_loss),
                "exit": s.exit_text(), "ended_normally": not (s.crashed() or s.end is None),
            })
        return out

    def to_json(self) -> dict[str, Any]:
        """The job part of ``ranks`` in ``report --json`` (docs/REPORT.md)."""
        s = self.straggler()
        return {
            "files": len(self.files), "per_rank": self.rows(), "job_tokens_per_s": self.tokens_per_s(),
            "job_step_p50_ms": self.step_p50_ms(), "straggler": s.to_json() if s is not None else None,
            "hangs": [h.to_json() for h in self.hangs()],
            "died": [{"rank": r, "text": t} for r, t in sorted(self.ended().items())],
            "unrecorded": self.unrecorded(),
        }


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def is_job(path: str | Path) -> bool:
    """Whether ``path`` names a job's recording (rank files), without opening anything."""
    files = job_files(path)
    return len(files) > 1 or rank_of(files[0]) is not None


def rank_files(path: str | Path) -> dict[int, Path] | None:
    """Rank → file for a job's recording (the rank its file name says), None for a single file."""
    if not is_job(path):
        return None
    out: dict[int, Path] = {}
    for f in job_files(path):
        r = rank_of(f)
        if r is not None:
            out[r] = f
    return out


def open_job(path: str | Path) -> JobSummary | None:
    """Summarize every rank of the job ``path`` belongs to; None for a single process's recording.
    ``RecordingError`` for a rank file that cannot be read (the command says which, in one line)."""
    files = rank_files(path)
    if files is None:
        return None
    ranks: dict[int, RunSummary] = {}
    where: dict[int, Path] = {}
    for named, f in files.items():
        s = open_summary(str(f))
        # The rank the agent knew is the truth; the file name is what the agent chose from it.
        r = s.session.rank if s.session.rank is not None else named
        ranks[r] = s
        where[r] = f
    sessions = [s.session for s in ranks.values()]
    world = max([s.world_size or 0 for s in sessions] + [max(ranks) + 1])
    first = ranks[min(ranks)].session
    job = JobSummary(path=str(path), files=dict(sorted(where.items())), ranks=dict(sorted(ranks.items())),
                     world_size=world, job=first.job, launcher=first.launcher)
    for s in ranks.values():
        s.job = job
    return job
