"""`llmtop report`: real recorded runs of the examples (training, generate, pipeline) and of a crashing
script, summarized as text and as JSON that validates against docs/report.schema.json."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from llmtop.protocol.events import Generation, LayerFlops, ModelTree, Span, Step
from llmtop.protocol.recording import RecordingReader

from tests.conftest import LLMTOP, ROOT, child_env
from tests.test_recording import SESSION, TREE, run_events, write

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extras (pip install -e .[dev])")

SCHEMA = json.loads((ROOT / "docs" / "report.schema.json").read_text())

CRASH = """\
import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(6):
    loss = model(torch.randn(8, 16)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step == 4:
        raise ValueError(f"boom at step {step}")
"""

RUNS = {
    "train": ["examples/train_tiny_gpt.py", "--steps", "12", "--no-progress", "--generate", "6",
              "--n-layer", "2", "--n-embd", "64", "--n-head", "2", "--seq-len", "64"],
    "generate": ["examples/generate_tiny_gpt.py", "--rounds", "1", "--max-new-tokens", "6", "--n-layer", "2"],
    "pipeline": ["examples/pipeline_classify.py", "--texts", "16", "--batch-size", "4"],
    "crash": ["crash.py"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each example recorded once, as a user would: `llmtop attach --headless --record`."""
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "crash.py").write_text(CRASH)
    out = {}
    for name, argv in RUNS.items():
        rec = tmp / f"{name}.lrec"
        script = [str(tmp / argv[0]) if name == "crash" else str(ROOT / argv[0]), *argv[1:]]
        done = subprocess.run([LLMTOP, "attach", "--headless", "--record", str(rec), *script], cwd=tmp,
                              capture_output=True, text=True, timeout=240,
                              # ticks often: these runs last seconds, and the FLOPs a report shows
                              # are counted on the agent's ticks
                              env=child_env(LLMTOP_SOCKET=str(tmp / f"{name}.sock"), LLMTOP_TICK="0.1"))
        assert done.returncode == (1 if name == "crash" else 0), done.stderr[-2000:]
        out[name] = rec
    return out


def report(path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LLMTOP, "report", str(path), *args], capture_output=True, text=True, timeout=120,
                          env=child_env(**env))


