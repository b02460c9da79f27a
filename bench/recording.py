"""Recording benchmark: bytes per step, and the time to open a one-hour recording and jump to its end.

    .venv/bin/python bench/recording.py [--hour-steps-per-s 10] [--quick]

Recordings are synthesized from the real event dataclasses written through ``RecordingWriter``
(real files, real compression), with per-layer times shaped like the agent's: leaf times in whole
nanoseconds, parents = children + own time, ±5 % noise step to step. Blocks are cut once per
simulated second, as the writer does in a live run.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmtop.protocol.events import (
    PHASES,
    DeviceSample,
    HostSample,
    LayerStats,
    ModelTree,
    Session,
    Span,
    Step,
    encode,
)
from llmtop.protocol.recording import KeyframeBuilder, RecordingReader, RecordingWriter
from llmtop.tui.session.model import SessionModel

GPT2_BLOCK = ["ln_1", "attn", "attn.c_attn", "attn.c_proj", "attn.attn_dropout", "attn.resid_dropout",
              "ln_2", "mlp", "mlp.c_fc", "mlp.c_proj", "mlp.act", "mlp.dropout"]


def gpt2_tree(n_layer: int) -> ModelTree:
    """The module tree of ``GPT2LMHeadModel`` with ``n_layer`` blocks (164 modules for 12)."""
    paths = ["", "transformer", "transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h"]
    for i in range(n_layer):
        paths += [f"transformer.h.{i}"] + [f"transformer.h.{i}.{x}" for x in GPT2_BLOCK]
    paths += ["transformer.ln_f", "lm_head"]
    index = {p: i for i, p in enumerate(paths)}
    parents = [-1] + [index[p.rsplit(".", 1)[0]] if "." in p else 0 for p in paths[1:]]
    classes = [p.rsplit(".", 1)[-1] or "GPT2LMHeadModel" for p in paths]
    return ModelTree(model=0, name="GPT2LMHeadModel", ids=list(range(len(paths))), paths=paths,
                     classes=classes, params=[1000] * len(paths), parents=parents,
                     trainable=[True] * len(paths), dtypes=["float32"] * len(paths),
                     compiled=[False] * len(paths))


@dataclass
class Run:
    """A synthetic training run: one step's events at a time, in the agent's order."""

    tree: ModelTree
    steps_per_s: float
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        n = len(self.tree.ids)
        self.children: list[list[int]] = [[] for _ in range(n)]
        for i, p in enumerate(self.tree.parents):
            if p >= 0:
                self.children[p].append(i)
        self.base_ns = [self.rng.randint(5_000, 400_000) for _ in range(n)]
        self.t = 1_700_000_000.0

    def _layer_times(self) -> tuple[list[float], list[float]]:
        n = len(self.tree.ids)
        total = [0] * n
        self_ns = [0] * n
        for i in reversed(range(n)):  # children come after parents in the tree order
            own = int(self.base_ns[i] * self.rng.uniform(0.95, 1.05)) if not self.children[i] else \
                self.rng.randint(1_000, 9_000)
            self_ns[i] = own
            total[i] = own + sum(total[c] for c in self.children[i])
        return [x / 1e6 for x in total], [x / 1e6 for x in self_ns]

    def step(self, step: int) -> list:
        dt = 1.0 / self.steps_per_s
        self.t += dt
        fwd, fwd_self = self._layer_times()
        bwd, bwd_self = self._layer_times()
        phases = {p: self.rng.uniform(0.5, 1.5) * dt * 1000 / len(PHASES) for p in PHASES}
        events: list = [
            Step(step=step, t=self.t, dur_ms=sum(phases.values()), phases=phases,
                 loss=3.0 / (1 + step / 1000) + self.rng.uniform(-0.05, 0.05), grad_norm=self.rng.uniform(0.5, 2),
                 lr=3e-4, samples=8, tokens=8 * 1024, overhead_us=self.rng.uniform(50, 300),
                 cuda_allocated=self.rng.randint(5 << 30, 6 << 30), cuda_reserved=8 << 30,
                 cuda_peak=7 << 30, gpu_ms=dt * 900),
            LayerStats(step=step, ids=self.tree.ids, fwd_ms=fwd, fwd_self_ms=fwd_self,
                       calls=[1] * len(fwd), bwd_ms=bwd, bwd_self_ms=bwd_self),
        ]
        # Host and device samples come every agent tick (0.5 s), not every step.
        if int(self.t * 2) != int((self.t - dt) * 2):
            events.append(HostSample(t=self.t, cpu_pct=self.rng.uniform(95, 105), rss=3 << 30,
                                     sys_used=self.rng.randint(40 << 30, 41 << 30), sys_total=64 << 30,
                                     threads=24))
            events.append(DeviceSample(t=self.t, index=0, name="NVIDIA H100 80GB HBM3",
                                       util_pct=self.rng.uniform(90, 100), mem_used=self.rng.randint(60 << 30, 61 << 30),
                                       mem_total=80 << 30, power_w=self.rng.uniform(500, 700), temp_c=65.0,
                                       sm_clock_mhz=1980.0, mem_clock_mhz=2619.0))
        if step % 100 == 0:
            events.append(Span(name="eval", category="training_loop", start=self.t - 0.01, dur_ms=10.0,
                               step=step))
        return events


def snapshot_keeper(history: int = 600) -> tuple[Callable[[bytes, Any], None], Callable[[], list[bytes]]]:
    """The agent's own late-joiner history (what ``LLMTOP_RECORD`` keyframes hold), else the
    recorder's frame-level builder when the agent package is not importable."""
    try:
        from llmtop.agent.runtime.agent import History

        h = History(history)
        return (lambda frame, event: h.add(event, frame)), h.snapshot
    except ImportError:
        b = KeyframeBuilder(history)
        return b.add, b.frames


