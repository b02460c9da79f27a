"""The `llmtop` command. Each subcommand lives in its own module, imported only when used, so that
`llmtop ls` never loads Textual and `llmtop watch` never loads torch.

A subcommand module provides ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.

Exit status, for every command (README "Exit status"): 0 ok, 1 a failed check (``diff
--fail-if-slower``), 2 usage or unreadable input, 130 interrupted, 141 the reader of the output went
away (``| head``), quietly, as a C tool killed by SIGPIPE would.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    "completion": "llmtop.completion",
    "bridge": "llmtop.tui.commands.bridge",
}

SUMMARY = {
    "attach": "run a script (or any command after --) with the agent inside and watch it",
    "watch": "open the dashboard on a running agent (PID or socket path)",
    "ls": "list live agents on this machine",
    "record": "record a running agent's session to a file, without a dashboard",
    "replay": "open the dashboard on a recording, with seek",
    "export": "export a recording as a Chrome/Perfetto trace, CSV, JSON or one HTML page",
    "report": "summarize a recording in text or JSON",
    "diff": "compare two recordings per phase and per layer",
    "graph": "static parameters, FLOPs and memory of a model, without weights",
    "completion": "print a shell completion script (bash, zsh or fish)",
    "bridge": "relay this host's agents over stdio (run by `watch ssh://HOST` through ssh)",
}

# One or more examples per command, shown under its --help (argparse epilog).
EXAMPLES = {
    "attach": ["llmtop attach train.py --lr 3e-4          # run train.py with the dashboard",
               "llmtop attach --headless --record run.lrec train.py",
               "llmtop attach -- torchrun --nproc-per-node 2 train.py"],
    "watch": ["llmtop watch 12345                         # the agent of process 12345 (see llmtop ls)",
              "llmtop watch /tmp/run.sock                 # a forwarded socket",
              "llmtop watch ssh://gpu1/12345 ssh://gpu2   # other hosts, through your ssh (llmtop bridge)",
              "llmtop watch --hosts gpu1,gpu2 --ssh-command 'ssh -J jump'"],
    "ls": ["llmtop ls", "llmtop ls --json | jq .pid"],
    "record": ["llmtop record 12345 -o run.lrec", "llmtop record 12345 -o run.lrec --wait 30"],
    "replay": ["llmtop replay run.lrec", "llmtop replay run.lrec --end        # open at the final state",
               "llmtop replay run.lrec --rank 1     # one rank of a job's run.rank*.lrec (default: all)"],
    "export": ["llmtop export run.lrec -f chrome -o run.trace.json   # open in ui.perfetto.dev",
               "llmtop export run.lrec -f csv | head",
               "llmtop export run.lrec -f html -o run.html            # one self-contained page"],
    "report": ["llmtop report run.lrec", "llmtop report run.lrec --json | jq .steps.step_p50_ms"],
    "diff": ["llmtop diff before.lrec after.lrec",
             "llmtop diff before.lrec after.lrec --fail-if-slower 5   # exit 1 when slower"],
    "graph": ["llmtop graph gpt2 --seq-len 1024", "llmtop graph --list"],
    "completion": ["llmtop completion bash > ~/.local/share/bash-completion/completions/llmtop",
                   "llmtop completion zsh > \"${fpath[1]}/_llmtop\"",
                   "llmtop completion fish > ~/.config/fish/completions/llmtop.fish"],
    "bridge": ["ssh gpu1 llmtop bridge 12345   # what `llmtop watch ssh://gpu1/12345` runs"],
}

EXIT_NOTE = "exit status: 0 ok, 1 a failed check, 2 usage or unreadable input"
EPIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away


def _usage() -> str:
    lines = ["usage: llmtop COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {SUMMARY[name]}" for name in COMMANDS]
    lines += ["", "`llmtop COMMAND --help` for a command's options and examples.", EXIT_NOTE]
    return "\n".join(lines)


def epilog(name: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES.get(name, [])) + "\n\n" + EXIT_NOTE


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command (its module is imported; none imports torch or Textual at import)."""
    module = importlib.import_module(COMMANDS[name])
    parser = argparse.ArgumentParser(prog=f"llmtop {name}", description=getattr(module, "HELP", None),
                                     epilog=epilog(name), formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    if name == "watch":  # remote targets: ssh://HOST[/JOB|PID], --hosts, --ssh-command
        importlib.import_module("llmtop.tui.commands.watch_remote").add_arguments(parser)
    return parser


def _quiet_broken_pipe() -> int:
    """The reader closed the pipe (``llmtop report run.lrec | head``): stop without a traceback.
    Standard output now points at /dev/null so that the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EPIPE_STATUS


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _main(argv: list[str] | None) -> int:
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
    parser = build_parser(name)
    args = parser.parse_args(argv[1:])
    try:
        status = int(module.run(args) or 0)
        sys.stdout.flush()  # a closed pipe is found here, not in the interpreter's exit
        return status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
