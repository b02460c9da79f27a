"""Overview: the run at a glance: sparklines, phase bar, diagnoses, hottest layers and ops."""

from __future__ import annotations

import math

from llmtop.protocol.events import PHASES
from llmtop.tui.session import fmt
from llmtop.tui.session.diagnoses import diagnose
from llmtop.tui.session.model import SessionModel
from llmtop.tui.views.widgets import (
    PHASE_GLYPHS,
    PHASE_LABELS,
    PHASE_STYLES,
    PhaseBar,
    SparkRow,
    heat_style,
    show_text,
)
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Static

MAX_METRIC_ROWS = 6
WIDE = 140  # terminal columns from which the overview lays out in two columns
HOT_ROWS = 5  # hottest layers and ops shown; in two columns, up to MAX_HOT_ROWS as the height allows
MAX_HOT_ROWS = 25
SEVERITY_MARK = {"error": ("✖", "bold red"), "warning": ("▲", "yellow"), "info": ("·", "")}


class OverviewView(VerticalScroll):
    """One column up to WIDE columns; from WIDE on, two: the run over time (sparklines, phases) on the
    left, what to look at (diagnoses, hottest layers and ops) on the right, with as many layer and op
    rows as the height allows."""

    DEFAULT_CSS = """
    OverviewView { padding: 0 1; }
    OverviewView #ov-main { height: auto; layout: vertical; }
    OverviewView.wide #ov-main { layout: horizontal; }
    OverviewView #ov-left, OverviewView #ov-right { height: auto; }
    OverviewView.wide #ov-left { width: 1fr; }
    OverviewView.wide #ov-right { width: 1fr; margin: 0 0 0 2; }
    OverviewView #ov-gpus { height: auto; }
    OverviewView #ov-metrics { height: auto; }
    OverviewView #ov-sparks { height: auto; }
    OverviewView .section { height: auto; margin: 1 0 0 0; }
    OverviewView.wide #ov-diag { margin: 0; }
    OverviewView #ov-phase-table, OverviewView #ov-totals { display: none; }
    OverviewView.wide #ov-phase-table, OverviewView.wide #ov-totals { display: block; }
    OverviewView #ov-hot { height: auto; layout: horizontal; }
    OverviewView.narrow #ov-hot, OverviewView.wide #ov-hot { layout: vertical; }
    OverviewView #ov-hot > Static { width: 1fr; height: auto; text-wrap: nowrap; text-overflow: ellipsis; }
    OverviewView.narrow #ov-hot-ops, OverviewView.wide #ov-hot-ops { margin: 1 0 0 0; }
    """

    def compose(self) -> ComposeResult:
        with Horizontal(id="ov-main"):
            with Vertical(id="ov-left"):
                with Vertical(id="ov-sparks"):
                    yield SparkRow("step ms", id="ov-step")
                    yield SparkRow("steps/s", id="ov-rate")
                    yield SparkRow("loss", id="ov-loss")
                    yield SparkRow("CPU %", id="ov-cpu")
                    yield SparkRow("RSS", id="ov-rss")
                    yield Vertical(id="ov-gpus")
                    yield Vertical(id="ov-metrics")
                yield PhaseBar(id="ov-phases")
                yield Static(id="ov-phase-table", classes="section")
                yield Static(id="ov-totals", classes="section")
            with Vertical(id="ov-right"):
                yield Static(id="ov-diag", classes="section")
                with Horizontal(id="ov-hot", classes="section"):
                    yield Static(id="ov-hot-layers")
                    yield Static(id="ov-hot-ops")

    def refresh_view(self, model: SessionModel, window_s: float) -> None:
        wide = self.app.size.width >= WIDE  # terminal columns, as the user counts them
        self.set_class(self.size.width < 120, "narrow")
        self.set_class(wide, "wide")
        steps = model.recent_steps(window_s)
        step_ms = [s.dur_ms for s in steps]
        last = model.last_step
        self.query_one("#ov-step", SparkRow).show(step_ms, f"{fmt.ms(last.dur_ms)} ms" if last else fmt.DASH)

        rate_row = self.query_one("#ov-rate", SparkRow)
        if any(s.tokens for s in steps):
            rate_row.set_label("tokens/s")
            series = [s.tokens / (s.dur_ms / 1000.0) for s in steps if s.tokens and s.dur_ms > 0]
            rate_row.show(series, fmt.rate(model.tokens_per_s(), " tok/s"))
        else:
            rate_row.set_label("steps/s")
            series = [1000.0 / s.dur_ms for s in steps if s.dur_ms > 0]
            rate_row.show(series, fmt.rate(model.steps_per_s(), " /s"))

        losses = [s.loss for s in steps if s.loss is not None and math.isfinite(s.loss)]
        loss_text = fmt.value(last.loss) if last is not None and last.loss is not None else fmt.DASH
        if last is not None and last.loss is not None and last.losses > 1:
            loss_text += f" (Σ{last.losses})"  # a sum of micro-batch losses: the totals say so in words
        self.query_one("#ov-loss", SparkRow).show(losses, loss_text)

        host = model.recent_host(window_s)
        h = host[-1] if host else None
        self.query_one("#ov-cpu", SparkRow).show([x.cpu_pct for x in host],
                                                 f"{h.cpu_pct:.0f} %" if h else fmt.DASH)
        self.query_one("#ov-rss", SparkRow).show([float(x.rss) for x in host], fmt.nbytes(h.rss) if h else fmt.DASH)
        self._gpus(model, window_s)
        self._metrics(model, window_s)

        self.query_one("#ov-phases", PhaseBar).show(model.phase_totals(window_s))
        diag = diagnoses_text(model, window_s)
        show_text(self.query_one("#ov-diag", Static), diag)
        rows = HOT_ROWS
        if wide:  # the right column's height goes to more layer and op rows
            show_text(self.query_one("#ov-phase-table", Static), phase_table_text(model, window_s))
            show_text(self.query_one("#ov-totals", Static), totals_text(model))
            spare = self.size.height - len(diag.plain.splitlines()) - 5  # two titles, a gap, a margin
            rows = max(HOT_ROWS, min(MAX_HOT_ROWS, spare // 2))
        show_text(self.query_one("#ov-hot-layers", Static), hot_layers_text(model, rows))
        show_text(self.query_one("#ov-hot-ops", Static), hot_ops_text(model, rows, shapes=wide))

    def _gpus(self, model: SessionModel, window_s: float) -> None:
        box = self.query_one("#ov-gpus", Vertical)
        for index in sorted(model.devices):
            util_id, mem_id = f"ov-gpu{index}-util", f"ov-gpu{index}-mem"
            if not box.query(f"#{util_id}"):
                box.mount(SparkRow(f"GPU{index} util", id=util_id), SparkRow(f"GPU{index} mem", id=mem_id))
                continue  # the new rows compose on the next frame
            samples = model.recent_device(index, window_s)
            last = samples[-1] if samples else None
            util = [s.util_pct for s in samples if s.util_pct is not None]
            mem = [float(s.mem_used) for s in samples if s.mem_used is not None]
            util_text = f"{last.util_pct:.0f} %" if last and last.util_pct is not None else fmt.DASH
            if last and last.mem_used is not None:
                mem_text = fmt.nbytes(last.mem_used)
                if last.mem_total:
                    mem_text += f" / {fmt.nbytes(last.mem_total)}"
            else:
                mem_text = fmt.DASH
            self.query_one(f"#{util_id}", SparkRow).show(util, util_text)
            self.query_one(f"#{mem_id}", SparkRow).show(mem, mem_text)


    def _metrics(self, model: SessionModel, window_s: float) -> None:
        """Custom series (``llmtop.agent.metric``, Trainer's logs): the first few, by name."""
        box = self.query_one("#ov-metrics", Vertical)
        cutoff = model.now - window_s
        for i, name in enumerate(sorted(model.metrics)[:MAX_METRIC_ROWS]):
            row_id = f"ov-metric-{i}"
            rows = box.query(f"#{row_id}")
            if not rows:
                box.mount(SparkRow(name[-12:], id=row_id))
                continue
            row = rows.first(SparkRow)
            row.set_label(name[-12:])
            ring = model.metrics[name]
            values = [v for t, v in ring if t >= cutoff and math.isfinite(v)]
            row.show(values, fmt.value(ring[-1][1]) if ring else fmt.DASH)


def diagnoses_text(model: SessionModel, window_s: float) -> Text:
    text = Text("Diagnoses\n", style="bold", no_wrap=True, overflow="ellipsis")
    found = diagnose(model, window_s)
    if not found:
        text.append("  nothing to report yet" if not model.steps else "  nothing unusual", style="dim")
        return text
    for i, d in enumerate(found[:6]):
        mark, style = SEVERITY_MARK.get(d.severity, ("·", ""))
        text.append(f"  {mark} ", style=style)
        text.append(d.text)
        if i < min(len(found), 6) - 1:
            text.append("\n")
    return text


def hot_layers_text(model: SessionModel, n: int = HOT_ROWS) -> Text:
    text = Text("Hottest layers\n", style="bold", no_wrap=True, overflow="ellipsis")
    hot = model.hottest_layers(n)
    if not hot:
        text.append("  no layer timing yet", style="dim")
        return text
    lines = []
    for layer in hot:
        share = model.layer_share(layer)
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(f"{fmt.pct(share):>6} ", style=heat_style(share))
        line.append(f"{fmt.ms(layer.time_ms):>6} ms  ")
        line.append(layer.path or layer.cls)
        line.append(f"  {layer.cls}", style="dim")
        lines.append(line)
    text.append_text(Text("\n").join(lines))
    return text


def hot_ops_text(model: SessionModel, n: int = HOT_ROWS, shapes: bool = True) -> Text:
    text = Text("Hottest ops", style="bold", no_wrap=True, overflow="ellipsis")
    if model.ops_step is not None:
        text.append(f" (step {model.ops_step})", style="dim")
        if shapes and not any(op.shapes for op in model.ops):
            text.append(" · input shapes not recorded in this profile", style="dim")
    text.append("\n")
    if not model.ops:
        text.append("  no op profile yet", style="dim")
        return text
    total = model.ops_total_ms or sum(op.self_ms for op in model.ops) or 1.0  # the profiled step's op time
    width = max(len(op.name) for op in model.ops[:n])
    lines = []
    for op in model.ops[:n]:
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(f"{op.self_ms / total * 100:5.1f}% {fmt.ms(op.self_ms):>6} ms  ×{op.calls:<4} ")
        line.append(op.name.ljust(width) if shapes and op.shapes else op.name)
        if shapes and op.shapes:
            line.append(f"  {op.shapes}", style="dim")
        lines.append(line)
    text.append_text(Text("\n").join(lines))
    return text


def phase_table_text(model: SessionModel, window_s: float) -> Text:
    """Each phase's mean time per step and share over the window (the bar above, in numbers)."""
    text = Text("Phases per step", style="bold", no_wrap=True, overflow="ellipsis")
    text.append(f" (last {fmt.duration(window_s)})", style="dim")
    totals = model.phase_totals(window_s)
    steps = len(model.recent_steps(window_s))
    total = sum(totals.values())
    if not totals or not steps or total <= 0:
        text.append("\n  no phase data yet", style="dim")
        return text
    for phase in PHASES:
        ms = totals.get(phase, 0.0)
        text.append("\n  ")
        text.append(PHASE_GLYPHS[phase], style=PHASE_STYLES[phase])
        text.append(f" {PHASE_LABELS[phase]:<6} {fmt.ms(ms / steps):>7} ms  {ms / total * 100:5.1f} %")
    return text


def totals_text(model: SessionModel) -> Text:
    """Counts since the start: what the sparklines' window does not show."""
    text = Text("Since the start", style="bold", no_wrap=True, overflow="ellipsis")
    rows = [("steps", fmt.count(model.step_count))]
    if model.tokens_total:
        rows.append(("tokens", fmt.count(model.tokens_total)))
        if model.prefill_tokens_total or model.decode_tokens_total:  # generate() steps: counted apart
            rows.append(("  prefill/decode", f"{fmt.count(model.prefill_tokens_total)} / "
                                             f"{fmt.count(model.decode_tokens_total)}"))
    if model.samples_total:
        rows.append(("samples", fmt.count(model.samples_total)))
    if model.generation_count:
        rows.append(("generate calls", fmt.count(model.generation_count)))
        rows.append(("generated tokens", fmt.count(model.generated_tokens)))
    first = next((s.loss for s in model.steps if s.loss is not None), None)
    last = model.last_step.loss if model.last_step is not None else None
    if first is not None and last is not None:
        rows.append(("loss", f"{fmt.value(first)} → {fmt.value(last)}"))
        if model.loss_note():
            rows.append(("  loss is the", model.loss_note()))
    if model.eval_count:
        rows.append(("evaluations", f"{fmt.count(model.eval_count)} ({fmt.ms(model.eval_ms_total)} ms, apart)"))
    if model.achieved_flops is not None and model.mfu is not None:
        peak = model.last_step_flops.peak_flops if model.last_step_flops is not None else None
        source = f", {model.peak_source}" if model.peak_source else ""
        rows.append(("achieved", f"{fmt.flops(model.achieved_flops)}/s, MFU {fmt.pct(model.mfu)}"))
        rows.append(("  of peak", f"{fmt.flops(peak)}/s{source}"))
    for label, value in rows:
        text.append(f"\n  {label:<17}{value}")
    return text
