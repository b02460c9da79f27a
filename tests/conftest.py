"""Shared fixtures. Keep this small; helpers for one area live in that area's test file."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LLMTOP = str(VENV_BIN / "llmtop")


@pytest.fixture(autouse=True)
def module_call_restored() -> Iterator[None]:
    """Every test leaves ``nn.Module.__call__`` as torch has it (agent/instruments/roots.py replaces it while an
    agent runs): a replacement left behind would change every later test's module calls."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "nn"):
        module_cls = torch.nn.Module
        assert module_cls.__dict__["__call__"] is module_cls._wrapped_call_impl, "nn.Module.__call__ left replaced"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="lt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private agent socket path, exported as LLMTOP_SOCKET for child processes."""
    path = short_tmp / "a.sock"
    monkeypatch.setenv("LLMTOP_SOCKET", str(path))
    return path


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process under test: this venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env
