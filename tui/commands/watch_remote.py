"""`llmtop watch ssh://HOST[/JOB|PID]` (repeatable), `--hosts h1,h2`, and inside a Slurm allocation
the job's nodes: every host's agents through ``llmtop bridge`` over the user's own ssh.

``watch.py`` calls ``wanted(args)`` then ``run(args)``; ``cli.py`` adds the options with
``add_arguments``. The streams open in the job view (``RemoteJob``): every host's streams in one
``JobModel``, with the Ranks view and rank selection, as for a job on this host.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from urllib.parse import urlsplit

from llmtop.tui.commands.common import check_view_arguments, fail
from llmtop.tui.session.bridge_source import BridgeSource, JobSources
from llmtop.tui.session.job import JobModel
from llmtop.tui.session.model import CONNECTING, LIVE, LOST, SessionModel

SCHEME = "ssh://"
_TARGET = re.compile(r"^[A-Za-z0-9_.:@+=,-]+$")  # all, a PID or a job id; passed to a remote shell (quoted)
_HOST = re.compile(r"^(?:[A-Za-z0-9_.+-]+@)?(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Watch's own parser gains remote targets: its target becomes optional (``--hosts`` or a Slurm
    allocation need none) and more ``ssh://`` targets may follow it."""
    for action in parser._actions:  # argparse has no public way to relax an argument
        if action.dest == "target":
            action.nargs, action.default = "?", None
            action.help = (action.help or "") + "; or ssh://HOST[/JOB|PID] (repeatable) to watch over ssh"
    parser.add_argument("more", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--hosts", metavar="H1,H2", help="watch these hosts over ssh (node[01-04] lists too; the target, if given, "
                        "is the JOB|PID there; default all); `slurm`: this Slurm job's nodes")
    parser.add_argument("--ssh-command", metavar="CMD", default=None,
                        help='how to run ssh, e.g. "ssh -J jump" (default $LLMTOP_SSH, else ssh)')
    parser.add_argument("--remote-llmtop", metavar="CMD", default=None,
                        help="llmtop on the remote hosts, e.g. ~/venv/bin/llmtop (default $LLMTOP_REMOTE, else llmtop)")


def _positionals(args: argparse.Namespace) -> list[str]:
    return [t for t in [getattr(args, "target", None), *(getattr(args, "more", None) or [])] if t]


def slurm_nodelist(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""


def wanted(args: argparse.Namespace) -> bool:
    """Is this a remote watch (or a watch with no target, which only a Slurm allocation explains)?"""
    targets = _positionals(args)
    return (bool(getattr(args, "hosts", None)) or len(targets) != 1
            or any(t.startswith(SCHEME) for t in targets))


# --- host lists ------------------------------------------------------------------------------------


def _split_top(text: str) -> list[str]:
    """Split on the commas that are outside brackets (``a[1-2,5],b`` → ``a[1-2,5]``, ``b``)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"cannot read the node list {text!r}: unbalanced ]")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"cannot read the node list {text!r}: unbalanced [")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand(name: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", name)
    if m is None:
        return [name]
    head, tail = name[: m.start()], name[m.end():]
    values: list[str] = []
    for item in m.group(1).split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"cannot read the node list {whole!r}: bad range {item!r}")
        start, stop = int(lo), int(hi) if sep else int(lo)
        if stop < start or stop - start > 100_000:
            raise ValueError(f"cannot read the node list {whole!r}: bad range {item!r}")
        values += [str(n).zfill(len(lo)) for n in range(start, stop + 1)]  # node[01-10]: padded as written
    return [head + v + rest for v in values for rest in _expand(tail, whole)]


def expand_hostlist(text: str) -> list[str]:
    """A Slurm node list (``node[01-04],gpu7``, ``rack[1-2]-n[1-2]``) as host names, in order, once each."""
    out: list[str] = []
    for part in _split_top(text):
        out += _expand(part, text)
    return list(dict.fromkeys(out))


def slurm_hosts(env: dict[str, str] | None = None) -> list[str]:
    """This Slurm job's nodes: ``scontrol show hostnames`` when it is there, else our own parser."""
    nodelist = slurm_nodelist(env)
    if not nodelist:
        raise ValueError("not inside a Slurm allocation (no SLURM_JOB_NODELIST)")
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            done = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                  timeout=10)
            hosts = [line.strip() for line in done.stdout.splitlines() if line.strip()]
            if done.returncode == 0 and hosts:
                return list(dict.fromkeys(hosts))
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_hostlist(nodelist)


# --- targets ---------------------------------------------------------------------------------------


def check_host(host: str) -> str:
    """A host name safe to hand to ssh (never an option: ``-oProxyCommand=…`` is refused)."""
    if not host or host.startswith("-") or not _HOST.match(host):
        raise ValueError(f"bad host {host!r}: expected [user@]host[:port]")
    return host


def check_target(target: str) -> str:
    if not target or target.startswith("-") or not _TARGET.match(target):
        raise ValueError(f"bad target {target!r}: expected all, a PID or a job id")
    return target


def parse_ssh_url(url: str) -> tuple[str, str | None]:
    """``ssh://[user@]host[:port][/JOB|PID]`` → (host, target or None)."""
    parts = urlsplit(url)
    if parts.scheme != "ssh" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"bad target {url!r}: expected ssh://HOST[/JOB|PID]")
    target = parts.path.strip("/") or None
    return check_host(parts.netloc), check_target(target) if target else None