def report_json(path: Path) -> dict:
    done = report(path, "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    jsonschema.validate(data, SCHEMA, cls=jsonschema.Draft202012Validator)
    return data


def events(path: Path, kind: type) -> list:
    with RecordingReader(path) as reader:
        return [e for e in reader.events() if isinstance(e, kind)]


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["properties"]["schema_version"] == {"const": 2}


def test_training_run(runs: dict[str, Path]) -> None:
    rec = runs["train"]
    data = report_json(rec)
    steps = [e for e in events(rec, Step) if e.mode == "train"]
    assert data["steps"]["mode"] == "train" and data["steps"]["count"] == len(steps) == 12
    durations = sorted(s.dur_ms for s in steps)
    assert durations[0] <= data["steps"]["step_p50_ms"] <= data["steps"]["step_max_ms"] == durations[-1]
    assert {p["name"] for p in data["phases"]} >= {"forward", "backward", "optimizer"}
    assert sum(p["share_pct"] for p in data["phases"]) == pytest.approx(100.0)
    losses = [s.loss for s in steps if s.loss is not None]
    assert data["loss"]["first"] == losses[0] and data["loss"]["last"] == losses[-1]
    assert data["loss"]["min"] == min(losses)
    assert data["tokens"]["step_tokens"] == sum(s.tokens or 0 for s in steps)
    # FLOPs: the root's forward FLOPs per call, three times over with its backward
    flops = events(rec, LayerFlops)
    assert flops, "the agent counts FLOPs of the training model"
    (tree,) = events(rec, ModelTree)[:1]
    root = tree.ids[tree.parents.index(-1)]
    first = flops[0]  # the training batch's signature (the generate at the end has its own)
    per_call = first.flops[first.ids.index(root)]
    assert data["steps"]["step_flops"] == pytest.approx(3 * per_call)
    achieved = data["steps"]["step_flops"] / (data["steps"]["step_p50_ms"] / 1000)
    if data["steps"]["mfu_pct"] is None:
        assert data["missing"]["mfu_pct"]  # "—" always comes with its reason
    else:
        assert 0 < data["steps"]["mfu_pct"] <= 100
        assert data["steps"]["achieved_flop_per_s"] == pytest.approx(achieved)
        assert data["steps"]["mfu_pct"] == pytest.approx(100 * achieved / data["steps"]["peak_flop_per_s"])
    assert data["top_layers"] and data["agent"]["overhead_per_step_p50_us"] > 0
    assert data["spans"]["loading"] and any(sp["name"] == "train" for sp in data["spans"]["by_name"])
    text = report(rec).stdout
    for section in ("steps (train, 12)", "FLOPs/step", "MFU", "phases:", "loss ", "tokens ",
                    "top layers", "memory ", "spans", "agent "):
        assert section in text, section
    # the sections come in the dashboard's order
    order = [text.index(s) for s in ("steps (train", "loss ", "top layers", "memory ", "\nspans", "\nagent ")]
    assert order == sorted(order)


def test_generate_run(runs: dict[str, Path]) -> None:
    rec = runs["generate"]
    data = report_json(rec)
    gens = events(rec, Generation)
    inf = data["inference"]
    assert inf["requests"] == len(gens) > 0 and inf["sequences"] == sum(max(1, g.batch) for g in gens)
    ttfts = sorted(g.ttft_ms for g in gens)
    assert ttfts[0] <= inf["ttft_p50_ms"] <= inf["ttft_p95_ms"] <= ttfts[-1]
    per_token = [ms for g in gens for ms in g.decode_ms]
    assert min(per_token) <= inf["per_token_p50_ms"] <= inf["per_token_p95_ms"] <= max(per_token)
    assert inf["kv_cache_bytes"] == max(g.kv_bytes for g in gens if g.kv_bytes is not None) > 0
    assert data["tokens"]["prefill_tokens"] == sum(g.prompt_tokens * max(1, g.batch) for g in gens)
    assert data["tokens"]["decode_tokens"] == sum(g.new_tokens * max(1, g.batch) for g in gens)
    # from_pretrained: its time, its parameters and dtype, as the agent's span says
    (load,) = [ld for ld in data["spans"]["loading"] if ld["what"] == "model"]
    span = next(s for s in events(rec, Span) if s.category == "model_loading" and s.attrs.get("what") == "model")
    assert load["load_ms"] == pytest.approx(span.dur_ms) and load["params"] == span.attrs["params"] > 0
    assert load["dtype"] == "float32"
    tok = data["spans"]["tokenization"]
    assert tok["calls"] >= len(gens) and 0 <= tok["padding_share_pct"] < 100
    text = report(rec).stdout
    assert "TTFT p50" in text and "per token p50" in text and "KV cache" in text
    assert "loading      model AutoModelForCausalLM.from_pretrained" in text and "float32" in text


def test_pipeline_run(runs: dict[str, Path]) -> None:
    data = report_json(runs["pipeline"])
    (pipe,) = data["inference"]["pipelines"]
    calls = [s for s in events(runs["pipeline"], Span) if s.name == "pipeline text-classification"]
    assert len(calls) == 5 and pipe["calls"] == 5  # the example classifies 4 texts one by one, then 16 in batches
    assert pipe["name"] == "pipeline text-classification" and pipe["items"] == 4 + 16
    assert pipe["items_per_s"] == pytest.approx(20 / (sum(s.dur_ms for s in calls) / 1000))
    tok = data["spans"]["tokenization"]
    assert tok["texts"] >= 16 and tok["padding_share_pct"] is not None
    assert data["inference"]["requests"] == 0 and data["tokens"]["prefill_tokens"] is None


def test_a_crashed_run_puts_its_traceback_first(runs: dict[str, Path]) -> None:
    data = report_json(runs["crash"])
    assert data["exit"]["crashed"] and data["exit"]["exit_code"] == 1
    assert data["exit"]["traceback_tail"][-1] == "ValueError: boom at step 4"
    lines = report(runs["crash"]).stdout.splitlines()
    assert lines[0].startswith("CRASHED")
    assert lines.index("  ValueError: boom at step 4") < next(i for i, ln in enumerate(lines) if "crash.lrec" in ln)
    assert data["steps"]["count"] == 5  # the steps before the crash are all there


def test_no_impossible_numbers(tmp_path: Path) -> None:
    """A peak below what was achieved would give an MFU over 100 %: the report says "—" and why."""
    flops = LayerFlops(signature="x", ids=[0], flops=[1e12], bytes=[1e6], peak_flops=1e9, peak_bw=1e9, device="toy")
    rec = tmp_path / "run.lrec"
    write(rec, [TREE, flops] + run_events(20)[1:])
    data = report_json(rec)
    assert data["steps"]["step_flops"] is not None and data["steps"]["mfu_pct"] is None
    assert data["steps"]["achieved_flop_per_s"] is None and "above 100 %" in data["missing"]["mfu_pct"]
    text = report(rec).stdout
    assert "MFU —" in text and "above 100 %" in text
    assert "nan" not in text.lower() and "inf " not in text


def test_json_has_no_nan(tmp_path: Path) -> None:
    rec = tmp_path / "nan.lrec"
    evs = run_events(10)
    evs.append(Step(step=10, t=1003.0, dur_ms=5.0, loss=math.nan))
    write(rec, evs)
    data = report_json(rec)
    assert data["loss"]["nonfinite_steps"] == 1 and data["loss"]["last"] is None
    assert data["run"]["argv"] == SESSION.argv


def test_colour_only_on_a_terminal_without_no_color(runs: dict[str, Path]) -> None:
    import os
    import pty

    def on_pty(**env: str) -> str:
        primary, secondary = pty.openpty()
        try:
            subprocess.run([LLMTOP, "report", str(runs["crash"])], stdout=secondary, stderr=secondary,
                           env=child_env(TERM="xterm", **env), timeout=60, check=True)
            os.close(secondary)
            chunks = []
            while True:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode()
        finally:
            os.close(primary)

    assert "\x1b[" in on_pty()
    assert "\x1b[" not in on_pty(NO_COLOR="1")
    assert "\x1b[" not in report(runs["crash"]).stdout  # a pipe: plain


def test_ranks_when_the_run_is_one_of_several(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from tests import test_recording

    monkeypatch.setattr(test_recording, "SESSION",
                        dataclasses.replace(SESSION, options={"rank": 1, "world_size": 4}))
    rec = tmp_path / "rank1.lrec"
    write(rec, run_events(5))
    assert report_json(rec)["ranks"] == {"rank": 1, "world_size": 4, "job": "", "launcher": "", "files": None,
                                         "per_rank": None, "job_tokens_per_s": None, "job_step_p50_ms": None,
                                         "straggler": None, "hangs": [], "died": [], "unrecorded": []}
    assert "  rank 1 of 4" in report(rec).stdout.splitlines()
