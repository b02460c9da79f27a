"""`llmtop graph`: numbers, names, config directories, factories, --all and errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from llmtop.cli import main  # noqa: E402

from .conftest import LLMTOP, child_env  # noqa: E402


def graph_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["graph", *argv, "--format", "json", "--device", "h100"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_gpt2_json_numbers_through_the_real_cli() -> None:
    proc = subprocess.run([LLMTOP, "graph", "gpt2", "--format", "json", "--device", "h100", "--attn", "eager"],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["class"] == "GPT2LMHeadModel"
    assert r["params"] == 124_439_808
    assert r["flops"] == pytest.approx(32.23e9, rel=0.01)
    assert r["macs"] == pytest.approx(r["flops"] / 2)
    assert r["memory"]["weights"] == pytest.approx(4 * 124_439_808, rel=0.01)
    assert r["memory"]["peak"] >= r["memory"]["weights"] + r["memory"]["activations_peak"]
    assert r["device"]["key"] == "h100-sxm"
    head = next(x for x in r["layers"] if x["path"] == "lm_head")
    assert head["flops"] == pytest.approx(9.88e9, rel=0.01)
    assert {x["bound"] for x in r["ops"]} <= {"compute", "memory"}
    assert r["summary"]["compute"]["time_share"] + r["summary"]["memory"]["time_share"] == pytest.approx(1)
    assert 0 < r["coverage"] <= 1


def test_short_and_hub_names_agree(capsys) -> None:
    short = graph_json(capsys, "gpt-neo-125m")
    hub = graph_json(capsys, "EleutherAI/gpt-neo-125m")
    assert short["model"] == hub["model"] == "EleutherAI/gpt-neo-125m"
    assert short["flops"] == hub["flops"] > 1e10
    assert graph_json(capsys, "llama-2-7b", "--seq-len", "16")["params"] == 6_738_415_616


def test_encoder_decoder_and_table_format(capsys) -> None:
    r = graph_json(capsys, "facebook/bart-base", "--seq-len", "64", "--dec-len", "16")
    assert "decoder 16" in r["inputs"]
    assert any(x["path"].startswith("model.decoder") and x["flops"] > 0 for x in r["layers"])
    assert main(["graph", "t5-small", "--device", "a100", "--tree"]) == 0
    out = capsys.readouterr().out
    assert "T5ForConditionalGeneration" in out and "bottleneck" in out and "lm_head" in out


def test_local_directory_with_config_json(tmp_path: Path, capsys) -> None:
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 64,
           "n_head": 4, "vocab_size": 1000, "n_positions": 256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = graph_json(capsys, str(tmp_path), "--seq-len", "32", "--attn", "eager")
    assert r["class"] == "GPT2LMHeadModel"
    per_layer = 2 * 32 * (64 * 192 + 64 * 64 + 2 * 64 * 256) + 2 * 2 * 32 * 32 * 64
    assert r["flops"] == pytest.approx(2 * per_layer + 2 * 32 * 64 * 1000, rel=0.01)


def test_module_factory(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "lt_factory_mod.py").write_text(textwrap.dedent("""
        import torch

        def make():
            return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = graph_json(capsys, "lt_factory_mod:make", "--batch", "2", "--seq-len", "4")
    assert r["params"] == 32 * 64 + 64 + 64 * 8 + 8
    assert r["flops"] == 2 * 8 * (32 * 64 + 64 * 8)


