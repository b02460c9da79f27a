"""`llmtop export --format html`: one self-contained page of a run, to keep or send.

Plots are plain inline SVG drawn here from the data (one small function per plot type: a line chart
and a stacked bar), so the file needs no network, no script and no charting toolkit to be read:
step time, loss, tokens/s and memory over the run, the phase breakdown, the top layers and ops, and
the text of `llmtop report`. Series longer than ``MAX_POINTS`` are thinned to each bucket's
minimum and maximum, so a spike survives the thinning.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import TextIO

from llmtop.protocol.events import DeviceSample, HostSample, Step
from llmtop.protocol.recording import RecordingReader
from llmtop.tui.session import fmt

MAX_POINTS = 1200  # per plotted series
LAYER_ROWS = 40
WIDTH, HEIGHT = 720, 180
PAD_L, PAD_R, PAD_T, PAD_B = 64, 12, 10, 26
PHASE_COLORS = {"data": "#d62728", "h2d": "#9467bd", "forward": "#1f77b4", "backward": "#ff7f0e",
                "optimizer": "#2ca02c", "other": "#7f7f7f"}
LINE_COLOR = "#1f77b4"

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1100px;
       color: #1b1b1b; padding: 0 16px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
.meta { color: #555; margin: 0 0 12px; }
.crash { border: 1px solid #c62828; background: #fdecea; padding: 8px 12px; white-space: pre-wrap;
         font-family: ui-monospace, monospace; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 8px; }
.figure { border: 1px solid #ddd; border-radius: 6px; padding: 6px 10px; }
.figure b { display: block; font-size: 17px; } .figure span { color: #666; font-size: 12px; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 16px; }
svg { width: 100%; height: auto; } svg text { font: 11px system-ui, sans-serif; fill: #444; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }
.legend span { display: inline-block; margin-right: 14px; } .sw { display: inline-block; width: 10px;
  height: 10px; margin-right: 4px; vertical-align: middle; }
.none { color: #777; font-style: italic; }
@media (prefers-color-scheme: dark) {
  body { background: #141414; color: #e6e6e6; } .meta, .figure span { color: #aaa; }
  svg text { fill: #bbb; } pre { background: #1f1f1f; } th, td { border-color: #333; } .figure { border-color: #333; }
  .crash { background: #3b1414; }
}
"""


@dataclass
class Series:
    """Points over the run: x in seconds from the session start."""

    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)

    def add(self, x: float, y: float | None) -> None:
        if y is not None and math.isfinite(y) and math.isfinite(x):
            self.xs.append(x)
            self.ys.append(y)


def thin(xs: list[float], ys: list[float], limit: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """At most ``limit`` points: each bucket keeps its lowest and highest point, in time order."""
    n = len(xs)
    if n <= limit:
        return xs, ys
    buckets = max(1, limit // 2)
    out_x: list[float] = []
    out_y: list[float] = []
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        if hi <= lo:
            continue
        i_min = min(range(lo, hi), key=ys.__getitem__)
        i_max = max(range(lo, hi), key=ys.__getitem__)
        for i in sorted({i_min, i_max}):
            out_x.append(xs[i])
            out_y.append(ys[i])
    return out_x, out_y


def _nice(v: float) -> str:
    return fmt.count(v) if abs(v) >= 1000 else (f"{v:.3g}" if v else "0")


def line_chart(series: Series, title: str, unit: str, value_text=_nice) -> str:
    """An SVG line chart with a y axis from 0 (or the minimum, if negative) to the maximum."""
    esc = html.escape
    if len(series.xs) < 1:
        return f'<figure><figcaption>{esc(title)}</figcaption><p class="none">no data in this recording</p></figure>'
    xs, ys = thin(series.xs, series.ys)
    x0, x1 = min(xs), max(xs)
    y_lo, y_hi = min(0.0, min(ys)), max(ys)
    if y_hi <= y_lo:
        y_hi = y_lo + 1.0
    if x1 <= x0:
        x1 = x0 + 1.0
    pw, ph = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def px(x: float) -> float:
        return PAD_L + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return PAD_T + ph - (y - y_lo) / (y_hi - y_lo) * ph

    points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys, strict=True))
    grid = []
    for frac in (0.0, 0.5, 1.0):
        y = y_lo + frac * (y_hi - y_lo)
        grid.append(f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
                    f'stroke="#8884" stroke-width="1"/>'
                    f'<text x="{PAD_L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{esc(value_text(y))}</text>')
    xlab = (f'<text x="{PAD_L}" y="{HEIGHT - 6}">{esc(fmt.duration(x0))}</text>'
            f'<text x="{WIDTH - PAD_R}" y="{HEIGHT - 6}" text-anchor="end">{esc(fmt.duration(x1))}</text>'
            f'<text x="{PAD_L + pw / 2:.0f}" y="{HEIGHT - 6}" text-anchor="middle">time into the run</text>')
    shape = (f'<polyline fill="none" stroke="{LINE_COLOR}" stroke-width="1.5" points="{points}"/>' if len(xs) > 1
             else f'<circle cx="{px(xs[0]):.1f}" cy="{py(ys[0]):.1f}" r="3" fill="{LINE_COLOR}"/>')
    return (f'<figure><figcaption>{esc(title)} ({esc(unit)}; {len(series.xs)} points)</figcaption>'
            f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{esc(title)}">'
            f'{"".join(grid)}{shape}{xlab}</svg></figure>')


