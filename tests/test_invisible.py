"""llmtop is invisible to a seeded script: each script in ``tests/scripts/seeded_*.py`` prints the
same bytes (losses, samples, final torch / random / numpy states and global torch settings) under
``llmtop attach --headless``, with every instrument forced on and a cold cache, as under plain
python; and nothing more on stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import LLMTOP, child_env

pytest.importorskip("torch")

SCRIPTS = Path(__file__).parent / "scripts"
SEEDED = sorted(p.name for p in SCRIPTS.glob("seeded_*.py"))


def run_both(script: Path, tmp: Path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """(plain python, under llmtop) for ``script``, each with a fresh cache directory."""
    def env(name: str) -> dict[str, str]:
        cache = tmp / f"cache-{name}"
        return child_env(XDG_CACHE_HOME=str(cache), LLMTOP_LAYER_EVERY="1", LLMTOP_OPS_EVERY="1",
                         LLMTOP_FLOPS="1", LLMTOP_SOCKET=str(tmp / f"{name}.sock"),
                         LLMTOP_TICK="0.1")  # ticks often: the first FLOP count (and the cold
                         # CPU-peak measurement) happens early in these short runs
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                           env=env("plain"), stdin=subprocess.DEVNULL, cwd=tmp)
    under = subprocess.run([LLMTOP, "attach", "--headless", str(script)], capture_output=True, text=True,
                           timeout=180, env=env("llmtop"), stdin=subprocess.DEVNULL, cwd=tmp)
    return plain, under


@pytest.mark.parametrize("name", SEEDED)
def test_seeded_script_prints_the_same_with_and_without_llmtop(name: str, short_tmp: Path) -> None:
    plain, under = run_both(SCRIPTS / name, short_tmp)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert under.returncode == 0, under.stderr[-2000:]
    assert plain.stdout.count("\n") > 3 and "torch " in plain.stdout  # the script printed its states
    assert under.stdout == plain.stdout
    assert under.stderr == plain.stderr
    # the agent ran with everything on: it made a cache (the CPU peak measured cold)
    assert (short_tmp / "cache-llmtop" / "llmtop" / "cpu_peaks.json").exists() or name == "seeded_generate.py"


def test_all_the_brief_scripts_are_here() -> None:
    assert {"seeded_adamw.py", "seeded_accum.py", "seeded_dataloader.py", "seeded_dropout.py",
            "seeded_generate.py"} <= set(SEEDED)