def test_bad_name_is_a_one_line_error(capsys) -> None:
    assert main(["graph", "no-such-model-xyz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmtop graph: unknown model") and "\n" not in err
    assert main(["graph", "gpt2", "--device", "voodoo"]) == 2
    assert "unknown device" in capsys.readouterr().err


@pytest.mark.slow
def test_all_lists_every_family() -> None:
    proc = subprocess.run([sys.executable, "-m", "llmtop.cli", "graph", "--all", "--device", "h100",
                           "--seq-len", "32", "--format", "json"],
                          capture_output=True, text=True, env=child_env(), timeout=300)
    r = json.loads(proc.stdout)
    names = {x["model"] for x in r["results"]}
    assert {"bert-base-uncased", "t5-small", "meta-llama/Llama-2-7b-hf", "microsoft/resnet-50"} <= names
    assert len(names) == 22
    failed = [x for x in r["results"] if not x["ok"]]
    assert failed == [] and proc.returncode == 0, failed


def test_csv_rows_and_a_conv_factory_with_guessed_input(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "lt_conv_mod.py").write_text(textwrap.dedent("""
        import torch

        def make():
            return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())

        def with_inputs():
            return torch.nn.Linear(10, 4), (torch.zeros(5, 10),)
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["graph", "lt_conv_mod:make", "--image-size", "16", "--format", "csv", "--device", "a10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("kind,name,class,shapes,calls,params,flops")
    conv = next(line.split(",") for line in lines if line.startswith("layer,0,Conv2d"))
    assert float(conv[6]) == 2 * 16 * 16 * 8 * 3 * 3 * 3  # output positions x weight elements
    r = graph_json(capsys, "lt_conv_mod:with_inputs")
    assert r["flops"] == 2 * 5 * 10 * 4 and r["inputs"] == "example inputs"


def test_header_estimate_is_the_root_rows_and_the_sum_of_the_op_rows(tmp_path: Path, monkeypatch,
                                                                       capsys) -> None:
    """A ridge (22 FLOP/B, this machine's measured CPU) where the matmuls are compute-bound and the
    elementwise ops memory-bound: a module's time must be the sum of its op calls' times, not the
    time of its summed FLOPs and bytes (which hid the memory-bound ops: 408.8 ms vs 391.4 for gpt2)."""
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 128,
           "n_head": 4, "vocab_size": 2000, "n_positions": 256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("LLMTOP_PEAK_FLOPS", "1e11")
    monkeypatch.setenv("LLMTOP_PEAK_BW", "4.5e9")
    capsys.readouterr()
    assert main(["graph", str(tmp_path), "--seq-len", "128", "--format", "json", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {o["bound"] for o in r["ops"] if o["flops"] or o["bytes"]} == {"compute", "memory"}
    root = next(x for x in r["layers"] if x["path"] == "(root)")
    assert r["est_s"] > 0
    assert root["est_s"] == pytest.approx(r["est_s"], rel=1e-9)
    assert sum(o["est_s"] for o in r["ops"]) == pytest.approx(r["est_s"], rel=1e-9)
    # a block's figure is its children's plus the ops it runs itself, never less than theirs
    by_path = {x["path"]: x for x in r["layers"]}
    block = by_path["transformer.h.0"]
    kids = [x for p, x in by_path.items() if p.startswith("transformer.h.0.") and p.count(".") == 3]
    assert kids and block["est_s"] >= sum(k["est_s"] for k in kids) * (1 - 1e-9)
    # the table shows the same figure twice
    assert main(["graph", str(tmp_path), "--seq-len", "128", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("roofline"))
    root_row = next(line for line in out.splitlines() if line.startswith("(root)"))
    assert header.split("est. ")[1].split(" ms")[0] == root_row.split()[-1]


def test_ridge_text_says_small_ridges_as_they_are() -> None:
    from llmtop.agent.flops.graph import ridge_text

    assert [ridge_text(x) for x in (0.331, 0.0049, 7.24, 22.3, 295.3, 0.0)] == ["0.33", "0.0049", "7.2", "22",
                                                                               "295", "—"]


def test_peak_doubts_of_measured_cpu_peaks_only() -> None:
    from llmtop.agent.flops.graph import peak_doubts
    from llmtop.agent.flops.roofline import DEVICES, Device

    def cpu(flops: float, bw: float, source: str = "measured") -> Device:
        return Device("cpu", "cpu", {"fp32": flops}, bw, measured=source == "measured", source=source,
                      bw_source=source)

    # the figures of two runs on this loaded machine: FLOP/s under the bandwidth's order
    (why,) = peak_doubts(cpu(20.4e9, 61.6e9), None)
    assert "below the bandwidth's order" in why and "20.40 GFLOP/s" in why
    assert peak_doubts(cpu(97.8e9, 4.49e9), cpu(97.0e9, 4.6e9)) == []  # steady, ridge 22: nothing to say
    (why,) = peak_doubts(cpu(97.8e9, 4.49e9), cpu(30.1e9, 25.0e9))  # swinging between two measurements
    assert "30.10 GFLOP/s and 25.00 GB/s" in why
    assert peak_doubts(cpu(20.4e9, 61.6e9, "env"), None) == []  # the user's own figures are not doubted
    assert peak_doubts(DEVICES["h100-sxm"], None) == []


def test_doubtful_measured_peaks_are_said_and_give_no_verdicts(tmp_path: Path, monkeypatch, capsys) -> None:
    """The CPU peaks cached from a measurement on a busy machine (20.4 GFLOP/s, 61.6 GB/s: a ridge of
    0.33 FLOP/B, printed "ridge 0" before): the header says so, and no op or layer gets a verdict."""
    from llmtop.agent.flops import roofline

    cache = tmp_path / "cache"
    (cache / "llmtop").mkdir(parents=True)
    (cache / "llmtop" / "cpu_peaks.json").write_text(json.dumps(
        {"key": roofline._cpu_key(), "name": "cpu", "flops": {"fp32": 20.4e9, "bf16": 20.4e9, "fp16": 20.4e9},
         "bandwidth": 61.6e9, "source": "measured"}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("LLMTOP_PEAK_FLOPS", raising=False)
    monkeypatch.delenv("LLMTOP_PEAK_BW", raising=False)
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1, "n_embd": 64,
           "n_head": 4, "vocab_size": 500, "n_positions": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["graph", str(tmp_path), "--seq-len", "32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "61.60 GB/s (measured), ridge 0.33 FLOP/B" in out
    assert "peaks        doubtful: 20.40 GFLOP/s is below the bandwidth's order (61.60 GB/s)" in out
    assert "bottleneck   — (the measured peaks are doubtful)" in out
    assert "per forward on the doubtful peaks" in out
    rows = [line for line in out.splitlines() if line.startswith(("aten::", "(root)", "transformer"))]
    assert rows and not [line for line in rows if " compute " in line or " memory " in line]
    assert main(["graph", str(tmp_path), "--seq-len", "32", "--device", "cpu", "--format", "json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["device"]["doubts"] and r["summary"] is None
    assert {o["bound"] for o in r["ops"]} == {None} and {x["bound"] for x in r["layers"]} == {None}
