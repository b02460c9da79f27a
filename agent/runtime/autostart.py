"""Start the agent at interpreter start-up when the environment asks for it.

Called from ``agent/bootstrap/sitecustomize.py`` (put on ``PYTHONPATH`` by ``llmtop attach``) and
from the ``llmtop-autostart.pth`` start-up hook (``LLMTOP=1 python train.py``). It never raises
and never prints unless the user's own settings are wrong.
"""

from __future__ import annotations

import os
import sys

TRUTHY = ("1", "true", "yes", "on")

# Helper processes that must not carry an agent: multiprocessing's spawn/forkserver children
# (DataLoader workers with the spawn start method) and its resource tracker, and llmtop itself.
_SKIP_MARKERS = ("--multiprocessing-fork", "multiprocessing.resource_tracker", "multiprocessing.forkserver",
                 "from multiprocessing.", "llmtop.cli")


def wanted(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    flag = env.get("LLMTOP", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    return flag in TRUTHY or bool(env.get("LLMTOP_SOCKET")) or bool(env.get("LLMTOP_RECORD"))


def skipped_process(argv: list[str] | None = None) -> bool:
    argv = list(getattr(sys, "orig_argv", sys.argv) if argv is None else argv)
    cmdline = " ".join(argv)
    if any(marker in cmdline for marker in _SKIP_MARKERS):
        return True
    return len(argv) > 1 and os.path.basename(argv[1]) == "llmtop"


def descendant_of_attached_script(env: dict[str, str] | None = None) -> bool:
    """Under ``llmtop attach script.py`` only the script's own process is watched: Python processes
    it starts (pip, tokenizer helpers, tools) would pay for an agent nobody looks at. ``attach -- CMD``
    leaves ``LLMTOP_PARENT_PID`` unset, so every Python process of a launcher gets an agent."""
    env = os.environ if env is None else env
    parent = env.get("LLMTOP_PARENT_PID", "")
    if not parent or env.get("LLMTOP", "").strip().lower() in TRUTHY:
        return False
    return not (parent.isdigit() and int(parent) == os.getppid())


def autostart() -> None:
    if not wanted():
        return
    argv = list(getattr(sys, "orig_argv", sys.argv))
    try:
        from llmtop.agent.runtime.ranks import launcher_of, spawn_child

        if launcher_of(argv):
            return  # torchrun, accelerate launch, deepspeed: only their children (the ranks) are watched
        if spawn_child(argv):
            # A multiprocessing spawn child: a torch.multiprocessing.spawn rank gets an agent when it
            # unpickles its target; other spawn children (DataLoader workers, pools) never do.
            _SpawnWatch.install()
            return
    except Exception:
        pass
    if skipped_process() or descendant_of_attached_script():
        return
    _start()


def _start() -> None:
    try:
        from llmtop.agent.runtime.process import start_agent

        start_agent()
    except Exception as exc:  # fail open: the script runs without an agent
        try:
            print(f"llmtop: agent not started: {type(exc).__name__}: {exc}", file=sys.stderr)
        except Exception:
            pass


_SPAWN_MODULE = "torch.multiprocessing.spawn"


class _SpawnWatch:
    """A meta-path finder that, when ``torch.multiprocessing.spawn`` is imported in a spawn child,
    replaces its ``_wrap`` (the target every ``torch.multiprocessing.spawn`` child runs, looked up by
    name when the child unpickles its ``Process``) with one that starts the agent first. The child's
    rank is learnt later from torch.distributed (ranks.py). Removes itself after that one import."""

    @classmethod
    def install(cls) -> None:
        if not any(isinstance(f, cls) for f in sys.meta_path):
            sys.meta_path.insert(0, cls())

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name != _SPAWN_MODULE:
            return None
        import importlib.machinery

        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        spec = importlib.machinery.PathFinder.find_spec(name, path)  # type: ignore[arg-type]
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_wrap(module: object) -> None:
            exec_module(module)
            try:
                _wrap_spawn_target(module)
            except Exception:
                pass

        loader.exec_module = exec_and_wrap  # type: ignore[method-assign]
        return spec


def _wrap_spawn_target(module: object) -> None:
    original = getattr(module, "_wrap", None)
    if original is None or getattr(original, "_llmtop", False):
        return

    def _wrap(*args: object, **kwargs: object) -> object:
        _start()
        return original(*args, **kwargs)

    # pickled by reference in a grandchild's parent: the name must resolve back to this function
    _wrap.__module__ = original.__module__
    _wrap.__qualname__ = original.__qualname__
    _wrap._llmtop = True  # type: ignore[attr-defined]
    module._wrap = _wrap  # type: ignore[attr-defined]
