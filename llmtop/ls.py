"""`llmtop ls`: live agents on this machine, from the info files beside their sockets."""

from __future__ import annotations

import argparse
import json
import time

from llmtop.protocol.paths import list_agents, search_dirs, socket_dir

HELP = "List live llmtop agents on this machine (pid, uptime, script, socket)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object per agent")


def _uptime(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run(args: argparse.Namespace) -> int:
    agents = list_agents()
    if args.json:
        for a in agents:
            print(json.dumps({"pid": a.pid, "socket": a.socket, "argv": a.argv, "started": a.started}))
        return 0
    if not agents:
        looked = ", ".join(str(d) for d in search_dirs()) or f"{socket_dir()} (not there yet)"
        print(f"no live llmtop agents (looked in {looked})")
        return 0
    now = time.time()
    print(f"{'PID':>7}  {'UPTIME':>8}  SCRIPT")
    for a in agents:
        print(f"{a.pid:>7}  {_uptime(now - a.started):>8}  {a.script}   [{a.socket}]")
    return 0