def write_run(path: str, n_layer: int, steps: int, steps_per_s: float) -> RecordingWriter:
    """Write a synthetic run the way the agent does: a block per (simulated) second, keyframes when
    ``wants_keyframe`` says so on the simulated clock."""
    tree = gpt2_tree(n_layer)
    session = Session(pid=1234, argv=["train.py"], started=1_700_000_000.0, hostname="bench",
                      devices=["NVIDIA H100 80GB HBM3"])
    writer = RecordingWriter(path, session, flush_s=1e9)
    writer._last_keyframe = 0.0  # the simulated clock starts at 0
    add, snapshot = snapshot_keeper()
    run = Run(tree, steps_per_s)
    for e in (session, tree):
        frame = encode(e)
        writer.append(frame, e)
        add(frame, e)
    per_block = max(1, round(steps_per_s))
    for s in range(steps):
        for e in run.step(s):
            frame = encode(e)
            writer.append(frame, e)
            add(frame, e)
        if (s + 1) % per_block == 0:
            writer.flush()
            sim_now = (s + 1) / steps_per_s
            if writer.wants_keyframe(sim_now):
                writer.keyframe(snapshot(), now=sim_now)
    writer.close()
    return writer


REAL_RUNS = (
    ("demo (examples/train_tiny_gpt.py defaults)", []),
    ("12-layer GPT-2 tree (train_tiny_gpt.py --n-layer 12 --n-embd 64 --n-head 4)",
     ["--n-layer", "12", "--n-embd", "64", "--n-head", "4"]),
)


def real_runs(steps: int) -> None:
    """Bytes per step of real recordings: the demo script under ``llmtop attach --headless --record``."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    llmtop = str(Path(sys.executable).parent / "llmtop")
    tmp = tempfile.mkdtemp(prefix="lt-", dir="/tmp")
    print("\n| real run (agent-side recording) | modules | steps | ms/step | bytes/step |")
    print("|---|---:|---:|---:|---:|")
    for label, extra in REAL_RUNS:
        out = os.path.join(tmp, "real.lrec")
        env = dict(os.environ, LLMTOP_SOCKET=os.path.join(tmp, "a.sock"))
        subprocess.run([llmtop, "attach", "--headless", "--record", out, str(root / "examples" / "train_tiny_gpt.py"),
                        "--steps", str(steps), "--no-progress", "--generate", "0", *extra],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
        r = RecordingReader(out)
        modules = max((len(e.ids) for e in r.events() if e.KIND == "model"), default=0)
        step_ms = [e.dur_ms for e in r.events() if e.KIND == "step"]
        step_ms.sort()
        print(f"| {label} | {modules} | {r.steps} | {step_ms[len(step_ms) // 2]:.0f} | "
              f"{os.path.getsize(out) / max(1, r.steps):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-s", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="10 minutes instead of one hour")
    parser.add_argument("--real", type=int, default=0, metavar="STEPS",
                        help="also record the demo script for STEPS steps (needs torch; minutes on a CPU)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="llmtop-bench-")
    print("| model | modules | steps/s | bytes/step |")
    print("|---|---:|---:|---:|")
    for label, n_layer in (("demo (GPT-2, 2 layers)", 2), ("GPT-2 124M (12 layers)", 12)):
        for rate in (2.0, args.steps_per_s):
            path = os.path.join(tmp, f"size-{n_layer}-{rate}.lrec")
            w = write_run(path, n_layer, steps=int(rate * 300), steps_per_s=rate)
            size = os.path.getsize(path)
            print(f"| {label} | {len(gpt2_tree(n_layer).ids)} | {rate:g} | {size / w.steps_written:.0f} |")
    seconds = 600 if args.quick else 3600
    path = os.path.join(tmp, "hour.lrec")
    t0 = time.perf_counter()
    w = write_run(path, 12, steps=int(seconds * args.steps_per_s), steps_per_s=args.steps_per_s)
    t_write = time.perf_counter() - t0
    size = os.path.getsize(path)
    print(f"\n{seconds} s recording, GPT-2 12 layers at {args.steps_per_s:g} steps/s: "
          f"{w.steps_written} steps, {size / 1e6:.1f} MB, {len(w.blocks)} blocks "
          f"(synthesized in {t_write:.0f} s)")
    print("\n| opening | open (ms) | + seek to end (ms) | + applied to the viewer model (ms) | events applied |")
    print("|---|---:|---:|---:|---:|")
    for trailer in (True, False):
        if not trailer:  # drop the index trailer: a recording whose writer was killed
            with open(path, "rb+") as f:
                f.truncate(w.blocks[-1].offset + 64 + w.blocks[-1].comp_len)
        t0 = time.perf_counter()
        r = RecordingReader(path)
        t_open = time.perf_counter() - t0
        events = r.seek_end()
        t_end = time.perf_counter() - t0
        model = SessionModel()
        with model.lock:
            model.reset()
            model.apply_all(events)
        t_model = time.perf_counter() - t0
        assert model.last_step is not None and model.last_step.step == r.last_step
        how = "with index trailer" if trailer else "no trailer (forward scan)"
        print(f"| {how} | {t_open * 1000:.1f} | {t_end * 1000:.0f} | {t_model * 1000:.0f} | {len(events)} |")
        r.close()
    if args.real:
        real_runs(args.real)


if __name__ == "__main__":
    main()
