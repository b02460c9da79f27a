"""llmtop's start-up hook, found because ``llmtop attach`` puts this folder first on PYTHONPATH.

It removes this folder from ``sys.path`` (the script sees the path it would see without llmtop),
chains to any other ``sitecustomize`` further down the path (the ddtrace-run / coverage pattern),
then starts the agent if ``LLMTOP_*`` says so. It never raises into interpreter start-up.
"""


def _llmtop_bootstrap() -> None:
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if not p or os.path.abspath(p) != here]

    ours = sys.modules.pop("sitecustomize", None)
    try:
        import importlib

        chained = importlib.import_module("sitecustomize")
    except ImportError as exc:
        chained = None
        if exc.name != "sitecustomize":
            _report(exc)
    except Exception as exc:  # what site.py does for a broken sitecustomize
        chained = None
        _report(exc)
    sys.modules["sitecustomize"] = chained if chained is not None else ours

    try:
        from llmtop.agent.runtime.autostart import autostart
    except Exception:
        return  # llmtop is not importable by this interpreter: run the script untouched
    autostart()


def _report(exc: BaseException) -> None:
    import os
    import sys

    if os.environ.get("PYTHONVERBOSE"):
        import traceback

        traceback.print_exception(exc)
    else:
        print(f"Error in sitecustomize; set PYTHONVERBOSE for traceback:\n{type(exc).__name__}: {exc}",
              file=sys.stderr)


_llmtop_bootstrap()
del _llmtop_bootstrap
