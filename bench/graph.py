"""Time and peak RSS of `llmtop graph` on a small and a 7B model, and the live FLOPs capture cost.

    python bench/graph.py            # 3 runs per model, medians
    python bench/graph.py --quick    # 1 run per model

Each `llmtop graph` run is its own process (imports included: that is what a person waits for);
peak RSS is the child's ``ru_maxrss`` from ``wait4``. Targets (issue 6): gpt2 ≤ 5 s, a 7B Llama
config ≤ 60 s with peak RSS < 2 GB. The hot-path part of the live FLOPs instrument (turning a root
forward's arguments into a shape signature) is timed in-process, in µs per root forward.

Output: a Markdown table on stdout and ``bench/out/graph.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT_DIR = HERE / "out"
LLMTOP = str(Path(sys.executable).parent / "llmtop")

CASES = [  # (label, argv, seconds target, RSS target bytes)
    ("gpt2", ["gpt2"], 5.0, None),
    ("llama-2-7b", ["llama-2-7b"], 60.0, 2 * 2**30),
    ("llama-2-7b, seq 2048, bf16", ["llama-2-7b", "--seq-len", "2048", "--dtype", "bfloat16"], 60.0,
     2 * 2**30),
]


def run_graph(argv: list[str]) -> tuple[float, float, int, int, dict]:
    """(wall s, CPU s, peak RSS bytes, exit code, parsed json) of one `llmtop graph` process."""
    cmd = [LLMTOP, "graph", *argv, "--device", "h100", "--format", "json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read() if proc.stdout else b""
    err = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    cpu = usage.ru_utime + usage.ru_stime
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(err.decode(errors="replace"), file=sys.stderr)
        return wall, cpu, usage.ru_maxrss * 1024, proc.returncode, {}
    return wall, cpu, usage.ru_maxrss * 1024, 0, json.loads(out)


def capture_cost_us(n: int) -> float:
    """µs per root forward for the live instrument's hot-path signature of GPT-2-style arguments."""
    import torch
    from llmtop.agent.flops.signatures import autocast_dtype, signature

    ids = torch.zeros(8, 128, dtype=torch.long)
    mask = torch.ones(8, 128, dtype=torch.long)
    kwargs = {"input_ids": ids, "attention_mask": mask, "labels": ids, "use_cache": False}
    seen = {signature((), kwargs, autocast_dtype(torch))}
    best = float("inf")
    for _ in range(10):  # best of 10 batches: the machine's load only ever adds
        t0 = time.perf_counter_ns()
        for _ in range(n // 10):
            _ = signature((), kwargs, autocast_dtype(torch)) in seen
        best = min(best, (time.perf_counter_ns() - t0) / (n // 10) / 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    runs = 1 if args.quick else 3
    rows, results, worst = [], [], 0
    for label, case_argv, t_target, rss_target in CASES:
        walls, cpus, rsss, flops = [], [], [], 0.0
        for _ in range(runs):
            print(f"[graph] {label} …", file=sys.stderr, flush=True)
            wall, cpu, rss, rc, data = run_graph(case_argv)
            if rc != 0:
                worst = 1
                break
            walls.append(wall)
            cpus.append(cpu)
            rsss.append(rss)
            flops = data["flops"]
        if not walls:
            rows.append(f"| {label} | failed | | | | |")
            continue
        wall, cpu, rss = statistics.median(walls), statistics.median(cpus), max(rsss)
        ok = wall <= t_target and (rss_target is None or rss <= rss_target)
        worst = worst if ok else 1
        target = f"≤ {t_target:.0f} s" + (f", RSS < {rss_target / 2**30:.0f} GiB" if rss_target else "")
        rows.append(f"| {label} | {wall:.2f} s | {cpu:.2f} s | {rss / 2**20:.0f} MiB | {flops / 1e9:,.1f} | {target}: "
                    f"{'met' if ok else 'MISSED'} |")
        results.append({"case": label, "argv": case_argv, "wall_s": walls, "cpu_s": cpus, "peak_rss": rsss,
                        "flops": flops})
    cost = capture_cost_us(2000 if args.quick else 20000)
    print(f"`llmtop graph MODEL --device h100 --format json`, {runs} run(s) per model, median wall time "
          "(process start, imports, meta build, count), median CPU time (user + sys), peak RSS over runs. "
          "Wall time depends on machine load (see the load average); the target is checked on wall time.\n")
    print("| model | wall time | CPU time | peak RSS | GFLOPs (forward) | target |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nLive FLOPs instrument, hot path: {cost:.1f} µs (best of 10 batches) per root forward to build and look up the "
          "shape signature of GPT-2-style kwargs (input_ids, attention_mask, labels, use_cache); the "
          "count itself runs on the agent thread once per signature.")
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "graph.json").write_text(json.dumps({"runs": results, "capture_us": cost}, indent=1))
    return worst


if __name__ == "__main__":
    sys.exit(main())