def stacked_bar(parts: list[tuple[str, float]], colors: dict[str, str]) -> str:
    """One horizontal bar split by share, with a legend."""
    esc = html.escape
    total = sum(v for _, v in parts if v > 0)
    if total <= 0:
        return '<p class="none">no phase times in this recording</p>'
    x = 0.0
    rects, legend = [], []
    for name, v in parts:
        if v <= 0:
            continue
        w = v / total * WIDTH
        color = colors.get(name, "#999")
        rects.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="28" fill="{color}">'
                     f'<title>{esc(name)} {v / total * 100:.1f}%</title></rect>')
        if w > 48:
            rects.append(f'<text x="{x + 4:.1f}" y="18" style="fill:#fff">{esc(name)}</text>')
        legend.append(f'<span><i class="sw" style="background:{color}"></i>{esc(name)} {v / total * 100:.1f}%</span>')
        x += w
    return (f'<svg viewBox="0 0 {WIDTH} 28" role="img" aria-label="phase breakdown">{"".join(rects)}</svg>'
            f'<div class="legend">{"".join(legend)}</div>')


def _table(head: list[tuple[str, bool]], rows: list[list[str]]) -> str:
    esc = html.escape
    th = "".join(f'<th class="n">{esc(h)}</th>' if num else f"<th>{esc(h)}</th>" for h, num in head)
    body = "".join("<tr>" + "".join(f'<td class="n">{esc(c)}</td>' if head[i][1] else f"<td>{esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def write_html(reader: RecordingReader, out: TextIO) -> None:
    from llmtop.tui.commands.report import render
    from llmtop.tui.commands.summarize import summarize

    start = reader.session.started or 0.0
    step_ms, loss, tok_s, rss, dev_mem, cuda = Series(), Series(), Series(), Series(), Series(), Series()
    for e in reader.events(layers=lambda step: False):
        if isinstance(e, Step):
            x = e.t - start if start else float(e.step)
            step_ms.add(x, e.dur_ms)
            loss.add(x, e.loss)
            if e.tokens and e.dur_ms > 0:
                tok_s.add(x, e.tokens / (e.dur_ms / 1000.0))
            if e.cuda_allocated is not None:
                cuda.add(x, float(e.cuda_allocated))
        elif isinstance(e, HostSample):
            rss.add(e.t - start if start else 0.0, float(e.rss))
        elif isinstance(e, DeviceSample) and e.mem_used is not None:
            dev_mem.add(e.t - start if start else 0.0, float(e.mem_used))
    s = summarize(reader)
    data = s.to_json()
    esc = html.escape
    parts: list[str] = []
    script = " ".join(s.session.argv) or "?"
    parts.append(f"<h1>llmtop: {esc(script)}</h1>")
    parts.append(f'<p class="meta">{esc(s.session.hostname or "?")} · pid {s.session.pid} · '
                 f'torch {esc(s.session.torch or "?")} · {esc(", ".join(s.session.devices) or "cpu")} · '
                 f'recorded {esc(fmt.duration(s.duration_s))} · {s.steps} steps · exit: {esc(s.exit_text())}</p>')
    tb = s.traceback_tail()
    if tb and s.crashed():
        parts.append('<div class="crash"><b>The script crashed.</b>\n' + esc("\n".join(tb)) + "</div>")

    st = data["steps"]
    inf = data["inference"] or {}
    figures = [
        ("step p50", fmt.ms(st["step_p50_ms"]) + " ms"), ("step p95", fmt.ms(st["step_p95_ms"]) + " ms"),
        ("tokens/s", fmt.rate(data["tokens"]["tokens_per_s"], "")), ("last loss", fmt.value(data["loss"]["last"])),
        ("FLOPs/step", fmt.flops(st["step_flops"])),
        ("MFU", f"{st['mfu_pct']:.1f} %" if st["mfu_pct"] is not None else fmt.DASH),
        ("RSS peak", fmt.nbytes(data["memory"]["rss_peak_bytes"])),
        ("agent overhead", f"{data['agent']['overhead_share_pct']:.1f} %"
         if data["agent"]["overhead_share_pct"] is not None else fmt.DASH),
    ]
    if inf.get("requests"):
        figures += [("TTFT p50", fmt.ms(inf["ttft_p50_ms"]) + " ms"),
                    ("per token p50", fmt.ms(inf["per_token_p50_ms"], 2) + " ms"),
                    ("KV cache", fmt.nbytes(inf["kv_cache_bytes"]))]
    parts.append('<div class="figures">' + "".join(
        f'<div class="figure"><span>{esc(k)}</span><b>{esc(v)}</b></div>' for k, v in figures) + "</div>")
    if data["missing"]:
        parts.append('<p class="meta">— : ' + esc("; ".join(sorted(set(data["missing"].values())))) + "</p>")

    parts.append("<h2>Over the run</h2><div class=\"plots\">")
    parts.append(line_chart(step_ms, "step time", "ms"))
    parts.append(line_chart(loss, "loss", "per step"))
    parts.append(line_chart(tok_s, "tokens/s", "per step"))
    if dev_mem.xs or cuda.xs:  # the GPU's memory beside the process's own
        gpu, name = (dev_mem, "GPU memory used") if dev_mem.xs else (cuda, "CUDA allocated")
        parts.append(line_chart(gpu, f"memory: {name}", "bytes", fmt.nbytes))
    parts.append(line_chart(rss, "memory: process RSS", "bytes", fmt.nbytes))
    parts.append("</div>")

    parts.append("<h2>Phases</h2>")
    phases = [(p["name"], p["share_pct"]) for p in data["phases"]]
    parts.append(stacked_bar(phases, PHASE_COLORS))
    if data["phases"]:
        parts.append(_table([("phase", False), ("share %", True), ("p50 ms", True)],
                            [[p["name"], f"{p['share_pct']:.1f}", fmt.ms(p["p50_ms"])] for p in data["phases"]]))
    if data["eval"]:
        ev = data["eval"]
        parts.append(f'<p>eval ({esc(ev["source"])}): {ev["count"]} × p50 {esc(fmt.ms(ev["p50_ms"]))} ms, '
                     f'total {esc(fmt.ms(ev["total_ms"]))} ms</p>')

    parts.append("<h2>Layers</h2>")
    layers = s.top_layers(LAYER_ROWS)
    if layers:
        parts.append(_table(
            [("module", False), ("class", False), ("self ms/step (p50)", True), ("fwd p50 ms", True),
             ("bwd p50 ms", True), ("calls", True)],
            [[la.name, la.cls, fmt.ms(la.self_ms(), 3), fmt.ms(la.fwd.median(), 3), fmt.ms(la.bwd.median(), 3),
              str(la.calls)] for la in layers]))
    else:
        parts.append('<p class="none">no layer timing in this recording</p>')
    if data["ops"]["top"]:
        n = data["ops"]["profiles"]
        parts.append(f"<h2>Hottest ops (per profiled step, {n} profile{'s' if n != 1 else ''})</h2>")
        parts.append(_table([("op", False), ("self ms", True), ("calls", True), ("shapes", False)],
                            [[o["name"], fmt.ms(o["self_ms"], 2), f"{o['calls']:.0f}", o["shapes"] or fmt.DASH]
                             for o in data["ops"]["top"]]))
    parts.append("<h2>Report</h2><pre>" + esc(render(s)) + "</pre>")
    out.write("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
              f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
              f"<title>llmtop: {esc(script)}</title><style>{CSS}</style></head><body>\n")
    out.write("\n".join(parts))
    out.write("\n</body></html>\n")
