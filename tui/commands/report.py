"""`llmtop report FILE [--json]`: a recording's run in one screen of text.

The command and the text form (``render``, one section per dashboard view that has data). The figures
come from ``summarize.py`` (one bounded pass over the events) into a ``summary.RunSummary``, whose
``to_json`` is the ``--json`` form; ``llmtop diff`` compares two such summaries; ``llmtop export`` puts
one in its JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from llmtop.protocol.events import PHASES
from llmtop.tui.commands import textstyle
from llmtop.tui.commands.common import read_recordings
from llmtop.tui.commands.job_summary import JobSummary, open_job
from llmtop.tui.commands.summarize import open_summary
from llmtop.tui.commands.summary import ModeSteps, RunSummary
from llmtop.tui.commands.textstyle import BOLD, RED, YELLOW, paint
from llmtop.tui.session import fmt

HELP = ("Summarize a recording: run and exit, steps and FLOPs, phases, loss, tokens, layers, ops, memory, "
        "spans, inference, diagnoses and the agent's own cost.")
SPAN_ROWS = 12  # span rows in the text
SEVERITY_SGR = {"error": (BOLD, RED), "warning": (YELLOW,)}


def _ms(value: float | None, digits: int = 1) -> str:
    """Milliseconds with their unit (fmt.ms writes 10 s and more as seconds, with its own unit)."""
    text = fmt.ms(value, digits)
    return text if text == fmt.DASH or text.endswith("s") else f"{text} ms"


def _plural(n: float, word: str) -> str:
    return f"{n:.0f} {word}" + ("" if round(n) == 1 else "s")


def _kv(pairs: list[tuple[str, str]]) -> str:
    return "   ".join(f"{k} {v}" for k, v in pairs)


def render(s: RunSummary, color: bool = False) -> str:
    """The summary as text, one section per dashboard view that has data, in the dashboard's order.
    ``color``: bold section titles and red/yellow severities (only for a terminal that wants them)."""
    lines: list[str] = []

    def title(text: str, *sgr: str) -> str:
        return paint(text, *(sgr or (BOLD,)), on=color)

    sess = s.session
    tb = s.traceback_tail()
    if tb and s.crashed():
        lines.append(title("CRASHED: the script's traceback ends with", BOLD, RED))
        lines += [f"  {line}" for line in tb]
        lines.append("")
    script = " ".join(sess.argv) or "?"
    lines.append(f"{os.path.basename(s.path)}: {script}")
    lines.append(f"  pid {sess.pid} on {sess.hostname or '?'}, python {sess.python or '?'}, torch {sess.torch or '?'}"
                 f"{', transformers ' + sess.transformers if sess.transformers else ''}; "
                 f"devices: {', '.join(sess.devices) or 'cpu'}")
    lines.append(f"  recorded {fmt.duration(s.duration_s)}, {s.steps} steps"
                 + (f" ({s.first_step}..{s.last_step})" if s.steps else "")
                 + f"; exit: {s.exit_text()}")
    if s.warning:
        lines.append(f"  note: {s.warning}")
    ranks = s.ranks()
    if ranks:
        lines.append(f"  rank {ranks['rank'] if ranks['rank'] is not None else '?'} of {ranks['world_size']}"
                     + (f", job {ranks['job']}" if ranks["job"] else ""))
    if s.comm_ms.n or s.comm_calls:
        lines.append("  collectives: " + _kv([("p50 per step", _ms(s.comm_ms.median())),
                                              ("calls", fmt.count(s.comm_calls)),
                                              ("carried", fmt.nbytes(s.comm_bytes))]))

    main_name = s.main_mode()
    main = s.modes.get(main_name or "")
    if main is not None:
        r = main.step_ms
        lines.append(title(f"\nsteps ({main_name}, {main.count})"))
        lines.append("  " + _kv([("p50", _ms(r.median())), ("p95", _ms(r.quantile(0.95))),
                                 ("max", _ms(r.max))]))
        figures, why = s.flops_figures()
        flop_line = [("FLOPs/step", fmt.flops(figures["step_flops"])),
                     ("achieved", fmt.rate(figures["achieved_flop_per_s"], "FLOP/s")
                      if figures["achieved_flop_per_s"] else fmt.DASH),
                     ("MFU", f"{figures['mfu_pct']:.1f}%" if figures["mfu_pct"] is not None else fmt.DASH)]
        lines.append("  " + _kv(flop_line))
        reasons = sorted(set(why.values()))
        if reasons:
            lines.append(f"  (— : {'; '.join(reasons)})")
        _phase_lines(lines, "phases", main)
    ev = s.eval_steps()
    if ev is not None:
        lines.append(f"\neval steps ({ev.count})  p50 {_ms(ev.step_ms.median())}   "
                     f"p95 {_ms(ev.step_ms.quantile(0.95))}   max {_ms(ev.step_ms.max)}")
        _phase_lines(lines, "eval phases", ev)
    elif s.evaluations.n:
        r = s.evaluations
        lines.append(f"\neval (evaluate calls, {r.n})  total {_ms(r.total)}   p50 {_ms(r.median())}   "
                     f"max {_ms(r.max)}")
    if s.loss_count or s.nonfinite_losses:
        loss = [("first", fmt.value(s.first_loss)), ("last", fmt.value(s.last_loss)), ("min", fmt.value(s.min_loss))]
        if s.nonfinite_losses:
            loss.append(("non-finite steps", str(s.nonfinite_losses)))
        lines.append("\nloss       " + _kv(loss))
    tok: list[tuple[str, str]] = []
    if s.tokens:
        tok += [("in steps", fmt.count(s.tokens)), ("rate", fmt.rate(s.tokens_per_s(), " tok/s"))]
    pad = s.padding_share()
    if s.tok_calls:
        tok.append(("tokenized", fmt.count(s.tok_tokens)))
        if pad is not None:
            tok += [("real", fmt.count(s.tok_tokens - s.tok_pads)), ("padding", fmt.count(s.tok_pads)),
                    ("padding share", fmt.pct(pad))]
    if s.requests:
        tok += [("prefill", fmt.count(s.prefill_tokens)), ("decode", fmt.count(s.decode_tokens))]
    if tok:
        lines.append("tokens     " + _kv(tok))

    top = s.top_layers()
    if top:
        lines.append(title("\ntop layers (self time per step, p50 fwd + p50 bwd)"))
        for la in top:
            lines.append(f"  {fmt.ms(la.self_ms(), 2):>9} ms  {la.name}  ({la.cls})")
    ops = s.top_ops(5)
    if ops:
        base = ("of the listed ops' time: the agent sent no step total" if s.op_totals_missing
                else f"of the step's {_ms(s.op_total_ms / s.op_windows, 2)} of op time")
        lines.append(title(f"\ntop ops (per profiled step, {_plural(s.op_windows, 'profile')}; % {base})"))
        for name, ms, calls, share in ops:
            shapes = s.op_shapes.get(name)
            pct = f"{share * 100:5.1f}%" if share is not None else "    —"
            lines.append(f"  {fmt.ms(ms, 2):>9} ms {pct}  {name}  x{calls:.0f}" + (f"  [{shapes}]" if shapes else ""))
    mem = []
    if s.cuda_peak:
        mem.append(("CUDA peak", fmt.nbytes(s.cuda_peak)))
    if s.device_mem_peak:
        mem.append(("device used peak", fmt.nbytes(s.device_mem_peak)))
    if s.rss_peak:
        mem.append(("RSS peak", fmt.nbytes(s.rss_peak)))
        if s.rss_first is not None and s.rss_last is not None:
            mem.append(("RSS first→last", f"{fmt.nbytes(s.rss_first)} → {fmt.nbytes(s.rss_last)}"))
    if mem:
        lines.append("\nmemory     " + _kv(mem))

    if s.spans:
        lines.append(title("\nspans"))
        for ld in s.loads:
            extra = [_ms(ld['load_ms'])]
            if ld.get("params"):
                extra.append(f"{fmt.count(ld['params'])} params")
            if ld.get("dtype"):
                extra.append(str(ld["dtype"]))
            if ld.get("error"):
                extra.append(f"failed: {ld['error']}")
            lines.append(f"  loading      {ld['what']} {ld['name']}: {', '.join(extra)}")
        if s.tok_calls:
            t = [_plural(s.tok_calls, "call"), f"{fmt.count(s.tok_texts)} texts", f"{fmt.count(s.tok_tokens)} tokens",
                 _ms(s.tok_ms)]
            t.append(f"padding {fmt.pct(pad)}" if pad is not None else "padding — (no attention mask)")
            if s.tok_truncation_known:
                t.append(f"{s.tok_truncated} truncated")
            lines.append(f"  tokenization {', '.join(t)}")
        rows = s.span_rows()
        width = min(40, max(len(f"{sp.category}/{sp.name}") for sp in rows))
        for sp in rows[:SPAN_ROWS]:
            label = f"{sp.category}/{sp.name}"
            lines.append(f"  {label[:width]:<{width}}  x{sp.count:<5} total {_ms(sp.total_ms):>10}"
                         f"   p50 {_ms(sp.dur_ms.median()):>10}   p95 {_ms(sp.dur_ms.quantile(0.95)):>10}")
        if len(rows) > SPAN_ROWS:
            lines.append(f"  … {len(rows) - SPAN_ROWS} more (--json has them all)")

    if s.requests or s.pipelines:
        lines.append(title("\ninference"))
        if s.requests:
            lines.append(f"  {_plural(s.requests, 'request')} ({_plural(s.sequences, 'sequence')})   "
                         + _kv([("TTFT p50", _ms(s.ttft_ms.median())),
                                ("p95", _ms(s.ttft_ms.quantile(0.95)))]))
            lines.append("  " + _kv([("per token p50", _ms(s.per_token_ms.median(), 2)),
                                     ("p95", _ms(s.per_token_ms.quantile(0.95), 2)),
                                     ("KV cache", fmt.nbytes(s.kv_bytes) if s.kv_bytes is not None
                                      else "— (no cache measured)")]))
        for name, (calls, items, ms) in sorted(s.pipelines.items()):
            rate = fmt.rate(items / (ms / 1000.0), " items/s") if ms > 0 and items else fmt.DASH
            lines.append(f"  {name}: {_plural(calls, 'call')}, {_plural(items, 'item')}, {rate}")

    diags = s.diagnoses()
    if diags:
        lines.append(title("\ndiagnoses"))
        for sev, text in diags[:8]:
            lines.append(f"  {paint(f'[{sev}]', *SEVERITY_SGR.get(sev, ()), on=color)} {text}")

    share = s.overhead_share()
    agent = []
    if share is not None:
        agent += [("overhead", f"{share * 100:.1f}% of step time"),
                  ("per step p50", f"{s.overhead_us.median():.0f} µs")]
    if s.agent_cpu_max is not None:
        agent.append(("agent CPU peak", f"{s.agent_cpu_max:.0f} %"))
    if s.dropped:
        agent.append(("dropped events", str(s.dropped)))
    if s.layer_every and s.layer_every > 1:
        agent.append(("layers timed", f"every {s.layer_every} steps"))
    if agent:
        lines.append("\nagent      " + _kv(agent))
    return "\n".join(lines)


def _phase_lines(lines: list[str], label: str, mode: ModeSteps) -> None:
    shares = mode.phase_shares()
    if not shares:
        return
    # A phase that never took time (no backward in inference) says nothing: left out of the line.
    ordered = [p for p in PHASES if shares.get(p)] + [p for p in shares if p not in PHASES and shares[p]]
    lines.append(f"  {label}: " + "   ".join(
        f"{p} {shares[p] * 100:.0f}% ({_ms(mode.phases[p].median())})" for p in ordered))


def render_ranks(job: JobSummary, color: bool = False) -> str:
    """The Ranks section of a job's report: a row per rank, the job's figures, the straggler, hangs
    and ranks that died or left no recording."""
    title = paint("ranks", BOLD, on=color)
    where = f"job {job.job}" + (f" ({job.launcher})" if job.launcher else "") if job.job else "job"
    lines = [f"{title}  {where}: {len(job.ranks)} of {job.world_size} ranks recorded   "
             + _kv([("job tokens/s", fmt.rate(job.tokens_per_s(), "")), ("step p50", _ms(job.step_p50_ms()))])]
    lines.append(f"  {'rank':>4}  {'host':<12} {'steps':>6} {'step p50':>10} {'comm p50':>10} {'comm':>5} "
                 f"{'tok/s':>8} {'loss':>8}  exit")
    for row in job.rows():
        comm_pct = f"{row['comm_share_pct']:.0f}%" if row["comm_share_pct"] is not None else fmt.DASH
        lines.append(f"  {row['rank']:>4}  {(row['hostname'] or '?')[:12]:<12} {row['steps']:>6} "
                     f"{_ms(row['step_p50_ms']):>10} {_ms(row['comm_p50_ms']):>10} {comm_pct:>5} "
                     f"{fmt.rate(row['tokens_per_s'], ''):>8} {fmt.value(row['last_loss']):>8}  {row['exit']}")
    s = job.straggler()
    lines.append(f"  straggler: {s.text}" if s is not None else "  straggler: none (no rank is persistently late)")
    for h in job.hangs():
        lines.append(f"  {paint('hang', *SEVERITY_SGR['error'], on=color) if h.ongoing else 'wait'}: {h.text}")
    for r, text in sorted(job.ended().items()):
        lines.append(f"  {paint('died', *SEVERITY_SGR['error'], on=color)}: rank {r}: {text}")
    for r, rs in job.ranks.items():
        if rs.warning and r != min(job.ranks):  # the lowest rank's note is in its detail below
            lines.append(f"  note: rank {r}: {rs.warning}")
    if job.unrecorded():
        lines.append(f"  no recording of rank{'s' if len(job.unrecorded()) > 1 else ''} "
                     + ", ".join(str(r) for r in job.unrecorded()))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a recording (a job's run.lrec or any of its run.rank{R}.lrec: every rank)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    return read_recordings("report", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    job = open_job(args.file)
    summary = job.first if job is not None else open_summary(args.file)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2, allow_nan=False))
        return 0
    color = textstyle.wanted(sys.stdout)
    if job is not None:
        # The job first, then its lowest rank in detail (every section as for one process).
        print(render_ranks(job, color))
        print(paint(f"\nrank {min(job.ranks)} in detail", BOLD, on=color))
    print(render(summary, color=color))
    return 0
