"""What timing torch.distributed collectives costs: per call, and per rank of a DDP job.

    python bench/bench_collectives.py            # full
    python bench/bench_collectives.py --quick    # fewer rounds and pairs

- **Per call** (agent/instruments/collectives.py installed vs not): a real gloo process group, in
  one process (world size 1: gloo's own cost is smallest, so the wrapper's shows best) and in a
  2-rank ``torchrun`` job (loopback TCP). Each round times a block of ``all_reduce`` calls of a
  4-byte tensor bare, then a block with the instrument installed (both ranks do the same, in
  lockstep), in alternating order; the figure is the median over rounds of (wrapped - bare) per
  call. Also ``all_reduce(async_op=True)`` + ``wait()`` (two wrapped calls).
- **Per rank of a job**: a small DDP training loop under ``torchrun --nproc_per_node=N`` (N = 2, 4;
  gloo on CPU, one torch thread per rank), bare and with an agent in every rank (``LLMTOP=1``:
  every instrument, this one included), in interleaved pairs. Each rank times its own steps after a
  warm-up; a run's figure is the median step over its ranks' medians; the ratio is the median over
  pairs of (agent / bare). On a 2-core machine 4 ranks are oversubscribed: read that row as the
  cost under contention.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent


# --- per call ------------------------------------------------------------------------------------

class _Ctx:
    """The instrument contract (agent/runtime/core.py): no agent thread, nothing kept."""

    def __init__(self) -> None:
        from llmtop.agent.runtime import core

        self.options = core.Options()
        self.current_step = 0
        self.stopping = False
        self.warnings: list[str] = []

    def emit(self, event: Any) -> None:
        pass

    def warn(self, source: str, message: str) -> None:
        self.warnings.append(message)

    def set_manual_step(self, fn: Any) -> None:
        pass


def _block(calls: int, async_op: bool) -> tuple[float, float]:
    """(wall, this thread's CPU) seconds for ``calls`` all_reduces of one float (each rank runs the
    same block)."""
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.barrier()
    t0, c0 = time.perf_counter(), time.thread_time()
    if async_op:
        for _ in range(calls):
            dist.all_reduce(t, async_op=True).wait()
    else:
        for _ in range(calls):
            dist.all_reduce(t)
    return time.perf_counter() - t0, time.thread_time() - c0


def per_call(rounds: int, calls: int) -> dict[str, float]:
    """Median over rounds of (wrapped - bare) µs per call, wall and CPU of the calling thread; rounds
    alternate which side goes first."""
    from llmtop.agent.instruments.collectives import CollectivesInstrument

    ctx = _Ctx()
    out: dict[str, float] = {}
    for async_op in (False, True):
        diffs, bare_us, cpu_diffs = [], [], []
        _block(calls, async_op)  # warm-up
        for r in range(rounds):
            sides: dict[str, tuple[float, float]] = {}
            for side in (("bare", "wrapped") if r % 2 == 0 else ("wrapped", "bare")):
                inst = None
                if side == "wrapped":
                    inst = CollectivesInstrument(ctx.options)
                    inst.install(ctx)
                try:
                    sides[side] = _block(calls, async_op)
                finally:
                    if inst is not None:
                        inst.uninstall()
            diffs.append((sides["wrapped"][0] - sides["bare"][0]) / calls * 1e6)
            cpu_diffs.append((sides["wrapped"][1] - sides["bare"][1]) / calls * 1e6)
            bare_us.append(sides["bare"][0] / calls * 1e6)
        key = "async" if async_op else "blocking"
        out[f"{key}_bare_us"] = statistics.median(bare_us)
        out[f"{key}_cost_us"] = statistics.median(diffs)
        out[f"{key}_cpu_us"] = statistics.median(cpu_diffs)
    if ctx.warnings:
        raise SystemExit(f"instrument warned: {ctx.warnings}")
    return out


def per_call_worker(path: str, rounds: int, calls: int) -> None:
    """One rank of the 2-rank per-call job (run by torchrun)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    res = per_call(rounds, calls)
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps(res))
    dist.destroy_process_group()


def per_call_local(rounds: int, calls: int) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        try:
            return per_call(rounds, calls)
        finally:
            dist.destroy_process_group()


# --- per rank of a DDP job -------------------------------------------------------------------------

