"""The agent's hot-path cost in µs, in one process, without the noise of whole runs.

    python bench/hooks.py            # full
    python bench/hooks.py --quick    # fewer repeats

`bench/overhead.py` compares whole runs, which on a shared VM swing by several percent; this one
times the user's thread only (CPU thread time, one torch thread), with the instruments installed
and removed in alternation inside one process, and keeps the fastest of many repeats on each side
(the run least disturbed by anything else). It reports:

- **fixed cost per step**: a near-empty training step (Linear 4→4, SGD) with the step tracker, the
  layers instrument on an unsampled step, the FLOPs and transformers instruments (everything on the
  user's thread but the op profiles, which the budget meters separately), next to what the agent
  itself reports for those steps (`Step.overhead_us`);
- **per module call with per-layer timing on** (every layer, every step): an MLP of 6 × (Linear
  256→256 + ReLU) + Linear, 14 module calls a step, in training (forward and backward) and under
  ``no_grad``, next to the per-call cost the layers instrument calibrated at install;
- the floor of this design: the ``nn.Module.__call__`` replacement (agent/roots.py) calling no-op
  pre/post callbacks around every module call, and in training the same with one no-op autograd
  pre-hook per module output; next to torch's own cost of a no-op global hook pair per call, which
  the design avoids.

The agent thread is not included (it runs beside the step); `bench/overhead.py` sees it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "hooks.json"


class _Ctx:
    """The instrument contract (agent/core.py) keeping what is emitted: no agent thread, no I/O."""

    def __init__(self, **options: Any) -> None:
        from llmtop.agent import core

        self.options = core.Options(**options)
        self.current_step = 0
        self.stopping = False
        self.events: list[Any] = []

    def emit(self, event: Any) -> None:
        self.events.append(event)

    def warn(self, source: str, message: str) -> None:
        print(f"hooks.py: {source}: {message}", file=sys.stderr)

    def set_manual_step(self, fn: Any) -> None:
        pass


def _instruments(which: tuple[str, ...], ctx: _Ctx) -> list[Any]:
    from llmtop.agent.flops_live import FlopsInstrument
    from llmtop.agent.integrations import TransformersInstrument
    from llmtop.agent.layers import LayersInstrument
    from llmtop.agent.steps import StepInstrument

    made = {"layers": LayersInstrument, "steps": StepInstrument, "flops": FlopsInstrument,
            "transformers": TransformersInstrument}
    return [made[name](ctx.options) for name in which]


def _paired(fn: Any, which: tuple[str, ...], ctx: _Ctx, number: int, rounds: int, repeat: int) -> dict[str, Any]:
    """Fastest µs per call of ``fn`` without and with the instruments, rounds interleaved."""
    off: list[float] = []
    on: list[float] = []
    reported: list[float] = []
    for _ in range(rounds):
        off.append(min(timeit.repeat(fn, timer=time.thread_time, number=number, repeat=repeat)) / number)
        insts = _instruments(which, ctx)
        for inst in insts:
            inst.install(ctx)
        try:
            on.append(min(timeit.repeat(fn, timer=time.thread_time, number=number, repeat=repeat)) / number)
        finally:
            for inst in reversed(insts):
                for ev in inst.poll(time.time()) or []:
                    if type(ev).__name__ == "Step":
                        reported.append(ev.overhead_us)
            for inst in insts:
                inst.uninstall()
            ctx.events.clear()
    return {"off_us": min(off) * 1e6, "on_us": min(on) * 1e6, "delta_us": (min(on) - min(off)) * 1e6,
            "reported_us": statistics.median(reported) if reported else None}


def fixed_cost(quick: bool) -> dict[str, Any]:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 4)

    def step() -> None:
        loss = model(x).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(50):
        step()
    # layer_every=1000: per-layer timing on the first step only, the rest is what unsampled steps pay
    ctx = _Ctx(layer_every=1000, ops_every=0)
    return _paired(step, ("layers", "steps", "flops", "transformers"), ctx,
                   number=500 if quick else 2000, rounds=3, repeat=3 if quick else 5)


def per_call(quick: bool) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.nn.modules import module as nn_module

    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(256, 10))
    x = torch.randn(64, 256)
    calls = 14

    def train() -> None:
        model(x).sum().backward()

    def infer() -> None:
        with torch.no_grad():
            model(x)

    number, repeat = (50, 3) if quick else (200, 5)
    out: dict[str, Any] = {"module_calls": calls}
    from llmtop.agent.layers import LayersInstrument

    calib = LayersInstrument(_Ctx().options)
    calib.install(_Ctx())  # calibrates like the agent does at start
    out["calibrated_us"] = calib.call_cost_ns / 1e3
    calib.uninstall()
    for name, fn in (("train", train), ("no_grad", infer)):
        for _ in range(5):
            fn()
        r = _paired(fn, ("layers",), _Ctx(layer_every=1, extra={"layer_call_ns": 1}), number, 3, repeat)
        r["per_call_us"] = r["delta_us"] / calls
        out[name] = r

    def noop(*args: Any) -> None:
        pass

    def dispatch() -> float:
        return min(timeit.repeat(infer, timer=time.thread_time, number=number, repeat=repeat)) / number

    base = dispatch()
    pre = nn_module.register_module_forward_pre_hook(noop)
    post = nn_module.register_module_forward_hook(noop)
    try:
        hooked = dispatch()
    finally:
        pre.remove()
        post.remove()
    out["noop_hook_pair_us"] = (hooked - base) * 1e6 / calls
    out["noop_call_pair_us"] = _floor(infer, number, repeat, node_hooks=False) / calls
    out["floor_train_us"] = _floor(train, number, repeat, node_hooks=True) / calls
    return out


def _floor(fn: Any, number: int, repeat: int, node_hooks: bool) -> float:
    """µs per step that the layers instrument's design pays with callbacks that do nothing: the
    ``nn.Module.__call__`` replacement (agent/roots.py) calling a no-op pre and post around every
    module call, plus (``node_hooks``) one no-op autograd node pre-hook per module output."""
    import torch
    from llmtop.agent.roots import RootCalls

    def node_hook(grad_outputs: Any) -> None:
        pass

    def pre(module: Any, args: Any) -> None:
        pass

    def post(module: Any, args: Any, kwargs: Any, out: Any = None) -> None:
        if node_hooks:
            grad_fn = getattr(out, "grad_fn", None)
            if grad_fn is not None:
                grad_fn.register_prehook(node_hook)

    def best() -> float:
        return min(timeit.repeat(fn, timer=time.thread_time, number=number, repeat=repeat)) / number

    base: list[float] = []
    hooked: list[float] = []
    for _ in range(3):
        base.append(best())
        calls = RootCalls(lambda m, t0: None, lambda m, t0, t1: None, lambda m: None, bus=False)
        calls.install(torch)
        calls.each = (pre, post)
        try:
            hooked.append(best())
        finally:
            calls.uninstall()
    return (min(hooked) - min(base)) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="llmtop hot-path cost in µs (in-process, CPU thread time)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=str(OUT))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the user's thread does all the work: its CPU time is the step
    fixed = fixed_cost(args.quick)
    calls = per_call(args.quick)
    report = {"benchmark": "hooks", "quick": args.quick, "fixed": fixed, "per_call": calls,
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    rep = fixed["reported_us"]
    n = calls["module_calls"]
    rows = [
        ("fixed cost per step (near-empty training step, unsampled)", f"{fixed['off_us']:.1f}",
         f"{fixed['on_us']:.1f}", f"{fixed['delta_us']:+.1f}", f"{rep:.1f}" if rep is not None else ""),
    ]
    for name in ("train", "no_grad"):
        r = calls[name]
        rows.append((f"per-layer timing on, {name}: per module call ({n} calls)", f"{r['off_us']:.0f}",
                     f"{r['on_us']:.0f}", f"{r['per_call_us']:+.2f} per call",
                     f"{calls['calibrated_us']:.2f} per call (calibrated)" if name == "train" else ""))
    rows.append(("for comparison, torch: a no-op global pre+post hook pair, per module call", "", "",
                 f"{calls['noop_hook_pair_us']:+.2f}", ""))
    rows.append(("floor, no_grad: our `__call__` with no-op pre/post callbacks, per module call", "", "",
                 f"{calls['noop_call_pair_us']:+.2f}", ""))
    rows.append(("floor, train: the same + a no-op node pre-hook per module output, per call",
                 "", "", f"{calls['floor_train_us']:+.2f}", ""))
    print("| measure | without (µs) | with (µs) | cost (µs) | agent reports (µs) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print("CPU thread time of the user's thread, one torch thread, fastest of repeated runs with the "
          "instruments installed and removed in alternation; the agent thread is not included.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
