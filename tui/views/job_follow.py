"""The app's part for a job (several ranks' streams, ``app.job``): following the job, the Ranks view,
choosing the rank every other view shows, and the job's keys. A mixin of ``LlmtopApp``: its state
(``job``, ``selected``, ``job_shown``…) is declared in ``LlmtopApp.__init__``."""

from __future__ import annotations

import time
from typing import Any

from llmtop.tui.views.keys import RANKS_VIEW, VIEWS
from llmtop.tui.views.layer_detail import LayerDetail
from llmtop.tui.views.ranks import RanksView, diagnosis_notes_soon
from llmtop.tui.views.widgets import show_text
from textual.widgets import TabPane

HEADER_EVERY_S = 1.0  # the job's figures in the header of views other than Ranks


class JobFollowing:
    """Following a job's ranks in ``LlmtopApp`` (see the module docstring)."""

    job: Any
    selected: str | None
    clock: Any  # LlmtopApp's: wall time live, the recording's time in a replay

    def _follow_job(self) -> None:
        """Pick a rank to show once one is there, turn the job's view on at the second stream, and
        summarise the job for the header (each model read under its own lock, one at a time)."""
        job = self.job
        assert job is not None
        if self.selected is None or self.selected not in job.models or self._auto_select:
            key = job.default_key()
            if key is not None and key != self.selected:
                self.select_rank(key)
        if not self.job_shown and job.is_job():
            self._show_job()
        if self.job_shown:
            # every frame for the Ranks view; for the header of the other views once a second is enough
            full = self.ranks_on_screen
            now = time.monotonic()
            if full or now - self._job_rows_at >= HEADER_EVERY_S or self._job_summary is None:
                self._job_rows = job.rows(light=not full)
                self._job_summary = job.summary(rows=self._job_rows)
                self._job_rows_at = now
        if self.child is not None:
            self._share_logs()

    @property
    def ranks_on_screen(self) -> bool:
        """The Ranks view is the one shown (a dialog over it, help or the quit question, leaves it drawn;
        the layer detail replaces it)."""
        return self.job_shown and self.active_view == "ranks" and not isinstance(self.screen, LayerDetail)

    def _show_job(self) -> None:
        """Add the Ranks view (key 8): a single process never gets it, so it looks as it always did."""
        name, title = RANKS_VIEW
        self.job_shown = True
        view = RanksView(id=f"view-{name}")
        self.views[name] = view
        self.tabs.add_pane(TabPane(f"{len(VIEWS) + 1} {title}", view, id=name))
        self.refresh_bindings()

    def _frame_ranks(self, force: bool) -> None:
        job = self.job
        assert job is not None
        with self.model.lock:
            show_text(self.status_bar, self.status_text())
        if self.frozen:
            return
        view = self.views["ranks"]
        key = (job.version(), "ranks", self.window_s, self.selected)
        if (key == self._drawn and not force) or not view.is_mounted or not view.query("TreeTable"):
            return
        rows, summary = self._job_rows, self._job_summary
        if summary is None:
            return
        with self.batch_update():
            view.show(summary, rows, diagnosis_notes_soon(job, self.clock()), self.selected)
        self._drawn = key

    def select_rank(self, key: str) -> None:
        """Show stream ``key`` in every view."""
        if self.job is None or key not in self.job.models:
            return
        self.selected = key
        self.model = self.job.models[key]
        self._drawn = None
        for view in getattr(self, "views", {}).values():  # per-model caches start again
            if hasattr(view, "_seen"):
                view._seen = (-1, -1, "")
            if hasattr(view, "_tree_version"):
                view._tree_version = -1
        if isinstance(self.screen, LayerDetail):
            self.screen._seen = -1

    def selected_label(self) -> str:
        if self.job is None or self.selected is None:
            return "?"
        rank = self.job.identity(self.selected, self.model).rank  # reads one model: fine without its lock
        return "?" if rank is None else str(rank)

    def _share_logs(self) -> None:
        """Attached to a launcher, the pty carries every rank's output: each rank's model shows it."""
        assert self.job is not None
        source = self._log_source
        for _, m in self.job.items():
            if id(m) in self._log_shared:
                continue
            with source.lock:
                entries = list(source.logs)
            with m.lock:
                m.logs_from_viewer = True
                for e in entries:
                    m.add_log(e.text, e.stream, False, e.t)
            self._log_shared.add(id(m))

    def on_ranks_view_choose(self, message: RanksView.Choose) -> None:
        self._auto_select = False
        self.select_rank(message.key)
        self.notify(f"showing rank {self.selected_label()}", timeout=2)
        self.frame(force=True)

    def action_cycle_rank(self, step: int) -> None:
        if self.job is None:
            return
        keys = self.job.ordered_keys()
        if not keys:
            return
        i = keys.index(self.selected) if self.selected in keys else -1
        self._auto_select = False
        self.select_rank(keys[(i + int(step)) % len(keys)])
        self.frame(force=True)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cycle_rank" or (action == "show_view" and parameters == ("ranks",)):
            return self.job_shown
        return True
