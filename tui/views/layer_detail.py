"""Layer detail (`enter` on a layer): what the module is and its recent history; in a job, the same
layer on every rank (min / median / max and the ranks at each end)."""

from __future__ import annotations

from typing import Any

from llmtop.tui.session import fmt
from llmtop.tui.session.model import SessionModel
from llmtop.tui.views.widgets import SparkRow
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static


class LayerDetail(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="detail.back")]
    DEFAULT_CSS = """
    LayerDetail #detail-info { height: auto; padding: 0 1; }
    LayerDetail VerticalScroll { padding: 0 1; }
    LayerDetail #detail-ranks { display: none; height: auto; }
    """

    def __init__(self, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self._seen = -1

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(id="detail-info")
            yield Static(id="detail-ranks")
            yield SparkRow("fwd ms", id="detail-fwd")
            yield SparkRow("bwd ms", id="detail-bwd")
            yield SparkRow("act mem", id="detail-act")
            yield Static(id="detail-children")
        yield Footer()

    def refresh_view(self, model: SessionModel, window_s: float) -> None:
        job = getattr(self.app, "job", None) if getattr(self.app, "job_shown", False) else None
        version = model.version if job is None else (model.version, job.version())
        if version == self._seen or not self.query("#detail-children"):
            return  # nothing new, or not composed yet (the next frame draws it)
        self._seen = version
        layer = model.layers.get(self.layer_id)
        info = self.query_one("#detail-info", Static)
        if layer is None:
            info.update(Text("this module is no longer in the model tree", style="dim"))
            return
        t = Text()
        t.append(layer.path or "(root)", style="bold")
        t.append(f"  {layer.cls}\n")
        t.append(f"params {fmt.count(layer.total_params)} ({fmt.count(layer.params)} own) · "
                 f"dtype {layer.dtype or fmt.DASH} · {'trainable' if layer.trainable else 'frozen'}"
                 f"{' · compiled' if layer.compiled else ''}\n")
        t.append(f"forward {fmt.ms(layer.fwd_ema)} ms (self {fmt.ms(layer.fwd_self_ms)}) · "
                 f"backward {fmt.ms(layer.bwd_ema)} ms · {fmt.pct(model.layer_share(layer))} of step · "
                 f"calls {fmt.DASH if layer.calls is None else layer.calls}\n")
        t.append(f"FLOPs/call {fmt.flops(layer.flops)} (latest signature) · bytes/call {fmt.nbytes(layer.bytes)}")
        if layer.intensity is not None:
            t.append(f" · intensity {layer.intensity:.1f} FLOP/B")
        step = fmt.DASH if layer.step_flops_step is None else str(layer.step_flops_step)
        t.append(f"\nstep {step}: FLOPs {fmt.flops(layer.step_flops)} · "
                 f"achieved {fmt.flops(layer.achieved_flops)} FLOP/s · bound {layer.bound or fmt.DASH}")
        if layer.achieved_note:
            t.append(f" ({layer.achieved_note})", style="dim")
        stale = model.layers_stale
        if stale:
            t.append(f"\n⚠ {stale}", style="yellow")
        info.update(t)
        if job is not None:
            self._show_ranks(job, model, layer.path)
        hist = list(layer.history)
        fwd = [h[1] for h in hist]
        bwd = [h[2] for h in hist if h[2] is not None]
        act = [float(h[3]) for h in hist if h[3] is not None]
        self.query_one("#detail-fwd", SparkRow).show(fwd, fmt.ms(fwd[-1]) if fwd else fmt.DASH)
        self.query_one("#detail-bwd", SparkRow).show(bwd, fmt.ms(bwd[-1]) if bwd else fmt.DASH)
        self.query_one("#detail-act", SparkRow).show(act, fmt.nbytes(act[-1]) if act else fmt.DASH)
        kids = Text("children\n", style="bold") if layer.children else Text("no children", style="dim")
        for cid in layer.children[:40]:
            child = model.layers.get(cid)
            if child is not None:
                kids.append(f"  {child.name:<20} {child.cls:<24} {fmt.ms(child.time_ms):>8} ms\n")
        self.query_one("#detail-children", Static).update(kids)

    def _show_ranks(self, job: Any, model: SessionModel, path: str) -> None:
        """This layer on every rank (matched by module path), forward and backward."""
        box = self.query_one("#detail-ranks", Static)
        t = Text("\nacross ranks", style="bold")
        shown = False
        for which, title in (("fwd", "forward"), ("bwd", "backward")):
            across = job.layer_across(path, held=model, which=which)
            if across is None:
                continue
            shown = True
            t.append(f"\n{title:<9} min {fmt.ms(across.min_ms, 2)} ms (rank {across.min_rank}) · "
                     f"median {fmt.ms(across.median_ms, 2)} · max {fmt.ms(across.max_ms, 2)} ms (rank {across.max_rank})",
                     style="" if across.max_ms <= 1.1 * across.median_ms else "yellow")
            t.append(f" · {len(across.values)} ranks", style="dim")
        if not shown:
            t.append("\nno other rank has timed this layer yet", style="dim")
        box.update(t)
        box.display = True
