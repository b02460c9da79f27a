"""The demo (examples/train_tiny_gpt.py): it runs, its tokenizer round-trips the shipped text, and
under `llmtop attach --headless` it prints exactly what it prints with plain python."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LLMTOP, ROOT, child_env

DEMO = ROOT / "examples" / "train_tiny_gpt.py"
TINY = ["--steps", "5", "--log-every", "1", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
        "--seq-len", "32", "--batch-size", "2", "--generate", "4", "--seed", "3"]
LOSS_LINE = re.compile(r"^step\s+(\d+)\s+loss (\S+)\s+grad_norm (\S+)\s+lr (\S+)$")

sys.path.insert(0, str(ROOT / "examples"))
import tinylib  # noqa: E402


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    tinylib.build_tokenizer(path, vocab_size=2048)
    return path


@pytest.fixture(scope="module")
def plain(tok_dir: Path) -> subprocess.CompletedProcess[str]:
    """One plain-python run of the tiny demo, shared by the tests that compare against it."""
    return run_demo([sys.executable], tok_dir, _clean_env())


def _clean_env() -> dict[str, str]:
    env = child_env()
    for key in [k for k in env if k.startswith("LLMTOP")]:
        del env[key]
    return env


def run_demo(cmd_prefix: list[str], tok_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd_prefix, str(DEMO), *TINY, "--tokenizer-dir", str(tok_dir)], cwd=ROOT,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def comparable(stdout: str) -> list[str]:
    """Stdout lines, with the wall-clock figures of the final line removed."""
    return [re.sub(r" in [\d.]+s \(\d+ ms/step\)$", "", line) for line in stdout.splitlines()]


def test_tokenizer_round_trips_the_text(tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    text = tinylib.load_text()
    assert len(text) > 100_000
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    # BPE stops merging once every word of the text is one token: the shipped text has fewer
    # distinct words than 2048 merges would need, so the vocabulary ends up smaller.
    assert 1000 < len(tok) <= 2048
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text) / 3  # BPE merged something: fewer tokens than a third of the bytes
    assert tok.decode(ids) == text
    odd = "Naïve café — ünïcode, tabs\tand  double  spaces.\n"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd


def test_tokenizer_cache_is_reused(tok_dir: Path) -> None:
    saved = tok_dir / "tokenizer.json"
    before = saved.stat().st_mtime_ns
    again = tinylib.build_tokenizer(tok_dir, vocab_size=2048)
    assert saved.stat().st_mtime_ns == before
    assert again.get_vocab() == tinylib.build_tokenizer(tok_dir.parent / "fresh", 2048).get_vocab()


def test_demo_runs_with_plain_python(plain: subprocess.CompletedProcess[str]) -> None:
    proc = plain
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("tiny GPT:")
    losses = [LOSS_LINE.match(line) for line in lines if line.startswith("step")]
    assert [int(m.group(1)) for m in losses if m] == [1, 2, 3, 4, 5]
    values = [float(m.group(2)) for m in losses if m]
    assert all(math.isfinite(v) and 0 < v < 10 for v in values)  # random init: about ln(2048) = 7.6
    assert any(line.startswith("sample: The old fisherman") for line in lines)
    assert lines[-1].startswith("done: 5 steps in ")
    assert "train:" in proc.stderr  # the tqdm bar goes to stderr


def test_demo_is_deterministic(tok_dir: Path, plain: subprocess.CompletedProcess[str]) -> None:
    again = run_demo([sys.executable], tok_dir, _clean_env())
    assert plain.returncode == again.returncode == 0
    assert comparable(again.stdout) == comparable(plain.stdout)


@pytest.mark.skipif(importlib.util.find_spec("llmtop.launch") is None
                    or importlib.util.find_spec("llmtop.agent.runtime.agent") is None,
                    reason="llmtop attach (llmtop/launch.py, agent/runtime/agent.py) not built yet")
def test_demo_under_attach_prints_the_same(tok_dir: Path, sock_path: Path,
                                           plain: subprocess.CompletedProcess[str]) -> None:
    from llmtop.protocol.events import ModelTree, Step
    from llmtop.protocol.recording import RecordingReader

    env = _clean_env()
    env["LLMTOP_SOCKET"] = str(sock_path)
    env["LLMTOP_RECORD"] = str(sock_path.parent / "demo.llmtop")
    attached = run_demo([LLMTOP, "attach", "--headless"], tok_dir, env)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert attached.returncode == 0, attached.stderr[-2000:]
    # Same lines, same losses to the last printed digit: the agent must not change results.
    assert comparable(attached.stdout) == comparable(plain.stdout)

    # And the agent really watched the run: the model and every training step, with the losses
    # the script printed.
    with RecordingReader(env["LLMTOP_RECORD"]) as rec:
        events = list(rec.events())
    assert any(isinstance(e, ModelTree) and e.name == "GPT2LMHeadModel" for e in events)
    steps = [e for e in events if isinstance(e, Step) and e.mode == "train"]
    printed = [float(m.group(2)) for m in map(LOSS_LINE.match, plain.stdout.splitlines()) if m]
    assert [round(e.loss, 4) if e.loss is not None else None for e in steps] == printed
