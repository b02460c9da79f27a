"""Device table, verdict function and the cached CPU calibration."""

from __future__ import annotations

import json

import pytest
from llmtop.agent.flops import roofline as R
from llmtop.protocol.formulas import bound


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H100 NVL", "h100-nvl"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100 80GB PCIe", "a100-80gb-pcie"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA A10", "a10"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("h100", "h100-sxm"),
        ("a100", "a100-80gb"),
        ("H200", "h200"),
    ],
)
def test_lookup_by_device_name(name: str, key: str) -> None:
    dev = R.lookup(name)
    assert dev is not None and dev.key == key


def test_unknown_device_is_none_and_a_clear_error() -> None:
    assert R.lookup("Voodoo 3 3000") is None
    with pytest.raises(ValueError, match="unknown device"):
        R.device_for("voodoo")


def test_reference_ridge_points() -> None:
    # DESIGN.md §8: A100-80GB 312 TFLOP/s / 2.04 TB/s (≈153), H100 SXM 989 / 3.35 (≈295), H200 (≈206)
    assert R.lookup("a100").ridge("bfloat16") == pytest.approx(153, rel=0.01)
    assert R.lookup("h100").ridge("torch.bfloat16") == pytest.approx(295, rel=0.01)
    assert R.lookup("h200").ridge("bf16") == pytest.approx(206, rel=0.01)
    h100 = R.lookup("h100")
    assert h100.peak("float32") < h100.peak("tf32") < h100.peak("bf16") < h100.peak("fp8")
    assert h100.peak("float8_e4m3fn") == h100.peak("fp8")


def test_bound_verdicts() -> None:
    pf, bw = 100e12, 1e12  # ridge 100 FLOP/B
    assert bound(1e12, 1e9, None, pf, bw) == "compute"  # 1000 FLOP/B
    assert bound(1e9, 1e9, None, pf, bw) == "memory"  # 1 FLOP/B
    roof = 1e12 / pf  # 10 ms
    assert bound(1e12, 1e9, 1.5 * roof, pf, bw) == "compute"  # near its roof
    assert bound(1e12, 1e9, 50 * roof, pf, bw) == "overhead"  # far above both roofs
    assert bound(1e9, 1e9, 2 * (1e9 / bw), pf, bw) == "memory"
    assert bound(0, 0, 1e-3, pf, bw) == "overhead"  # time with no work at all


def test_cpu_calibration_is_measured_once_and_cached(tmp_path, monkeypatch) -> None:
    pytest.importorskip("torch")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LLMTOP_PEAK_FLOPS", raising=False)
    monkeypatch.delenv("LLMTOP_PEAK_BW", raising=False)
    calls = []
    real = R.measure_cpu

    def counting(budget_s: float = 0.2) -> R.Device:
        calls.append(1)
        return real(0.2)

    monkeypatch.setattr(R, "measure_cpu", counting)
    first = R.device_for("cpu")
    assert first.measured and first.peak("float32") > 1e8 and first.bandwidth > 1e8
    cached = json.loads((tmp_path / "llmtop" / "cpu_peaks.json").read_text())
    assert cached["flops"]["fp32"] == first.peak("float32")
    second = R.device_for(None)
    assert len(calls) == 1
    assert second.flops == first.flops and second.bandwidth == first.bandwidth


def test_env_overrides(monkeypatch) -> None:
    monkeypatch.setenv("LLMTOP_PEAK_FLOPS", "5e12")
    monkeypatch.setenv("LLMTOP_PEAK_BW", "2e11")
    dev = R.device_for("h100")
    assert dev.peak("bf16") == 5e12 and dev.peak("float32") == 5e12
    assert dev.bandwidth == 2e11
