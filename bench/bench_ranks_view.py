"""The job view with 64 synthetic ranks: ingest rate into the JobModel and frame time of the Ranks view
(and of another view, which pays for the job's header) at 80x24 and 160x50.

    .venv/bin/python bench/bench_ranks_view.py            # prints a small report
    .venv/bin/python bench/bench_ranks_view.py --quick    # fewer repeats

Goals (issue 16): >= 50 000 events/s ingested, <= 50 ms per frame with 64 ranks. The ranks are the
canned session's real events with rank identities (``synthetic_job``), encoded and decoded as on
the wire. CPU time (process_time), not wall time: this machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from llmtop.protocol.events import EventDecoder, LayerStats, Session, Step, encode
from llmtop.protocol.frames import FrameDecoder
from llmtop.tui.session.canned import T0
from llmtop.tui.session.job import JobModel
from llmtop.tui.session.job_source import JobEventsSource, synthetic_job
from viewer import feed, frame_stats, timed_frame  # bench/viewer.py: python puts bench/ first on the path

RANKS = 64


def ingest(steps: int, repeats: int) -> dict[str, float]:
    """Decode every rank's frames and apply them to its model under its lock (as each socket source
    does), rank after rank; the best of ``repeats``."""
    streams = synthetic_job(RANKS, steps, slow_rank=7)
    blobs = {key: b"".join(encode(e) for e in events) for key, events in streams.items()}
    light = {key: b"".join(encode(e) for e in events if not isinstance(e, LayerStats))
             for key, events in streams.items()}

    def run(data: dict[str, bytes]) -> tuple[float, int]:
        best, count = float("inf"), 0
        for _ in range(repeats):
            job = JobModel()
            n = 0
            t0 = time.process_time()
            for key, blob in data.items():
                n += feed(job.model_for(key), blob)
            best = min(best, time.process_time() - t0)
            count = n
        return count / best, count

    rate, n = run(blobs)
    light_rate, light_n = run(light)
    # the same events through one plain SessionModel, as one process's viewer takes them (the baseline)
    first = next(iter(blobs))
    one_stream = {first: b"".join(blobs.values())}
    single = run_single(one_stream[first], repeats)
    return {"events_per_s": rate, "events": n, "light_events_per_s": light_rate, "light_events": light_n,
            "mb": sum(len(b) for b in blobs.values()) / 1e6, "single_events_per_s": single}


def run_single(blob: bytes, repeats: int) -> float:
    from llmtop.tui.session.model import SessionModel

    best, n = float("inf"), 0
    for _ in range(repeats):
        model = SessionModel()
        frames, decoder = FrameDecoder(), EventDecoder()
        n = 0
        t0 = time.process_time()
        for start in range(0, len(blob), 262144):
            for body in frames.feed(blob[start:start + 262144]):
                event = decoder.decode(body)
                with model.lock:
                    model.apply(event)
                n += 1
        best = min(best, time.process_time() - t0)
    return n / best


async def frames(size: tuple[int, int], frames_n: int, ranks: int = RANKS) -> dict[str, dict[str, float]]:
    """Per view: CPU ms of a frame (one new step on every rank, then model → widgets and Textual's
    layout and render until idle). ``ranks=1``: the same for one process (no job), the baseline."""
    from llmtop.tui.session.source import EventsSource
    from llmtop.tui.views.app import LlmtopApp

    head_steps = 40
    streams = synthetic_job(ranks, head_steps + frames_n, slow_rank=7)
    heads, tails = {}, {}
    for key, events in streams.items():
        split = next(i for i, e in enumerate(events) if isinstance(e, Step) and e.step == head_steps + 1)
        heads[key], tails[key] = events[:split], events[split:]
    source: JobEventsSource | EventsSource
    source = JobEventsSource(JobModel(), heads) if ranks > 1 else EventsSource(next(iter(heads.values())))
    app = LlmtopApp(source, clock=lambda: T0 + 60)
    out: dict[str, dict[str, float]] = {}
    async with app.run_test(size=size) as pilot:
        source.done.wait(60)
        await pilot.pause()
        app.frame(force=True)
        await pilot.pause()
        cursors = dict.fromkeys(tails, 0)
        for view, key in ((("ranks", "8"),) if ranks > 1 else ()) + (("overview", "1"),):
            await pilot.press(key)
            await pilot.pause()
            app.frame(force=True)
            await pilot.pause()
            push, total = [], []
            for _ in range(frames_n // 2):
                for k, tail in tails.items():  # one step's events on every rank
                    model = app.job.models[k] if app.job is not None else app.model
                    with model.lock:
                        i = cursors[k]
                        while i < len(tail):
                            e = tail[i]
                            i += 1
                            if not isinstance(e, Session):
                                model.apply(e)
                            if type(e).__name__ == "HostSample":
                                break
                        cursors[k] = i
                p, t = await timed_frame(app, pilot)
                push.append(p)
                total.append(t)
            out[view] = frame_stats(push, total)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    frames_n = 20 if args.quick else 60
    got = ingest(40, repeats)
    print(f"ingest, one core, {RANKS} ranks: {got['events_per_s']:,.0f} events/s "
          f"({got['events']:,} events, {got['mb']:.1f} MB, 2-layer GPT-2 layer tables included; "
          f"goal >= 50,000: {'met' if got['events_per_s'] >= 50_000 else 'MISSED'}); "
          f"{got['light_events_per_s']:,.0f} events/s without layer tables; the same events into one plain "
          f"SessionModel (baseline, this run): {got['single_events_per_s']:,.0f} events/s")
    worst = 0.0
    for size in ((80, 24), (160, 50)):
        res = asyncio.run(frames(size, frames_n))
        res["overview, one process (baseline)"] = asyncio.run(frames(size, frames_n, ranks=1))["overview"]
        print(f"frame with {RANKS} ranks at {size[0]}x{size[1]} (median CPU ms: model→widgets / with render; "
              "p95 with render), a new step on every rank before each frame:")
        for view, r in res.items():
            print(f"  {view:<34} {r['push_ms']:6.2f} / {r['frame_ms']:6.2f}   p95 {r['frame_p95_ms']:6.2f}")
            if "baseline" not in view:
                worst = max(worst, r["frame_ms"])
    print(f"worst median frame {worst:.1f} ms (goal <= 50 ms: {'met' if worst <= 50 else 'MISSED'})")


if __name__ == "__main__":
    main()
