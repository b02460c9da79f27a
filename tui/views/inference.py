"""Inference: generate calls: requests, time to first token, per-token latency, tokens/s, KV cache."""

from __future__ import annotations

from llmtop.protocol.formulas import percentile
from llmtop.tui.session import fmt
from llmtop.tui.session.model import SessionModel
from llmtop.tui.views.widgets import KeyedTable, SparkRow, show_text
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

RECENT = 50
COLUMNS = (("n", "#"), ("batch", "batch"), ("prompt", "prompt"), ("new", "new"), ("ttft", "TTFT ms"),
           ("p50", "tok p50"), ("p95", "tok p95"), ("rate", "tok/s"), ("kv", "KV cache"))


class InferenceView(Vertical):
    DEFAULT_CSS = """
    InferenceView { padding: 0 1; }
    InferenceView #inf-summary { height: auto; }
    InferenceView DataTable { height: 1fr; margin: 1 0 0 0; }
    """

    def compose(self) -> ComposeResult:
        yield Static(id="inf-summary")
        yield SparkRow("TTFT ms", id="inf-ttft")
        yield SparkRow("ms/token", id="inf-tok")
        yield SparkRow("tokens/s", id="inf-rate")
        yield SparkRow("KV cache", id="inf-kv")
        yield DataTable(id="inf-table", cursor_type="row")

    def on_mount(self) -> None:
        self._keyed = KeyedTable(self.query_one(DataTable), COLUMNS)

    def refresh_view(self, model: SessionModel, window_s: float) -> None:
        gens = model.recent_generations(window_s)
        summary = Text()
        if not model.generation_count:
            summary.append("no generate calls yet (transformers generate() and decode loops show here)",
                           style="dim")
        else:
            last = model.generations[-1]
            decode = model.decode_latency(window_s)
            ttfts = [g.ttft_ms for g in gens]
            summary.append(f"{model.generation_count} requests · {fmt.count(model.generated_tokens)} tokens · ")
            summary.append(f"TTFT p50 {fmt.ms(percentile(ttfts, 50))} / p95 {fmt.ms(percentile(ttfts, 95))} ms · ")
            summary.append(f"per token p50 {fmt.ms(percentile(decode, 50), 2)} / p95 {fmt.ms(percentile(decode, 95), 2)} ms")
            summary.append(f"\nlast: batch {last.batch}, prompt {last.prompt_tokens}, new {last.new_tokens}, "
                           f"{fmt.rate(model.generation_tokens_per_s(last), ' tok/s')}, "
                           f"KV cache {fmt.nbytes(model.kv_bytes)}")
            if model.prefill_tokens_total or model.decode_tokens_total:
                # the steps' tokens as the forwards ran them: prompts in prefill, one per sequence per decode
                summary.append(f"\nforward tokens: prefill {fmt.count(model.prefill_tokens_total)} · "
                               f"decode {fmt.count(model.decode_tokens_total)}")
        show_text(self.query_one("#inf-summary", Static), summary)
        last_g = gens[-1] if gens else None
        self.query_one("#inf-ttft", SparkRow).show([g.ttft_ms for g in gens],
                                                   fmt.ms(last_g.ttft_ms) if last_g else fmt.DASH)
        decode = model.decode_latency(window_s)
        self.query_one("#inf-tok", SparkRow).show(decode, fmt.ms(decode[-1], 2) if decode else fmt.DASH)
        rates = [r for r in (model.generation_tokens_per_s(g) for g in gens) if r is not None]
        self.query_one("#inf-rate", SparkRow).show(rates, fmt.rate(rates[-1]) if rates else fmt.DASH)
        kv = [float(g.kv_bytes) for g in gens if g.kv_bytes is not None]
        self.query_one("#inf-kv", SparkRow).show(kv, fmt.nbytes(model.kv_bytes))

        recent = list(model.generations)[-RECENT:]
        first_n = model.generation_count - len(recent) + 1
        rows = []
        for i, g in enumerate(recent):
            n = first_n + i
            rows.append((n, (str(n), str(g.batch), str(g.prompt_tokens), str(g.new_tokens), fmt.ms(g.ttft_ms),
                             fmt.ms(percentile(g.decode_ms, 50), 2), fmt.ms(percentile(g.decode_ms, 95), 2),
                             fmt.rate(model.generation_tokens_per_s(g), ""), fmt.nbytes(g.kv_bytes))))
        rows.reverse()  # newest first
        self._keyed.sync(rows)
