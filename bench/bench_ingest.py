"""Viewer ingest of a 64-rank job: frame bytes → checked events → 64 ``SessionModel``s (issue 16's
viewer goal: ≥ 50 000 events/s on one core).

    .venv/bin/python bench/bench_ingest.py            # 5 runs of each path, prints a Markdown report
    .venv/bin/python bench/bench_ingest.py --quick    # fewer steps (smoke test)
    .venv/bin/python bench/bench_ingest.py --apply    # SessionModel.apply alone, CPU per event kind

Each of 64 synthetic ranks streams a canned training session (``tui/session/canned.py``: a Session
naming its rank, a 203-module GPT-2 tree, then per step a Step, a LayerStats and a StepFlops of 203
modules, host and device samples, spans, a metric, progress and log lines; ops and stats every tenth
step). The streams are fed round-robin in 64 KiB chunks, as 64 sockets would arrive, each through
its own ``FrameDecoder`` and ``EventDecoder`` into ``JobModel.model_for(key)``, applied under the
model's lock as ``SocketSource`` does.

Two decoders are timed in alternation in the same process (CPU time of this process, so a loaded
machine slows both alike):

- *checked*: ``Event._from_map_checked``, the code ``Event.from_map`` ran before the generated
  decoders (a dict comprehension, ``cls(**kw)``, then ``checks.checker``'s per-field closures);
  it is still the path that words every error;
- *generated*: ``EventDecoder`` as shipped (``checks.fast_decoder``: one straight-line function per
  class).

Both accept and refuse exactly the same maps (``tests/test_protocol.py``). Figures: median of 5 runs
per path; the speed-up is the median of the 5 paired ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
from llmtop.protocol.events import (
    REGISTRY,
    Event,
    EventDecoder,
    HostSample,
    LayerStats,
    LogLine,
    Session,
    Span,
    Step,
    StepFlops,
    encode,
)
from llmtop.protocol.frames import FrameDecoder, unpack_map
from llmtop.tui.session.canned import session_events
from llmtop.tui.session.job import JobModel

RANKS = 64
N_LAYER = 15  # 203 modules per layer table
CHUNK = 65536


class CheckedDecoder(EventDecoder):
    """The decoder as it was before the generated functions: every map through the checked path."""

    def decode(self, body: dict[str, Any]) -> Event | None:
        cls = REGISTRY.get(body["k"])
        if cls is None:
            self.unknown[body["k"]] = self.unknown.get(body["k"], 0) + 1
            return None
        return cls._from_map_checked(body)


def rank_streams(steps: int, layer_every: int = 1) -> tuple[list[bytes], int]:
    """Each rank's frames as one byte string, and the number of events in all of them; per-layer
    tables (LayerStats and StepFlops) only every ``layer_every``-th step, as the agent samples them."""
    streams, count = [], 0
    for rank in range(RANKS):
        events = session_events(steps, n_layer=N_LAYER, seed=rank, gpu=True)
        events = [e for e in events if not isinstance(e, (LayerStats, StepFlops)) or e.step % layer_every == 0]
        events = [dataclasses.replace(e, pid=1000 + rank, job="bench", launcher="torchrun", rank=rank,
                                      local_rank=rank % 8, world_size=RANKS, node_rank=rank // 8)
                  if isinstance(e, Session) else e for e in events]
        streams.append(b"".join(encode(e) for e in events))
        count += len(events)
    return streams, count


def ingest(streams: list[bytes], make_decoder: Callable[[], EventDecoder],
           read: list[float] | None = None) -> tuple[float, int]:
    """CPU seconds to decode and apply every rank's stream into a fresh JobModel, and events applied;
    ``read`` gets the CPU seconds of then reading every layer figure of every rank once."""
    job = JobModel()
    feeds = [(FrameDecoder(), make_decoder(), job.model_for(f"node{r // 8}:{1000 + r}")) for r in range(RANKS)]
    n = 0
    t0 = time.process_time()
    for start in range(0, max(map(len, streams)), CHUNK):
        for data, (frames, decoder, model) in zip(streams, feeds, strict=True):
            chunk = data[start:start + CHUNK]
            if not chunk:
                continue
            lock, apply, decode = model.lock, model.apply, decoder.decode
            for body in frames.feed(chunk):
                event = decode(body)
                if event is not None:
                    with lock:
                        apply(event)
                    n += 1
    secs = time.process_time() - t0
    assert all(m.session is not None and m.session.rank is not None for m in job.models.values())
    if read is not None:
        read.append(read_layers(job))
    return secs, n


def read_layers(job: JobModel) -> float:
    """CPU seconds to read every layer figure a view shows of every rank, once (each view draws one
    rank's; the Ranks view's straggler reads every rank's histories): figures the model works out
    when read are paid here, not in the ingest."""
    t0 = time.process_time()
    for model in job.models.values():
        with model.lock:
            for la in model.layers.values():
                (la.fwd_ema, la.bwd_ema, la.act_ema, la.time_ms, la.fwd_ms, la.calls, la.achieved_flops,
                 la.achieved_note, la.bound, list(la.history), model.layer_share(la))
    return time.process_time() - t0


def decode_only(payloads: list[bytes], make_decoder: Callable[[], EventDecoder]) -> float:
    """CPU seconds to turn frame bodies into checked events (``unpack_map`` then ``decode``)."""
    decode = make_decoder().decode
    t0 = time.process_time()
    for p in payloads:
        decode(unpack_map(p))
    return time.process_time() - t0


def map_only(bodies: list[dict[str, Any]], make_decoder: Callable[[], EventDecoder]) -> float:
    """CPU seconds of ``EventDecoder.decode`` alone (maps already unpacked): the part the checks govern."""
    decode = make_decoder().decode
    t0 = time.process_time()
    for b in bodies:
        decode(b)
    return time.process_time() - t0


def unpack_only(payloads: list[bytes]) -> float:
    """CPU seconds of ``unpack_map`` alone: msgpack's share, the same for both paths."""
    t0 = time.process_time()
    for p in payloads:
        unpack_map(p)
    return time.process_time() - t0


def kinds(count: int) -> dict[str, list[bytes]]:
    """Frame bodies of the common kinds, as agents send them."""
    rng = range(count)
    phases = {"data": 1.0, "h2d": 0.0, "forward": 3.0, "backward": 5.0, "optimizer": 0.5, "other": 0.5}
    n = 203
    made: dict[str, list[Event]] = {
        "Step": [Step(step=i, t=1e9 + i * 0.01, dur_ms=10.0, phases=dict(phases), loss=2.0, grad_norm=1.1,
                      lr=3e-4, samples=8, tokens=1024, overhead_us=40.0, cuda_allocated=1 << 30,
                      cuda_reserved=2 << 30, cuda_peak=3 << 30, gpu_ms=9.0, comm_ms=1.5, comm_calls=2,
                      comm_bytes=1 << 20) for i in rng],
        "LayerStats (203 modules)": [LayerStats(step=i, ids=list(range(n)), fwd_ms=[0.5 + j * 1e-3 for j in range(n)],
                                                fwd_self_ms=[0.25] * n, calls=[1] * n, bwd_ms=[1.0] * n,
                                                bwd_self_ms=[0.5] * n, act_bytes=[4096] * n)
                                     for i in range(max(1, count // 20))],
        "HostSample": [HostSample(t=1e9 + i, cpu_pct=97.5, rss=3 << 30, sys_used=12 << 30, sys_total=64 << 30,
                                  threads=12) for i in rng],
        "Span": [Span(name="tokenize", category="text_preprocessing", start=1e9 + i, dur_ms=0.5, depth=1,
                      step=i, attrs={"tokens": 512}) for i in rng],
        "LogLine": [LogLine(t=1e9 + i, text=f"step {i} loss 2.5000", stream="stderr", replace=True) for i in rng],
    }
    return {k: [encode(e)[4:] for e in v] for k, v in made.items()}


def apply_only(runs: int) -> None:
    """``SessionModel.apply`` alone on each mix's events (decoded once, before timing): CPU time per
    event, and per ModelTree / LayerStats / StepFlops (best of ``runs``)."""
    from llmtop.tui.session.model import SessionModel

    for every in (1, 10):
        streams = [[e for e in session_events(30, n_layer=N_LAYER, seed=r, gpu=True)
                    if not isinstance(e, (LayerStats, StepFlops)) or e.step % every == 0] for r in range(RANKS)]
        count: dict[str, int] = {}
        for events in streams:
            for e in events:
                count[type(e).__name__] = count.get(type(e).__name__, 0) + 1
        best: dict[str, float] = {}
        for _ in range(runs):
            spent: dict[str, float] = {}
            for events in streams:
                model = SessionModel()
                for e in events:
                    t = time.process_time()
                    model.apply(e)
                    spent[type(e).__name__] = spent.get(type(e).__name__, 0.0) + time.process_time() - t
            if not best or sum(spent.values()) < sum(best.values()):
                best = spent
        total, n = sum(best.values()), sum(count.values())
        print(f"every {every}: {n} events, apply CPU {total * 1000:.0f} ms = {n / total:,.0f} events/s; "
              + ", ".join(f"{k} {best[k] / count[k] * 1e6:.0f} us" for k in ("ModelTree", "LayerStats", "StepFlops")))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}, "
            f"msgpack {'.'.join(map(str, msgpack.version))}, load average (1/5/15 min) {load}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="fewer steps per rank (smoke test)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--apply", action="store_true", help="only SessionModel.apply on decoded events, per kind")
    args = p.parse_args(argv)
    if args.apply:
        apply_only(args.runs)
        return 0
    steps = 5 if args.quick else 30
    mixes: dict[str, tuple[list[bytes], int]] = {
        "layer tables every step": rank_streams(steps),
        "layer tables every 10th step": rank_streams(steps, layer_every=10),
    }
    for mix, (streams, total) in mixes.items():
        print(f"[bench_ingest] {mix}: {RANKS} ranks x {steps} steps: {total} events, "
              f"{sum(map(len, streams)) / 1e6:.1f} MB", file=sys.stderr)

    paths = {"checked": CheckedDecoder, "generated": EventDecoder}
    whole: list[tuple[str, int, float, dict[str, list[float]], float]] = []
    reads: dict[str, list[float]] = {}
    for mix, (streams, total) in mixes.items():
        rates: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(args.runs):
            for name, make in paths.items():  # alternate, so load drifts touch both paths alike
                secs, n = ingest(streams, make, reads.setdefault(mix, []) if name == "generated" else None)
                assert n == total, (n, total)
                rates[name].append(n / secs)
        ratio = statistics.median(g / c for g, c in zip(rates["generated"], rates["checked"], strict=True))
        whole.append((mix, total, sum(map(len, streams)) / 1e6, rates, ratio))

    per_kind: list[tuple[str, dict[str, float], float, float, float]] = []
    for kind, payloads in kinds(2000 if args.quick else 20000).items():
        bodies = [unpack_map(p) for p in payloads]
        got: dict[str, list[float]] = {}
        for _ in range(args.runs):
            for name, make in paths.items():
                got.setdefault(name, []).append(len(payloads) / decode_only(payloads, make))
                got.setdefault("map " + name, []).append(len(bodies) / map_only(bodies, make))
            got.setdefault("unpack", []).append(len(payloads) / unpack_only(payloads))
        r = statistics.median(g / c for g, c in zip(got["generated"], got["checked"], strict=True))
        rm = statistics.median(g / c for g, c in zip(got["map generated"], got["map checked"], strict=True))
        # the most any decoder could gain on frame bytes: before's time over msgpack's alone
        ceiling = statistics.median(u / c for u, c in zip(got["unpack"], got["checked"], strict=True))
        per_kind.append((kind, {k: statistics.median(v) for k, v in got.items()}, r, rm, ceiling))

    print(f"Machine: {machine()}.")
    print()
    print(f"{RANKS} ranks × {steps} steps each, fed round-robin in 64 KiB chunks, decoded and applied to "
          f"{RANKS} SessionModels (JobModel); CPU time of this process, median of {args.runs} runs per path, "
          "the paths run in alternation.")
    print()
    print("| mix | events | path | events/s (median) | runs (events/s) | speed-up (median of paired ratios) "
          "| target (≥ 50 000/s) |")
    print("|---|---:|---|---:|---|---:|---|")
    for mix, total, mb, rates, ratio in whole:
        for name in paths:
            runs = ", ".join(f"{r:,.0f}" for r in rates[name])
            med = statistics.median(rates[name])
            shown = f"×{ratio:.2f}" if name == "generated" else ""
            print(f"| {mix} | {total} ({mb:.1f} MB) | {name} | {med:,.0f} | {runs} | {shown} "
                  f"| {'met' if med >= 50000 else 'MISSED'} |")
    print()
    for mix, got in reads.items():
        ms = statistics.median(got) * 1000
        print(f"- {mix}: then reading every layer figure of all {RANKS} ranks once (each layer's means, latest, "
              f"FLOP/s, bound, share and whole history): {ms:.0f} ms CPU (median of {len(got)}).")
    print()
    print("Decoding alone, per kind: frame body → checked event (`unpack_map` + `EventDecoder.decode`), "
          "and map → checked event (`decode` alone: what the checks govern). `unpack_map` (msgpack) is the "
          "same for both paths; the ceiling is the speed-up a decoder costing nothing would give on frame bytes.")
    print()
    print("| kind | bytes→event checked (/s) | generated (/s) | speed-up | map→event checked (/s) | generated (/s) "
          "| speed-up | unpack_map alone (/s) | ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, m, r, rm, ceiling in per_kind:
        print(f"| {kind} | {m['checked']:,.0f} | {m['generated']:,.0f} | ×{r:.2f} | {m['map checked']:,.0f} "
              f"| {m['map generated']:,.0f} | ×{rm:.2f} | {m['unpack']:,.0f} | ×{ceiling:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
