"""Viewer speed: ingest (events/s decoded and applied to the model, one core), frame time with a
12-layer GPT-2 tree (164 modules), and the viewer's CPU while watching a live agent at 4 Hz.

    .venv/bin/python bench/viewer.py            # all three, prints a small report
    .venv/bin/python bench/viewer.py --quick    # fewer repeats
    .venv/bin/python bench/viewer.py --no-live  # skip the live-agent CPU measurement

Targets (issue 4): ingest >= 50 000 events/s, frame <= 50 ms, viewer < 15 % of a core at 4 Hz.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmtop.protocol.events import EventDecoder, LayerStats, encode
from llmtop.protocol.frames import FrameDecoder
from llmtop.tui.session.canned import T0, session_events
from llmtop.tui.session.model import SessionModel
from llmtop.tui.session.source import EventsSource
from llmtop.tui.views.app import LlmtopApp
from llmtop.tui.views.keys import VIEWS

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def feed(model: SessionModel, data: bytes) -> int:
    """Decode ``data``'s frames 256 KiB at a time (as the socket source reads) and apply each event
    under the model's lock; the number of events."""
    frames, decoder = FrameDecoder(), EventDecoder()
    lock, apply = model.lock, model.apply
    n = 0
    for start in range(0, len(data), 262144):
        for body in frames.feed(data[start:start + 262144]):
            event = decoder.decode(body)
            with lock:
                apply(event)
            n += 1
    return n


def ingest(steps: int, repeats: int) -> dict[str, float]:
    """Decode frames and apply events under the model lock, like the socket source does."""
    events = session_events(steps, n_layer=12, gpu=True)
    blob = b"".join(encode(e) for e in events)
    light = [e for e in events if not isinstance(e, LayerStats)]
    light_blob = b"".join(encode(e) for e in light)
    layer_blob = b"".join(encode(e) for e in events if isinstance(e, LayerStats))

    def run(data: bytes) -> tuple[float, int]:
        best = float("inf")
        count = 0
        for _ in range(repeats):
            model = SessionModel()
            for e in events[:2]:  # session and tree first so layer stats land on modules
                model.apply(e)
            t0 = time.process_time()
            n = feed(model, data)
            best = min(best, time.process_time() - t0)
            count = n
        return count / best, count

    mix_rate, mix_n = run(blob)
    light_rate, _ = run(light_blob)
    layer_rate, layer_n = run(layer_blob)
    return {"mix_events_per_s": mix_rate, "mix_events": mix_n, "light_events_per_s": light_rate,
            "layer_tables_per_s": layer_rate, "layer_rows_per_s": layer_rate * 164, "mb": len(blob) / 1e6}


async def frames(size: tuple[int, int], steps: int) -> dict[str, dict[str, float]]:
    """Per view: CPU time of one frame (model → widgets) and of a frame plus Textual's layout and
    render of the screen it changed (until the app is idle again)."""
    events = session_events(120 + steps, n_layer=12, gpu=True)
    split = next(i for i, e in enumerate(events) if getattr(e, "step", 0) == 120 and type(e).__name__ == "Step")
    head, tail = events[:split], events[split:]
    source = EventsSource(head)
    app = LlmtopApp(source, clock=lambda: T0 + 60)
    out: dict[str, dict[str, float]] = {}
    async with app.run_test(size=size) as pilot:
        source.done.wait(30)
        await pilot.pause()
        app.frame(force=True)
        await pilot.pause()
        for i, (name, _title) in enumerate(VIEWS, start=1):
            await pilot.press(str(i))
            if name == "layers":
                await pilot.press("x")  # the hottest paths open: more rows on screen
            await pilot.pause()
            push, total = [], []
            cursor = 0
            for _ in range(steps):
                # one step's worth of events arrives, then a frame
                with app.model.lock:
                    while cursor < len(tail):
                        e = tail[cursor]
                        cursor += 1
                        app.model.apply(e)
                        if type(e).__name__ == "HostSample":
                            break
                if cursor >= len(tail):
                    cursor = 0
                p, t = await timed_frame(app, pilot)
                push.append(p)
                total.append(t)
            out[name] = frame_stats(push, total)
    return out


async def timed_frame(app: Any, pilot: Any) -> tuple[float, float]:
    """CPU ms of one frame: (model → widgets, that plus Textual's layout and render until idle). CPU
    time, not wall time: the pause also waits for idle, and this machine is shared."""
    t0 = time.process_time()
    app.frame()
    t1 = time.process_time()
    await pilot.pause()
    t2 = time.process_time()
    return (t1 - t0) * 1000, (t2 - t0) * 1000