def remote_targets(args: argparse.Namespace, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Every (host, target) the arguments name, in order, once each. Raises ValueError (one line)."""
    positionals = _positionals(args)
    urls = [t for t in positionals if t.startswith(SCHEME)]
    plain = [t for t in positionals if not t.startswith(SCHEME)]
    hosts_arg = getattr(args, "hosts", None)
    if len(plain) > 1 and not urls:
        raise ValueError("one local PID or socket at a time; agents on other hosts are ssh://HOST/PID")
    if plain and urls:
        raise ValueError("a local PID or socket cannot be mixed with ssh:// targets; "
                         "name remote agents as ssh://HOST/PID, or use --hosts H1,H2 PID")
    if plain and not hosts_arg:
        raise ValueError(f"{plain[0]!r} is not an ssh:// target")
    out: list[tuple[str, str]] = []
    for url in urls:
        host, target = parse_ssh_url(url)
        out.append((host, target or "all"))
    default = check_target(plain[0]) if plain else "all"
    if hosts_arg:
        names = slurm_hosts(env) if hosts_arg.strip() == "slurm" else expand_hostlist(hosts_arg)
        out += [(check_host(h), default) for h in names]
    if not out:
        if not slurm_nodelist(env):
            raise ValueError("which agent? give a PID or socket (see `llmtop ls`), ssh://HOST[/JOB|PID] "
                             "or --hosts H1,H2")
        out += [(check_host(h), "all") for h in slurm_hosts(env)]
    return list(dict.fromkeys(out))


# --- the job view fed by every host's bridge ----------------------------------------------------------


class RemoteJob:
    """A job source for the app (``job``, ``run(model)``, ``stop()``): every host's bridge streams feed
    one ``JobModel``; the app shows the lowest rank once one is there. Until a stream opens, the hosts'
    states are the placeholder model's connection note."""

    primary_key = None  # no stream to start from: the app picks the lowest rank seen

    def __init__(self, feed: JobSources) -> None:
        self.feed = feed
        self.job = JobModel()
        self._model: SessionModel | None = None
        for source in feed.sources:
            source.on_status = self._status

    def _status(self, host: str, text: str) -> None:
        model = self._model
        if model is None:
            return
        with model.lock:
            if model.session is None and model.connection != LIVE:
                failing = any(s.last_error and s.status == s.last_error for s in self.feed.sources)
                model.set_connection(LOST if failing else CONNECTING, self.feed.status())

    def run(self, model: SessionModel) -> None:
        self._model = model
        self.feed.run(self.job)

    def stop(self) -> None:
        self.feed.stop()


def run(args: argparse.Namespace) -> int:
    try:
        remotes = remote_targets(args)
        sources = [BridgeSource(host, target, getattr(args, "ssh_command", None),
                                remote_llmtop=getattr(args, "remote_llmtop", None)) for host, target in remotes]
    except ValueError as exc:
        return fail("watch", str(exc))
    bad = check_view_arguments("watch", args)
    if bad is not None:
        return bad
    from llmtop.tui.views.app import LlmtopApp

    feed = JobSources(sources)
    where = ", ".join(f"{SCHEME}{h}/{t}" for h, t in remotes)
    source = RemoteJob(feed)
    app = LlmtopApp(source, refresh_hz=args.refresh, window_s=args.window, title=f"llmtop {where}")
    try:
        app.run()
    finally:
        feed.stop()
    job = source.job
    if job.models:
        print(f"llmtop watch: {len(job.models)} stream(s) received from "
              f"{len({k.rsplit(':', 1)[0] for k in job.models})} host(s)", file=sys.stderr)
    elif feed.sources:
        print(f"llmtop watch: no agent stream arrived ({feed.status()})", file=sys.stderr)
    return 0
