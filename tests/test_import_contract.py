"""The import contract: the agent never loads Textual, the viewer never loads torch.

Checked twice: by importing each package in a fresh interpreter (what users feel), and by a
static scan of every module (catches imports hidden in functions that a bare import skips).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package → (folder, modules it must never import)
CONTRACT = {
    "llmtop.agent": ("agent", {"textual", "rich"}),
    "llmtop.protocol": ("protocol", {"textual", "rich", "torch", "transformers", "llmtop.agent", "llmtop.tui"}),
    "llmtop.tui": ("tui", {"torch", "transformers", "llmtop.agent"}),
    # Inside the packages: the viewer's headless core and its commands never load Textual (the views
    # do), and FLOP counting serves `llmtop graph` with no agent running.
    "llmtop.tui.session": ("tui/session", {"textual", "llmtop.tui.views", "llmtop.tui.commands"}),
    "llmtop.tui.commands": ("tui/commands", {"textual"}),
    "llmtop.agent.flops": ("agent/flops", {"llmtop.agent.runtime", "llmtop.agent.instruments",
                                           "llmtop.agent.hf"}),
}
SUBPACKAGES = {"llmtop.tui.session", "llmtop.tui.commands", "llmtop.agent.flops"}


@pytest.mark.parametrize("package", sorted(set(CONTRACT) - SUBPACKAGES))
def test_importing_a_package_loads_no_forbidden_module(package: str) -> None:
    banned = sorted(CONTRACT[package][1] | ({"torch"} if package == "llmtop.agent" else set()))
    code = (
        "import sys, importlib, pkgutil\n"
        f"pkg = importlib.import_module({package!r})\n"
        # llmtop.agent must be cheap to import: torch loads only when the agent starts.
        f"print(sorted(m for m in {banned!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {package} loaded {out.stdout.strip()}"


def _imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def _violations(folder: str, banned: set[str]) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _imported_names(path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(CONTRACT))
def test_no_module_imports_a_forbidden_package_anywhere(package: str) -> None:
    folder, banned = CONTRACT[package]
    assert _violations(folder, banned) == []


def test_the_static_scan_can_fail(tmp_path: Path) -> None:
    """Guard against a scan that silently finds nothing."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import torch.nn\n    from textual.app import App\n")
    assert _imported_names(bad) == {"torch.nn", "textual.app"}


def test_viewer_commands_do_not_load_torch() -> None:
    code = (
        "import sys\n"
        "from llmtop import cli\n"
        "import importlib\n"
        "for name in sorted(set(cli.COMMANDS) - {'graph'}):  # graph builds models: torch is its job\n"
        "    importlib.import_module(cli.COMMANDS[name])\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("package, banned", [("llmtop.tui", "torch"), ("llmtop.agent", "textual"),
                                             ("llmtop.protocol", "torch"), ("llmtop.protocol", "textual")])
def test_importing_every_module_of_a_package_loads_no_forbidden_module(package: str, banned: str) -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "names = [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.')]\n"
        "for name in names:\n"
        "    if not name.endswith('sitecustomize'):\n"
        "        importlib.import_module(name)\n"
        f"print(len(names), {banned!r} in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, loaded = out.stdout.split()
    assert int(count) >= 3 and loaded == "False", f"importing all of {package} loaded {banned}"
