"""Memory: device allocated / reserved / peak over time, process RSS, per-GPU memory, and the
layers that allocate the most activation memory."""

from __future__ import annotations

from llmtop.tui.session import fmt
from llmtop.tui.session.model import SessionModel
from llmtop.tui.views.layers import display_name
from llmtop.tui.views.widgets import KeyedTable, SparkRow, show_text
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import DataTable, Static

TOP_ALLOCATORS = 10


class MemoryView(VerticalScroll):
    DEFAULT_CSS = """
    MemoryView { padding: 0 1; }
    MemoryView #mem-gpus { height: auto; }
    MemoryView .section { height: auto; margin: 1 0 0 0; }
    MemoryView DataTable { height: auto; max-height: 14; }
    """

    def compose(self) -> ComposeResult:
        yield SparkRow("allocated", id="mem-alloc")
        yield SparkRow("reserved", id="mem-reserved")
        yield SparkRow("peak", id="mem-peak")
        yield SparkRow("RSS", id="mem-rss")
        yield SparkRow("system", id="mem-sys")
        yield Vertical(id="mem-gpus")
        yield Static(id="mem-note", classes="section")
        yield DataTable(id="mem-table", cursor_type="row")

    def on_mount(self) -> None:
        self._keyed = KeyedTable(self.query_one(DataTable), (
            ("name", "layer (activation memory)"), ("class", "class"), ("act", "mean"), ("last", "last"),
        ))

    def refresh_view(self, model: SessionModel, window_s: float) -> None:
        steps = model.recent_steps(window_s)
        for row_id, attr in (("mem-alloc", "cuda_allocated"), ("mem-reserved", "cuda_reserved"),
                             ("mem-peak", "cuda_peak")):
            values = [float(getattr(s, attr)) for s in steps if getattr(s, attr) is not None]
            last = values[-1] if values else None
            self.query_one(f"#{row_id}", SparkRow).show(values, fmt.nbytes(last))
        host = model.recent_host(window_s)
        h = host[-1] if host else None
        self.query_one("#mem-rss", SparkRow).show([float(x.rss) for x in host], fmt.nbytes(h.rss) if h else fmt.DASH)
        sys_text = f"{fmt.nbytes(h.sys_used)} / {fmt.nbytes(h.sys_total)}" if h else fmt.DASH
        self.query_one("#mem-sys", SparkRow).show([float(x.sys_used) for x in host], sys_text)

        box = self.query_one("#mem-gpus", Vertical)
        for index in sorted(model.devices):
            row_id = f"mem-gpu{index}"
            if not box.query(f"#{row_id}"):
                box.mount(SparkRow(f"GPU{index} used", id=row_id))
                continue
            samples = model.recent_device(index, window_s)
            used = [float(s.mem_used) for s in samples if s.mem_used is not None]
            last = samples[-1] if samples else None
            text = fmt.DASH
            if last is not None and last.mem_used is not None:
                text = fmt.nbytes(last.mem_used) + (f" / {fmt.nbytes(last.mem_total)}" if last.mem_total else "")
            self.query_one(f"#{row_id}", SparkRow).show(used, text)

        allocators = sorted((la for la in model.layers.values() if la.act_ema), key=lambda la: la.act_ema or 0,
                            reverse=True)[:TOP_ALLOCATORS]
        note = Text("Top allocating layers", style="bold")
        if model.layers_stale:
            note.append(f"  ⚠ {model.layers_stale}", style="yellow")
        if not allocators:
            note.append("\n  " + ("activation memory is measured on CUDA devices; none here" if model.layers
                                  else "no model yet"), style="dim")
        if steps and steps[-1].cuda_allocated is None:
            note.append("\n  device memory: " + fmt.DASH + " (no CUDA device in this run)", style="dim")
        show_text(self.query_one("#mem-note", Static), note)
        self._keyed.sync(
            (str(la.id), (la.path or display_name(la, model.layers), la.cls, fmt.nbytes(la.act_ema),
                          fmt.nbytes(la.act_bytes)))
            for la in allocators
        )
