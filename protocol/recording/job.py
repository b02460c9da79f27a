"""The files of one job's recording: ``run.lrec`` asked for under a launcher is ``run.rank{R}.lrec`` per rank.

A rank of a job with world size above one writes ``stem.rank{R}.lrec`` beside the path it was given
(R = its global rank); a single process writes the path itself. Readers (report, export, diff,
replay) are given either name and find the rest here. Pure path work: nothing is opened.
"""

from __future__ import annotations

import re
from pathlib import Path

from .layout import SUFFIX

_RANK_FILE = re.compile(r"^(?P<stem>.+)\.rank(?P<rank>\d+)" + re.escape(SUFFIX) + r"$")


def rank_of(path: str | Path) -> int | None:
    """The rank a file's name says (``run.rank3.lrec`` → 3), None for any other name."""
    m = _RANK_FILE.match(Path(path).name)
    return int(m.group("rank")) if m else None


def job_stem(path: str | Path) -> Path:
    """``run.lrec`` or ``run.rank3.lrec`` → ``run`` (beside it); any other name → itself, suffix removed."""
    p = Path(path)
    m = _RANK_FILE.match(p.name)
    if m:
        return p.with_name(m.group("stem"))
    return p.with_name(p.name[: -len(SUFFIX)]) if p.name.endswith(SUFFIX) and len(p.name) > len(SUFFIX) else p


def job_files(path: str | Path) -> list[Path]:
    """Every file of the job ``path`` belongs to, sorted by rank, or ``[path]``.

    Given ``run.lrec`` or any ``run.rank{R}.lrec``: every ``run.rank*.lrec`` beside it, by rank (a
    plain ``run.lrec`` that exists too is a single process's recording and is not mixed in unless no
    rank file exists). Any other name, or no rank file found: ``[path]`` as given, so that the
    reader's own error (missing, not a recording) is what the user sees."""
    p = Path(path)
    stem = job_stem(p)
    if p.name.endswith(SUFFIX) and stem != p:
        ranks: list[tuple[int, Path]] = []
        try:
            siblings = list(stem.parent.iterdir()) if str(stem.parent) else list(Path(".").iterdir())
        except OSError:
            siblings = []
        for sib in siblings:
            m = _RANK_FILE.match(sib.name)
            if m and m.group("stem") == stem.name and sib.is_file():
                ranks.append((int(m.group("rank")), stem.parent / sib.name))
        if ranks:
            return [f for _, f in sorted(ranks)]
    return [p]
