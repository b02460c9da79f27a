"""`llmtop diff`: a planted 20 % slowdown in one layer fails the gate; runs from the same distribution pass."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from llmtop.protocol.events import PHASES, LayerStats, ModelTree, Session, Step, encode
from llmtop.protocol.recording import RecordingWriter

from llmtop.cli import main
from tests.conftest import LLMTOP, child_env

BLOCKS = 4
LEAVES = ("attn", "mlp", "norm")
SLOW = "blocks.2.mlp"


def tree() -> ModelTree:
    paths = ["", "blocks"]
    for b in range(BLOCKS):
        paths += [f"blocks.{b}"] + [f"blocks.{b}.{leaf}" for leaf in LEAVES]
    index = {p: i for i, p in enumerate(paths)}
    parents = [-1] + [index[p.rsplit(".", 1)[0]] if "." in p else 0 for p in paths[1:]]
    return ModelTree(model=0, name="Net", ids=list(range(len(paths))), paths=paths,
                     classes=[p.rsplit(".", 1)[-1] or "Net" for p in paths], params=[0] * len(paths),
                     parents=parents)


def write_run(path: Path, *, seed: int, slow_pct: float = 0.0, steps: int = 120) -> None:
    """A run whose leaf times are drawn around fixed means with ±5 % noise (whole nanoseconds, as the
    agent measures); ``slow_pct`` makes ``SLOW`` that much slower, forward and backward."""
    rng = random.Random(seed)
    t = tree()
    base = random.Random(0)
    mean_ns = {i: base.randint(200_000, 900_000) for i, p in enumerate(t.paths) if p.count(".") == 2}
    session = Session(pid=1, argv=["train.py"], started=1000.0)
    w = RecordingWriter(str(path), session)
    w.append(encode(t), t)
    for n in range(steps):
        fwd = [0] * len(t.ids)
        bwd = [0] * len(t.ids)
        for i, m in mean_ns.items():
            factor = 1 + slow_pct / 100 if t.paths[i] == SLOW else 1.0
            fwd[i] = int(m * factor * rng.uniform(0.95, 1.05))
            bwd[i] = int(2 * m * factor * rng.uniform(0.95, 1.05))
        for i in reversed(range(len(t.ids))):  # parents: their children plus a little of their own
            kids = [k for k, p in enumerate(t.parents) if p == i]
            if kids:
                fwd[i] = sum(fwd[k] for k in kids) + 2_000
                bwd[i] = sum(bwd[k] for k in kids) + 2_000
        self_f = [fwd[i] - sum(fwd[k] for k, p in enumerate(t.parents) if p == i) for i in t.ids]
        self_b = [bwd[i] - sum(bwd[k] for k, p in enumerate(t.parents) if p == i) for i in t.ids]
        layers = LayerStats(step=n, ids=t.ids, fwd_ms=[x / 1e6 for x in fwd], fwd_self_ms=[x / 1e6 for x in self_f],
                            calls=[1] * len(t.ids), bwd_ms=[x / 1e6 for x in bwd],
                            bwd_self_ms=[x / 1e6 for x in self_b])
        phases = {p: 0.5 for p in PHASES}
        phases["forward"] = fwd[0] / 1e6
        phases["backward"] = bwd[0] / 1e6
        step = Step(step=n, t=1001.0 + n * 0.05, dur_ms=sum(phases.values()), phases=phases, loss=1.0)
        for e in (layers, step):
            w.append(encode(e), e)
    w.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("diff")
    paths = {"a": d / "a.lrec", "a2": d / "a2.lrec", "slow": d / "slow.lrec"}
    write_run(paths["a"], seed=1)
    write_run(paths["a2"], seed=2)  # the same code run again: only the noise differs
    write_run(paths["slow"], seed=3, slow_pct=20.0)
    return paths


def test_identical_runs_pass(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", str(runs["a"]), str(runs["a"]), "--fail-if-slower", "5"]) == 0
    assert "OK" in capsys.readouterr().out


def test_reruns_with_only_noise_pass(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", str(runs["a"]), str(runs["a2"]), "--fail-if-slower", "5"]) == 0
    assert main(["diff", str(runs["a2"]), str(runs["a"]), "--fail-if-slower", "5"]) == 0


def test_planted_slowdown_in_one_layer_fails(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", str(runs["a"]), str(runs["slow"]), "--fail-if-slower", "10", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    flagged = {(d["what"], d["name"]) for d in report["regressions"]}
    assert ("fwd", SLOW) in flagged and ("bwd", SLOW) in flagged
    # Only the planted module and its ancestors (whose time includes it) are flagged.
    assert {name for _, name in flagged} <= {SLOW, "blocks.2", "blocks", "Net"}
    mlp = next(d for d in report["layers"] if d["what"] == "fwd" and d["name"] == SLOW)
    assert mlp["pct"] == pytest.approx(20.0, abs=3.0)
    # Without the gate the same comparison only reports.
    assert main(["diff", str(runs["a"]), str(runs["slow"])]) == 0
    text = capsys.readouterr().out
    assert SLOW in text and "layers slower in B" in text
    # The other way round is faster, not slower.
    assert main(["diff", str(runs["slow"]), str(runs["a"]), "--fail-if-slower", "10"]) == 0


def test_exit_codes_from_the_real_command(runs: dict[str, Path], tmp_path: Path) -> None:
    slow = subprocess.run([LLMTOP, "diff", str(runs["a"]), str(runs["slow"]), "--fail-if-slower", "10"],
                          capture_output=True, text=True, env=child_env(), timeout=60)
    assert slow.returncode == 1 and "FAIL" in slow.stdout and SLOW in slow.stdout
    bad = tmp_path / "bad.lrec"
    bad.write_bytes(b"")
    broken = subprocess.run([LLMTOP, "diff", str(runs["a"]), str(bad)], capture_output=True, text=True,
                            env=child_env(), timeout=60)
    assert broken.returncode == 2 and broken.stderr.count("\n") == 1 and "empty" in broken.stderr


def test_long_runs_are_summarized_from_a_spread_of_layer_tables(
        runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Hour-long runs read the layer tables of at most LAYER_STEPS steps: the gate still works."""
    from llmtop.tui.commands import summarize

    monkeypatch.setattr(summarize, "LAYER_STEPS", 30)  # 120 steps: every 4th table
    summary = summarize.open_summary(str(runs["a"]))
    mlp = summary.layer_by_path()[SLOW]
    assert mlp.fwd.n == 30  # steps 0, 4, ..., 116
    assert summary.step_ms.n == 120  # step records are all read
    assert main(["diff", str(runs["a"]), str(runs["slow"]), "--fail-if-slower", "10"]) == 1
    assert main(["diff", str(runs["a"]), str(runs["a2"]), "--fail-if-slower", "10"]) == 0
