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
  + ReLU) + Linear, 14 module calls a step, at two widths (32: little compute between the
  callbacks, so the least noise; 256: compute that evicts their code from the caches, as in real
  models), in training (forward and backward) and under ``no_grad``, next to the per-call cost
  the layers instrument calibrated at install;
- the floor of this design: the ``nn.Module.__call__`` replacement (agent/instruments/roots.py) calling no-op
  pre/post callbacks around every module call, and in training the same with one no-op autograd
  pre-hook per module output; next to torch's own cost of a no-op global hook pair per call, which
  the design avoids.

The agent thread is not included (it runs beside the step); `bench/overhead.py` sees it.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "hooks.json"
MLP_CALLS = 14  # module calls a step of _mlp(): the Sequential root and its 13 layers


class _Ctx:
    """The instrument contract (agent/runtime/core.py) keeping what is emitted: no agent thread, no I/O."""

    def __init__(self, **options: Any) -> None:
        from llmtop.agent.runtime import core

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
    from llmtop.agent.hf.instrument import TransformersInstrument
    from llmtop.agent.instruments.flops_live import FlopsInstrument
    from llmtop.agent.instruments.layers import LayersInstrument
    from llmtop.agent.instruments.steps import StepInstrument

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
    """µs per module call of per-layer timing and of its floors, for two layer widths.

    Each variant is timed against no instrument in the same round, rounds interleaved (the order
    reversed every other round); the cost is the median of those paired differences. The narrow
    model's steps are short, so its figure has the least noise; the wide one's compute sits
    between the callbacks, as in real models, and evicts their code from the caches.
    """
    import torch
    from llmtop.agent.instruments.layers import LayersInstrument

    calib = LayersInstrument(_Ctx().options)
    calib.install(_Ctx())  # calibrates like the agent does at start
    out: dict[str, Any] = {"module_calls": MLP_CALLS, "calibrated_us": calib.call_cost_ns / 1e3}
    calib.uninstall()
    rounds = 5 if quick else 11
    for width, batch, number in ((32, 8, 100), (256, 64, 20)):
        model = _mlp(width)
        x = torch.randn(batch, width)

        def train(model: Any = model, x: Any = x) -> None:
            model(x).sum().backward()

        def infer(model: Any = model, x: Any = x) -> None:
            with torch.no_grad():
                model(x)

        out[f"w{width}"] = {
            "train": _variants(train, ("real", "floor", "nodes"), number, rounds),
            "no_grad": _variants(infer, ("real", "floor", "torch"), number, rounds),
        }
    return out


def _mlp(width: int) -> Any:
    from torch import nn

    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _variants(fn: Any, kinds: tuple[str, ...], number: int, rounds: int) -> dict[str, float]:
    """µs per module call (``MLP_CALLS`` a step) that each kind adds to ``fn``:

    - ``real``: the layers instrument timing every call (every layer, every step);
    - ``floor``: the ``nn.Module.__call__`` replacement (agent/instruments/roots.py) with no-op pre/post;
    - ``nodes``: the floor plus one no-op autograd node pre-hook per module output, as the
      instrument registers them (one per node, the slot in the node's metadata);
    - ``torch``: torch's own no-op global forward pre+post hook pair (which the design avoids).
    """
    import torch
    from llmtop.agent.instruments.layers import LayersInstrument
    from llmtop.agent.instruments.roots import RootCalls
    from torch.nn.modules import module as nn_module

    def noop(*args: Any) -> None:
        pass

    def node_post(module: Any, args: Any, kwargs: Any, out: Any = None) -> None:
        grad_fn = getattr(out, "grad_fn", None)
        if grad_fn is not None:
            md = grad_fn.metadata
            if "bench" not in md:
                md["bench"] = ([], [])
                grad_fn.register_prehook(functools.partial(noop, md["bench"]))

    def install(kind: str) -> Any:
        if kind == "real":
            ctx = _Ctx(layer_every=1, layer_call_ns=1)
            inst = LayersInstrument(ctx.options)
            inst.install(ctx)
            return inst.uninstall
        if kind == "torch":
            handles = (nn_module.register_module_forward_pre_hook(noop),
                       nn_module.register_module_forward_hook(noop))
            return lambda: [h.remove() for h in handles]
        calls = RootCalls(lambda m, t0: None, lambda m, t0, t1: None, lambda m: None, bus=False)
        calls.install(torch)
        calls.each = (noop, node_post if kind == "nodes" else noop)
        return calls.uninstall

    def best() -> float:
        return min(timeit.repeat(fn, timer=time.thread_time, number=number, repeat=3)) / number

    for _ in range(20):
        fn()
    deltas: dict[str, list[float]] = {k: [] for k in kinds}
    order = ("none", *kinds)
    for r in range(rounds):
        took: dict[str, float] = {}
        for kind in order if r % 2 else order[::-1]:
            remove = install(kind) if kind != "none" else None
            try:
                took[kind] = best()
            finally:
                if remove is not None:
                    remove()
        for kind in kinds:
            deltas[kind].append(took[kind] - took["none"])
    return {k: statistics.median(v) * 1e6 / MLP_CALLS for k, v in deltas.items()}


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
    print("| measure | without (µs) | with (µs) | cost (µs) | agent reports (µs) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| fixed cost per step (near-empty training step, unsampled) | {fixed['off_us']:.1f} | "
          f"{fixed['on_us']:.1f} | {fixed['delta_us']:+.1f} | {f'{rep:.1f}' if rep is not None else ''} |")
    print()
    narrow, wide = calls["w32"], calls["w256"]
    rows = [
        ("every layer timed (the layers instrument), training", "train", "real"),
        ("every layer timed (the layers instrument), no_grad", "no_grad", "real"),
        ("floor: our `__call__` with no-op pre/post callbacks, training", "train", "floor"),
        ("floor: the same + a no-op node pre-hook per module output, training", "train", "nodes"),
        ("floor: our `__call__` with no-op pre/post callbacks, no_grad", "no_grad", "floor"),
        ("for comparison, torch: a no-op global pre+post hook pair, no_grad", "no_grad", "torch"),
    ]
    print(f"| µs per module call ({calls['module_calls']} calls a step) | MLP width 32, batch 8 "
          "| MLP width 256, batch 64 |")
    print("|---|---:|---:|")
    for label, mode, kind in rows:
        print(f"| {label} | {narrow[mode][kind]:+.2f} | {wide[mode][kind]:+.2f} |")
    print(f"| the layers instrument's own estimate, calibrated at start | {calls['calibrated_us']:.2f} | |")
    print()
    print("CPU thread time of the user's thread, one torch thread; the agent thread is not included. "
          "Fixed cost: fastest of repeated runs, instruments installed and removed in alternation. "
          "Per call: median over interleaved rounds of (variant − no instrument) in the same round.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
