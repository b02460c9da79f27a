"""Run every benchmark in ``bench/`` and write ``bench/RESULTS.md`` (``make bench``).

    python bench/run_all.py            # full runs
    python bench/run_all.py --quick    # pass --quick to every benchmark (smoke test)

Each ``bench/*.py`` (but this file and ``_*.py``) is run as its own process; it prints a Markdown
table on stdout (progress on stderr) and may write JSON under ``bench/out/``. Known benchmarks run
first in a fixed order; missing ones are skipped. RESULTS.md is only ever written by this script.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ORDER = ["overhead", "hooks", "viewer", "recording", "graph"]


def benchmarks() -> list[Path]:
    found = {p.stem: p for p in HERE.glob("*.py") if p.name != "run_all.py" and not p.name.startswith("_")}
    names = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    return [found[n] for n in names]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> list[str]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores ({affinity} usable by this process)",
        f"- RAM: {_ram_gib()}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()}, torch {_version('torch')}, "
        f"transformers {_version('transformers')}, textual {_version('textual')}, llmtop {_version('llmtop')}",
        f"- Commit: {_git_commit()}",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Load average at start (1/5/15 min): {load}",
    ]


def run_one(path: Path, quick: bool) -> tuple[int, str, float, list[str]]:
    # Pass --quick only to benchmarks that know it (an unknown flag would end the run at argparse).
    quick = quick and "--quick" in path.read_text(encoding="utf-8", errors="replace")
    cmd = [sys.executable, str(path)] + (["--quick"] if quick else [])
    print(f"[run_all] {path.name} …", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    return proc.returncode, proc.stdout.rstrip(), time.monotonic() - t0, cmd[1:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="run all llmtop benchmarks and write bench/RESULTS.md")
    p.add_argument("--quick", action="store_true", help="pass --quick to each benchmark")
    p.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)

    sections = ["# llmtop benchmark results", "",
                "Written by `bench/run_all.py` (`make bench`); do not edit by hand.", "",
                "## Machine", "", *machine(), ""]
    if args.quick:
        sections += ["**Quick mode**: few pairs and short runs; figures are for smoke testing only.", ""]
    worst = 0
    for path in benchmarks():
        rc, out, secs, cmd = run_one(path, args.quick)
        worst = max(worst, rc)
        shown = " ".join([f"bench/{path.name}", *cmd[1:]])
        sections += [f"## {path.stem}", "", f"`python {shown}` ({secs:.0f} s, exit code {rc})", "",
                     out or "(no output)", ""]
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    sections += [f"Load average at end (1/5/15 min): {load}", ""]
    Path(args.output).write_text("\n".join(sections))
    print(f"[run_all] wrote {args.output}", file=sys.stderr)
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
