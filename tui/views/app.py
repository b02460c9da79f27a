"""The Textual app: a worker thread ingests events into the SessionModel; a timer pushes the model
into the visible widgets (only when something changed) inside ``batch_update()``.

Subclasses (the replay screen) add widgets through ``compose_extra()``, which sits above the footer,
and may replace ``source``/``clock``; ``model`` and ``source`` are public.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from llmtop.tui.session import fmt
from llmtop.tui.session.job import JobModel, JobSummary, RankRow
from llmtop.tui.session.logtail import LogTail, detached_log_path
from llmtop.tui.session.model import CONNECTING, ENDED, LIVE, LOST, SessionModel
from llmtop.tui.session.source import SocketSource, Source
from llmtop.tui.views.help import HelpScreen, QuitScreen
from llmtop.tui.views.inference import InferenceView
from llmtop.tui.views.job_follow import JobFollowing
from llmtop.tui.views.keys import JOB_KEYS, KEYS, VIEWS
from llmtop.tui.views.layer_detail import LayerDetail
from llmtop.tui.views.layers import LayersView
from llmtop.tui.views.logs import LogsView
from llmtop.tui.views.memory import MemoryView
from llmtop.tui.views.ops import OpsView
from llmtop.tui.views.overview import OverviewView
from llmtop.tui.views.spans import SpansView
from llmtop.tui.views.widgets import ViewTabs, show_text
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer, Static, TabbedContent, TabPane

VIEW_CLASSES: dict[str, type[Widget]] = {
    "overview": OverviewView, "layers": LayersView, "memory": MemoryView, "spans": SpansView,
    "ops": OpsView, "inference": InferenceView, "logs": LogsView,
}
MIN_WINDOW_S, MAX_WINDOW_S = 10.0, 3600.0
STOP_GRACE_S = 5.0
STOP_AFTER_TERM_S = 5.0  # the dashboard waits this long after the SIGTERM before it closes


class LlmtopApp(JobFollowing, App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "llmtop"
    BINDINGS = KEYS + JOB_KEYS  # the job's keys act only while a job is shown (check_action)

    def __init__(self, source: Source, *, child: Any = None, refresh_hz: float = 4.0,
                 window_s: float = 120.0, title: str | None = None,
                 clock: Callable[[], float] = time.time, theme: str | None = None,
                 job: JobModel | None = None) -> None:
        super().__init__()
        self.source = source
        self.child = child
        # a job (several ranks' streams, e.g. a JobSource's): ``model`` is the selected rank's
        self.job: JobModel | None = job if job is not None else getattr(source, "job", None)
        self.selected: str | None = getattr(source, "primary_key", None) if self.job is not None else None
        self.model = self.job.model_for(self.selected) if self.job is not None and self.selected else SessionModel()
        self.job_shown = False  # the Ranks view and the job's header are on (more than one stream)
        # no stream to start from (a job id): show the lowest rank seen until the user picks one
        self._auto_select = self.job is not None and self.selected is None
        self._job_summary: JobSummary | None = None
        self._job_rows: list[RankRow] = []
        self._job_rows_at = 0.0
        self._log_shared: set[int] = {id(self.model)}  # models (by id) that get the pty's output
        self._log_source = self.model  # the first model: it has had the pty's output from the start
        self.launcher_end: Any = None  # attached to a launcher of several ranks: its End
        if child is not None:
            self.model.logs_from_viewer = True  # the pty is ours: keep output across reconnects
        self.refresh_hz = max(0.2, float(refresh_hz))
        self.window_s = float(window_s)
        self.clock = clock
        self.frozen = False
        self.exit_message: str | None = None
        self.stop_requested = False  # the user chose to stop the script: never detach it
        self.frames = 0
        self.last_frame_ms = 0.0
        self._drawn: tuple[int, str, float] | None = None
        self._end_applied = False
        self.recording: Any = None  # a tui.record.BackgroundRecording while the record key is on
        self.log_tail: LogTail | None = None  # watching a detached script: its log file
        self._input_checked_at = 0.0
        self._input_offered = False  # a prompt was opened for the script's current wait on stdin
        if title:
            self.title = title
        chosen = theme or os.environ.get("LLMTOP_THEME")
        if chosen:
            self.theme = chosen

    # --- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        with ViewTabs(initial="overview", id="views"):
            for i, (name, title) in enumerate(VIEWS, start=1):
                with TabPane(f"{i} {title}", id=name):
                    yield VIEW_CLASSES[name](id=f"view-{name}")
        yield from self.compose_extra()
        yield Footer()

    def compose_extra(self) -> Iterable[Widget]:
        """Widgets a subclass docks between the views and the footer (replay's transport bar)."""
        return ()

    def on_mount(self) -> None:
        # the main screen's widgets, kept so frames find them while another screen is on top
        self.status_bar = self.query_one("#status", Static)
        self.tabs = self.query_one("#views", TabbedContent)
        self.views = {name: self.query_one(f"#view-{name}") for name, _ in VIEWS}
        self.start_source()
        self.set_interval(1.0 / self.refresh_hz, self.frame)
        self.frame(force=True)

    def start_source(self) -> None:
        self._ingest()

    @work(thread=True, name="ingest", exit_on_error=False)
    def _ingest(self) -> None:
        try:
            self.source.run(self.model)
        except Exception as exc:  # a broken source must not take the app down: show it
            with self.model.lock:
                self.model.set_connection(LOST, f"source failed: {exc}")

    def on_unmount(self) -> None:
        self.source.stop()
        if self.recording is not None:
            self.recording.stop()  # closes the file with its index: quitting never loses a recording

    # --- the frame -----------------------------------------------------------------------------

    @property
    def active_view(self) -> str:
        return self.tabs.active or "overview"

    def view_widget(self, name: str | None = None) -> Any:
        return self.views[name or self.active_view]

    def frame(self, force: bool = False) -> None:
        """Push the model into the widgets that are on screen. Cheap when nothing changed."""
        started = time.perf_counter()
        if self.job is not None:
            self._follow_job()
        self._poll_child()
        if self.ranks_on_screen:
            self._frame_ranks(force)
            self.frames += 1
            self.last_frame_ms = (time.perf_counter() - started) * 1000.0
            return
        model = self.model
        with model.lock:
            show_text(self.status_bar, self.status_text())
            if self.frozen:
                return  # the view holds still; ingestion goes on
            screen = self.screen
            if isinstance(screen, LayerDetail):  # the views underneath are hidden: only the detail
                screen.refresh_view(model, self.window_s)
                self._drawn = None
                return
            key = (model.version, self.active_view, self.window_s)
            if key == self._drawn and not force:
                return
            view = self.view_widget()
            if not view.is_mounted:
                return  # still composing its children (a start under load): a later frame draws it
            try:
                with self.batch_update():
                    view.refresh_view(model, self.window_s)
            except NoMatches:
                return  # its widgets are being removed (the app is closing): nothing to draw into
            self._drawn = key
        self.frames += 1
        self.last_frame_ms = (time.perf_counter() - started) * 1000.0

    def _poll_log_file(self) -> None:
        """Watching (no attached child): show a detached script's output from its log file."""
        if self.log_tail is None:
            session, sock = self.model.session, getattr(self.source, "path", None)
            if session is None or not isinstance(self.source, SocketSource) or sock is None:
                return
            path = detached_log_path(Path(sock), session.pid)
            if not path.exists():
                return
            self.log_tail = LogTail(path)
            with self.model.lock:
                self.model.logs_from_viewer = True  # the file is ours to read: keep it across resets
        lines = self.log_tail.read()
        if lines:
            with self.model.lock:
                for line in lines:
                    self.model.add_log(line, "stdout", False, time.time())

    def _poll_child(self) -> None:
        child = self.child
        if child is None:
            self._poll_log_file()
            return
        if self._end_applied:
            return
        try:
            lines = child.drain_output()
            # ended once its output is all in too (the launcher follows the log the pty goes to)
            ended = child.poll() is not None and getattr(child, "output_done", True)
            if ended:
                lines += child.drain_output()
            self._offer_input()
        except Exception:  # the child's pipes are the launcher's business; never crash the view
            return
        if not lines and not ended:
            return
        targets = [self.model]
        if self.job is not None:
            targets = [m for _, m in self.job.items() if id(m) in self._log_shared]
        for m in targets:
            with m.lock:
                for line in lines:
                    m.add_log(line.text, line.stream, line.replace, line.t)
        if ended:
            self._apply_child_end()

    def _apply_child_end(self) -> None:
        """The launcher's exit: the script's end (one process), or the job's (its ranks keep their own
        ends; a rank that never sent one ended with the launcher)."""
        end = self.child.end_event()
        self._end_applied = True
        if self.job is None or not self.job_shown:
            with self.model.lock:
                self.model.apply(end)
            return
        self.launcher_end = end
        for _, m in self.job.items():
            with m.lock:
                if m.end is None:
                    m.apply(end)

    def _offer_input(self) -> None:
        """The script waits on its stdin (``input()``): open a line to type into it, once per wait
        (esc closes it; it comes back the next time the script asks)."""
        child = self.child
        waiting = getattr(child, "waiting_for_input", None)
        now = time.monotonic()
        if waiting is None or now < self._input_checked_at + 0.5:
            return
        self._input_checked_at = now
        if not waiting():
            self._input_offered = False
            return
        if self._input_offered or len(self.screen_stack) > 1:
            return
        from llmtop.tui.views.stdin_prompt import StdinPrompt

        self._input_offered = True
        self.push_screen(StdinPrompt(self._last_output_line), self._send_input)

    def _last_output_line(self) -> str:
        with self.model.lock:
            return self.model.logs[-1].text if self.model.logs else ""

    def _send_input(self, line: str | None) -> None:
        if line is None or self.child is None:
            return
        try:
            self.child.send_input(line + "\n")
        except OSError as exc:
            self.notify(f"could not type into the script: {exc}", severity="error", timeout=5)

    def status_text(self) -> Text:
        """The one status line: script, pid, state, uptime, steps, rate, drops, connection."""
        m = self.model
        text = Text(no_wrap=True, overflow="ellipsis")
        argv = m.session.argv if m.session else (list(self.child.argv) if self.child is not None else [])
        script = next((os.path.basename(a) for a in argv if a.endswith(".py")), argv[0] if argv else "")
        pid = m.session.pid if m.session else (self.child.pid if self.child is not None else None)
        text.append(f" {script or 'llmtop'} ", style="bold reverse")
        summary = self._job_summary if self.job_shown else None
        if summary is not None:
            text.append(f"  {summary.ranks_text()}", style="bold")
            text.append(f"  ▸ rank {self.selected_label()}", style="bold cyan")
        exit_text = m.exit_text()
        if exit_text is None and m.session is None and self.child is None:
            text.append("  ○ waiting for the agent", style="dim")
        elif exit_text is None and m.connection == LOST and self.child is None:
            text.append("  ◌ last seen running", style="yellow")
        elif exit_text is None:
            text.append("  ● running", style="bold green")
        elif m.exit_ok:
            text.append(f"  ✔ finished ({exit_text})" if m.end and m.end.exit_code is not None else "  ✔ finished",
                        style="bold")
        else:
            text.append(f"  ✖ ended ({exit_text})", style="bold red")
        conn = m.connection
        label = {CONNECTING: "connecting…", LIVE: "live", LOST: "connection lost", ENDED: "ended"}.get(conn, conn)
        text.append("  ")
        text.append(f" {label} ", style="bold reverse red" if conn == LOST else ("dim" if conn == ENDED else ""))
        if conn in (LOST, CONNECTING) and m.connection_note and m.connection_note != "connection lost":
            text.append(f" {m.connection_note}", style="red" if conn == LOST else "dim")
        text.append(f"  step {m.last_step.step if m.last_step else fmt.DASH}")
        text.append(f"  {fmt.duration(m.uptime(self.clock()))}")
        rate = m.steps_per_s() if summary is None else summary.steps_s
        if rate is not None:
            text.append(f"  {rate:.2f} steps/s" + (" (job)" if summary is not None else ""))
        if summary is not None and summary.tokens_s is not None:
            text.append(f"  {fmt.rate(summary.tokens_s, ' tok/s')}")
        text.append(f"  dropped {m.dropped}", style="bold red" if m.dropped else "")
        if summary is not None and self.launcher_end is not None:
            code = self.launcher_end.exit_code
            text.append(f"  launcher {'exit ' + str(code) if code is not None else 'ended'}",
                        style="bold" if code == 0 else "bold red")
        if pid:
            text.append(f"  pid {pid}")
        text.append(f"  window {self.window_s:g}s")
        if self.frozen:
            text.append("  PAUSED", style="bold reverse yellow")
        return text

    # --- events ------------------------------------------------------------------------------

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.frame(force=True)
        self.focus_view()

    def focus_view(self) -> None:
        """Keys go to the view on screen: its table or log, else the view itself (for scrolling)."""
        view = self.view_widget()
        target = next(iter(view.query("TreeTable, DataTable, LogPane")), None) if view.display else None
        (target or view).focus()

    def on_layers_view_open(self, message: LayersView.Open) -> None:
        self.push_screen(LayerDetail(message.layer_id))
        self.call_after_refresh(self.frame, True)

    # --- actions -------------------------------------------------------------------------------

    def action_show_view(self, name: str) -> None:
        if len(self.screen_stack) > 1 or (name == "ranks" and not self.job_shown):
            return
        self.tabs.active = name

    def action_freeze(self) -> None:
        self.frozen = not self.frozen
        self.frame(force=True)

    def action_zoom(self, factor: float) -> None:
        self.window_s = min(MAX_WINDOW_S, max(MIN_WINDOW_S, self.window_s * float(factor)))
        self.frame(force=True)

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        view_keys = [("Layers view", list(LayersView.BINDINGS)), ("Layer detail", list(LayerDetail.BINDINGS))]
        if self.job_shown:
            view_keys.insert(0, ("Ranks of the job", list(JOB_KEYS)))
        self.push_screen(HelpScreen(view_keys))  # type: ignore[arg-type]

    def action_filter(self) -> None:
        if len(self.screen_stack) > 1:
            return
        if self.active_view not in ("layers", "logs"):
            self.tabs.active = "layers"
        self.view_widget().open_filter()

    def action_back(self) -> None:
        """esc: close the top screen, else close/clear a filter. Never quits."""
        if len(self.screen_stack) > 1:
            self.pop_screen()
            return
        view = self.view_widget()
        if hasattr(view, "close_filter"):
            view.close_filter()

    def action_drill(self) -> None:
        if len(self.screen_stack) > 1 or self.active_view != "layers":
            return
        selected = self.view_widget("layers").selected()
        if selected is not None:
            self.push_screen(LayerDetail(selected))
            self.call_after_refresh(self.frame, True)

    def action_toggle_record(self) -> None:
        """R: record the live agent to a file from a second (recorder) connection, or stop doing so."""
        if self.recording is not None and self.recording.running:
            self.recording.stop()
            self.notify(f"recording saved to {self.recording.path}", timeout=5)
            self.recording = None
            return
        sock = getattr(self.source, "path", None)
        stream_paths = getattr(self.source, "paths", None)
        if isinstance(stream_paths, dict):  # a job: the rank on screen
            sock = stream_paths.get(self.selected)
        elif not isinstance(self.source, SocketSource):
            sock = None
        if sock is None:
            self.notify("only a live agent can be recorded", severity="warning", timeout=3)
            return
        from llmtop.tui.commands.record import start_tui_recording

        pid = self.model.session.pid if self.model.session is not None else None
        self.recording = start_tui_recording(sock, pid=pid)
        self.notify(f"recording to {self.recording.path} (R stops)", timeout=5)

    def child_running(self) -> bool:
        return self.child is not None and self.child.poll() is None

    def action_interrupt(self) -> None:
        """ctrl+c: the script gets SIGINT as it would without llmtop; watching, it quits the viewer."""
        if self.child_running():
            self.child.interrupt()
            self.notify("sent SIGINT to the script", timeout=2)
        elif self.child is None:
            self.exit(0)
        else:
            self.notify("the script has ended; q quits", timeout=2)

    def action_quit_or_detach(self) -> None:
        if isinstance(self.screen, QuitScreen):
            return
        if not self.child_running():
            self.exit(0)  # watching: detach at once, the run goes on; attached: the script is done
            return
        script = os.path.basename(next((a for a in self.child.argv if a.endswith(".py")), self.child.argv[0]))
        self.push_screen(QuitScreen(script), self._quit_choice)

    def _quit_choice(self, choice: str | None) -> None:
        if choice == "stop":
            self.notify("stopping the script (SIGINT, then SIGTERM)…", timeout=STOP_GRACE_S + 2)
            self.stop_requested = True
            self._stop_child()
        elif choice == "detach":
            path: Path = self.child.detach()
            # the launcher prints the output so far and this, once the terminal is back
            self.exit_message = (f"llmtop: the script keeps running (pid {self.child.pid}); its output goes to "
                                 f"{path}\n        `llmtop watch {self.child.pid}` opens the dashboard again.")
            self.exit(0)

    @work(thread=True, name="stop-child", exit_on_error=False)
    def _stop_child(self) -> None:
        try:
            self.child.stop(grace_s=STOP_GRACE_S)
            # the dashboard stays until the script has ended (a launcher such as torchrun takes a few
            # seconds to stop its workers); past the SIGTERM's grace, the launcher waits for it
            self.child.wait(STOP_GRACE_S + STOP_AFTER_TERM_S)
        except Exception:  # noqa: BLE001 - still running: the launcher waits for it after the app
            pass
        finally:
            self.call_from_thread(self.exit, 0)

    # --- command palette: the same registry as the footer and help -----------------------------

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for binding in KEYS + (JOB_KEYS if self.job_shown else []):
            if binding.id in ("app.back", "app.drill"):
                continue
            help_text = f"{binding.tooltip or binding.description} [{binding.key_display or binding.key}]"
            yield SystemCommand(binding.description, help_text, partial(self.run_action, binding.action))


def run_attached(child: Any, args: Any) -> None:
    """`llmtop attach`: the dashboard on a child the launcher started; returns when the user quits.

    A script of our own (``attach train.py``) is one stream, as ever. Any other command (``attach --
    torchrun …``) may start several agents: the job source follows the one on the attach socket
    from the start and every other agent of this process tree as it comes up."""
    source: Any = SocketSource(child.socket_path, give_up=lambda: child.poll() is not None)
    if not _runs_python_itself(args):
        from llmtop.tui.session.job_source import JobMatch, JobSource

        source = JobSource(JobModel(), JobMatch(attach=os.getpid()), primary=child.socket_path,
                           give_up=lambda: child.poll() is not None,
                           primary_give_up=lambda: child.poll() is not None)
    app = LlmtopApp(source, child=child, refresh_hz=getattr(args, "refresh", 4.0) or 4.0,
                    window_s=getattr(args, "window", 120.0) or 120.0)
    try:
        app.run()
    finally:
        source.stop()
    # a detached child's log path is printed by the launcher once the terminal is back
    if app.exit_message is None and child.poll() is None and not app.stop_requested:
        # the app ended without a choice (an error, a lost terminal): the script outlives its viewer,
        # its output going on into the log (the holder owns the pty), as after a detach
        child.detach()


def _runs_python_itself(args: Any) -> bool:
    """Whether `llmtop attach` started python on a script or module itself (one process, one agent)."""
    try:
        from llmtop.launch import build_command

        return build_command(args)[1]
    except Exception:  # an odd namespace (tests): the single-stream path, as before
        return True
