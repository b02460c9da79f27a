"""The `llmtop` command. Each subcommand lives in its own module, imported only when used, so that
`llmtop ls` never loads Textual and `llmtop watch` never loads torch.

A subcommand module provides ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "attach": "llmtop.launch",
    "watch": "llmtop.tui.commands.watch",
    "ls": "llmtop.ls",
    "record": "llmtop.tui.commands.record",
    "replay": "llmtop.tui.commands.replay",
    "export": "llmtop.tui.commands.export",
    "report": "llmtop.tui.commands.report",
    "diff": "llmtop.tui.commands.diff",
    "graph": "llmtop.agent.flops.graph",
}

SUMMARY = {
    "attach": "run a script (or any command after --) with the agent inside and watch it",
    "watch": "open the dashboard on a running agent (PID or socket path)",
    "ls": "list live agents on this machine",
    "record": "record a running agent's session to a file, without a dashboard",
    "replay": "open the dashboard on a recording, with seek",
    "export": "export a recording as a Chrome/Perfetto trace, CSV or JSON",
    "report": "print a one-screen summary of a recording",
    "diff": "compare two recordings per phase and per layer",
    "graph": "static parameters, FLOPs and memory of a model, without weights",
}


def _usage() -> str:
    lines = ["usage: llmtop COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {SUMMARY[name]}" for name in COMMANDS]
    lines += ["", "`llmtop COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from llmtop import __version__

        print(f"llmtop {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"llmtop: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name])
    parser = argparse.ArgumentParser(prog=f"llmtop {name}", description=getattr(module, "HELP", None))
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