def frame_stats(push: list[float], total: list[float]) -> dict[str, float]:
    return {"push_ms": statistics.median(push), "frame_ms": statistics.median(total),
            "frame_p95_ms": sorted(total)[int(0.95 * (len(total) - 1))]}


def live_cpu(seconds: float) -> dict[str, float] | str:
    """`llmtop watch` in a real terminal (tmux) on the demo at 4 Hz: the viewer process's CPU."""
    import psutil

    if shutil.which("tmux") is None:
        return "skipped: no tmux"
    tmp = Path(tempfile.mkdtemp(prefix="ltb-", dir="/tmp"))
    sock = tmp / "a.sock"
    env = dict(os.environ, LLMTOP_SOCKET=str(sock), TERM="xterm-256color")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    agent = subprocess.Popen([str(BIN / "llmtop"), "attach", "--headless", str(ROOT / "examples" / "train_tiny_gpt.py"),
                              "--steps", "100000", "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    server = f"ltbench{os.getpid()}"
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            if time.monotonic() > deadline or agent.poll() is not None:
                return "skipped: the demo did not start"
            time.sleep(0.1)
        subprocess.run(["tmux", "-L", server, "new-session", "-d", "-x", "160", "-y", "50",
                        f"{BIN / 'llmtop'} watch {sock} --refresh 4"], env=env, check=True)
        def shown_step() -> int:
            top = subprocess.run(["tmux", "-L", server, "capture-pane", "-p"], env=env, capture_output=True,
                                 text=True).stdout.splitlines()
            found = re.search(r"step (\d+)", top[0]) if top else None
            return int(found.group(1)) if found else -1

        deadline = time.monotonic() + 120
        while shown_step() < 20 and time.monotonic() < deadline:  # past start-up (tokenizer, first steps)
            time.sleep(0.5)
        pane_pid = int(subprocess.run(["tmux", "-L", server, "list-panes", "-F", "#{pane_pid}"], env=env,
                                      capture_output=True, text=True).stdout.split()[0])
        viewer = psutil.Process(pane_pid)
        subprocess.run(["tmux", "-L", server, "send-keys", "2"], env=env)  # the layer tree: the busiest view
        time.sleep(1.0)
        s0, c0, t0 = shown_step(), sum(viewer.cpu_times()[:2]), time.monotonic()
        time.sleep(seconds)
        s1, c1, t1 = shown_step(), sum(viewer.cpu_times()[:2]), time.monotonic()
        return {"viewer_cpu_pct": 100.0 * (c1 - c0) / (t1 - t0), "seconds": t1 - t0,
                "steps_per_s": (s1 - s0) / (t1 - t0)}
    finally:
        subprocess.run(["tmux", "-L", server, "kill-server"], env=env, capture_output=True)
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-live", action="store_true")
    p.add_argument("--live-seconds", type=float, default=20.0)
    args = p.parse_args()
    repeats = 2 if args.quick else 5
    frame_steps = 10 if args.quick else 30

    r = ingest(200, repeats)
    print(f"ingest, one core: {r['mix_events_per_s']:,.0f} events/s for the canned mix "
          f"({r['mix_events']} events, {r['mb']:.1f} MB, 164-module layer tables included); "
          f"{r['light_events_per_s']:,.0f} events/s without layer tables; "
          f"{r['layer_tables_per_s']:,.0f} layer tables/s ({r['layer_rows_per_s']:,.0f} module rows/s)")
    for size in ((80, 24), (200, 60)):
        result = asyncio.run(frames(size, frame_steps))
        worst = max(v["frame_ms"] for v in result.values())
        print(f"frame at {size[0]}x{size[1]} (median CPU ms: model→widgets / with render; p95 with render):")
        for name, v in result.items():
            print(f"  {name:<10} {v['push_ms']:6.2f} / {v['frame_ms']:6.2f}   p95 {v['frame_p95_ms']:6.2f}")
        print(f"  worst view median {worst:.1f} ms")
    if not args.no_live:
        live = live_cpu(args.live_seconds)
        if isinstance(live, str):
            print(f"live viewer CPU: {live}")
        else:
            print(f"live viewer CPU: {live['viewer_cpu_pct']:.1f} % of a core over {live['seconds']:.0f} s "
                  f"while the demo ran {live['steps_per_s']:.1f} steps/s "
                  f"(`llmtop watch --refresh 4` in tmux 160x50, Layers view)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