def ddp_worker(path: str, steps: int, warmup: int) -> None:
    """One rank of the DDP job: its median step time after the warm-up, in a JSON file per rank."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    x, y = torch.randn(64, 128, generator=g), torch.randint(0, 10, (64,), generator=g)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    Path(f"{path}.rank{rank}.json").write_text(json.dumps({"median_ms": statistics.median(times) * 1e3}))
    dist.destroy_process_group()


def torchrun(nproc: int, args: list[str], env: dict[str, str]) -> None:
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(Path(__file__)), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"torchrun failed ({res.returncode}): {res.stderr[-2000:]}")


def job_env(agent: bool, tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTOP")}
    env["OMP_NUM_THREADS"] = "1"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if agent:
        env["LLMTOP"] = "1"
        env["XDG_RUNTIME_DIR"] = tmp  # the agents' sockets in a private directory
    return env


def per_rank(nproc: int, pairs: int, steps: int, warmup: int) -> dict[str, Any]:
    ratios, bare_ms, agent_ms = [], [], []
    with tempfile.TemporaryDirectory(prefix="lt-bench-") as tmp:
        for p in range(pairs):
            got: dict[bool, float] = {}
            for agent in ((False, True) if p % 2 == 0 else (True, False)):
                out = f"{tmp}/run{p}{int(agent)}"
                torchrun(nproc, ["--ddp-worker", out, str(steps), str(warmup)], job_env(agent, tmp))
                ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text())["median_ms"] for r in range(nproc)]
                got[agent] = statistics.median(ranks)
            bare_ms.append(got[False])
            agent_ms.append(got[True])
            ratios.append(got[True] / got[False])
            print(f"[bench_collectives] {nproc} ranks pair {p}: bare {got[False]:.2f} ms, "
                  f"agent {got[True]:.2f} ms", file=sys.stderr, flush=True)
    return {"bare_ms": statistics.median(bare_ms), "agent_ms": statistics.median(agent_ms),
            "ratio": statistics.median(ratios), "pairs": pairs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ddp-worker", nargs=3, metavar=("OUT", "STEPS", "WARMUP"), help=argparse.SUPPRESS)
    p.add_argument("--call-worker", nargs=3, metavar=("OUT", "ROUNDS", "CALLS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ddp_worker:
        ddp_worker(args.ddp_worker[0], int(args.ddp_worker[1]), int(args.ddp_worker[2]))
        return 0
    if args.call_worker:
        per_call_worker(args.call_worker[0], int(args.call_worker[1]), int(args.call_worker[2]))
        return 0
    rounds, calls = (5, 200) if args.quick else (21, 500)
    # the warm-up (~3 s) keeps the agent's start-up work (its first FLOP count) out of the timed steps
    pairs, steps, warmup = (1, 30, 30) if args.quick else (4, 200, 200)
    print("[bench_collectives] per call, one process", file=sys.stderr, flush=True)
    local = per_call_local(rounds, calls)
    print("[bench_collectives] per call, 2 ranks", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="lt-bench-") as tmp:
        torchrun(2, ["--call-worker", f"{tmp}/calls.json", str(rounds), str(calls)], job_env(False, tmp))
        two = json.loads(Path(f"{tmp}/calls.json").read_text())
    jobs = {n: per_rank(n, pairs, steps, warmup) for n in (2, 4)}

    print("| all_reduce of 4 bytes, gloo | bare (µs/call) | wrapped − bare, wall (µs/call) "
          "| wrapped − bare, CPU of the caller (µs/call) |")
    print("|---|---:|---:|---:|")
    for label, res in (("1 rank, in process", local), ("2 ranks, torchrun", two)):
        for key, what in (("blocking", "blocking"), ("async", "async_op=True + wait()")):
            print(f"| {label}, {what} | {res[f'{key}_bare_us']:.1f} | {res[f'{key}_cost_us']:+.2f} "
                  f"| {res[f'{key}_cpu_us']:+.2f} |")
    print()
    print(f"Median over {rounds} rounds of {calls} calls, bare and wrapped blocks alternating which goes first "
          "(rank 0's figures for the 2-rank job). Wall time includes gloo's wait for the peer, so it swings "
          "with the load; the caller's CPU time is the wrapper's own cost.")
    print()
    print("| DDP job (MLP 128-256-256-10, batch 64, gloo, 1 thread/rank) | bare step (ms) | agent step (ms) "
          "| ratio (median of pairs) | Δ µs/step |")
    print("|---|---:|---:|---:|---:|")
    for n, res in jobs.items():
        delta = (res["agent_ms"] - res["bare_ms"]) * 1e3
        print(f"| {n} ranks, {res['pairs']} pairs, {steps} steps after {warmup} | {res['bare_ms']:.2f} | "
              f"{res['agent_ms']:.2f} | {res['ratio']:.4f} ({(res['ratio'] - 1) * 100:+.2f} %) | {delta:+.0f} |")
    print()
    print("Step time per run: the median over ranks of each rank's median step; agent runs have `LLMTOP=1` "
          "(an agent with every instrument in each rank). The machine has 2 cores: 4 ranks share them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
