"""Device peaks (dense FLOP/s per dtype, memory bandwidth) and the roofline verdict.

GPU figures are the vendors' dense datasheet numbers (the "with sparsity" figures are twice these).
On a CPU the peaks are measured by a micro-benchmark (< 1 s) once and cached in
``~/.cache/llmtop/cpu_peaks.json``. ``LLMTOP_PEAK_FLOPS`` / ``LLMTOP_PEAK_BW`` override any device.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

T = 1e12


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    flops: dict[str, float] = field(default_factory=dict)  # dtype -> dense peak FLOP/s
    bandwidth: float = 0.0  # bytes/s
    measured: bool = False  # CPU: calibrated here, not from a datasheet

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype`` (float32 means plain FP32, not TF32)."""
        d = normalize_dtype(dtype)
        if d in self.flops:
            return self.flops[d]
        return self.flops.get("fp32", 0.0)

    def ridge(self, dtype: str) -> float:
        """Arithmetic intensity (FLOP/byte) where the roofline turns from memory- to compute-bound."""
        return self.peak(dtype) / self.bandwidth if self.bandwidth else 0.0


def _gpu(key: str, name: str, bw_tb: float, **flops_t: float) -> Device:
    return Device(key, name, {k: v * T for k, v in flops_t.items()}, bw_tb * T)


# Dense peaks, TFLOP/s (tensor cores with FP32 accumulate where it matters) and TB/s.
DEVICES: dict[str, Device] = {d.key: d for d in (
    _gpu("a100-40gb", "NVIDIA A100 40GB", 1.555, fp32=19.5, tf32=156, bf16=312, fp16=312),
    _gpu("a100-80gb", "NVIDIA A100 80GB SXM", 2.039, fp32=19.5, tf32=156, bf16=312, fp16=312),
    _gpu("a100-80gb-pcie", "NVIDIA A100 80GB PCIe", 1.935, fp32=19.5, tf32=156, bf16=312, fp16=312),
    _gpu("h100-sxm", "NVIDIA H100 SXM", 3.35, fp32=67, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9),
    _gpu("h100-pcie", "NVIDIA H100 PCIe", 2.0, fp32=51, tf32=378, bf16=756, fp16=756, fp8=1513),
    _gpu("h100-nvl", "NVIDIA H100 NVL", 3.9, fp32=60, tf32=417.5, bf16=835.5, fp16=835.5, fp8=1670.5),
    _gpu("h200", "NVIDIA H200", 4.8, fp32=67, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9),
    _gpu("l4", "NVIDIA L4", 0.3, fp32=30.3, tf32=60, bf16=121, fp16=121, fp8=242),
    _gpu("l40s", "NVIDIA L40S", 0.864, fp32=91.6, tf32=183, bf16=362, fp16=362, fp8=733),
    _gpu("a10", "NVIDIA A10", 0.6, fp32=31.2, tf32=62.5, bf16=125, fp16=125),
    _gpu("rtx4090", "NVIDIA GeForce RTX 4090", 1.008, fp32=82.6, tf32=82.6, bf16=165.2, fp16=165.2,
         fp8=330.3),
    _gpu("v100", "NVIDIA V100", 0.9, fp32=15.7, fp16=125),
    _gpu("t4", "NVIDIA T4", 0.32, fp32=8.1, fp16=65),
)}

# Short names accepted by `--device`.
ALIASES = {"a100": "a100-80gb", "a100-40": "a100-40gb", "a100-80": "a100-80gb", "h100": "h100-sxm",
           "4090": "rtx4090", "rtx-4090": "rtx4090"}

# Patterns on torch.cuda.get_device_name(), most specific first.
_NAME_RULES: list[tuple[str, str]] = [
    (r"h200", "h200"),
    (r"h100.*nvl", "h100-nvl"),
    (r"h100.*pcie", "h100-pcie"),
    (r"h100", "h100-sxm"),
    (r"a100.*80\s*gb.*pcie|a100.*pcie.*80\s*gb", "a100-80gb-pcie"),
    (r"a100.*80\s*gb", "a100-80gb"),
    (r"a100", "a100-40gb"),
    (r"l40s", "l40s"),
    (r"\bl4\b", "l4"),
    (r"\ba10\b", "a10"),
    (r"4090", "rtx4090"),
    (r"v100", "v100"),
    (r"\bt4\b", "t4"),
]

_DTYPES = {"float32": "fp32", "float": "fp32", "fp32": "fp32", "tf32": "tf32", "bfloat16": "bf16",
           "bf16": "bf16", "float16": "fp16", "half": "fp16", "fp16": "fp16", "float8": "fp8", "fp8": "fp8"}


def normalize_dtype(dtype: object) -> str:
    s = str(dtype).replace("torch.", "").lower()
    if s.startswith("float8"):
        return "fp8"
    return _DTYPES.get(s, s)


def lookup(name: str) -> Device | None:
    """A device from a `--device` key (h100, a100-40gb …) or a CUDA device name."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in DEVICES:
        return DEVICES[key]
    for pattern, k in _NAME_RULES:
        if re.search(pattern, key):
            return DEVICES[k]
    return None


def names() -> list[str]:
    return sorted(set(DEVICES) | set(ALIASES))


# --- CPU calibration -----------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmtop"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _cpu_key() -> str:
    import torch

    return f"{cpu_name()}|{os.cpu_count()}|threads={torch.get_num_threads()}"


def _time_loop(fn, budget_s: float) -> tuple[int, float]:
    fn()  # warm up
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= budget_s:
            return n, dt


def measure_cpu(budget_s: float = 0.6) -> Device:
    """Matmul FLOP/s (fp32, bf16) and copy bandwidth, about ``budget_s`` seconds in all."""
    import torch

    flops: dict[str, float] = {}
    for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a = torch.randn(512, 512).to(dtype)
        n, dt = _time_loop(lambda a=a: torch.mm(a, a), budget_s / 4)
        flops[key] = 2 * 512**3 * n / dt
    flops["fp16"] = flops["bf16"]
    src = torch.empty(16 * 2**20, dtype=torch.uint8)  # 16 MiB: beyond most L2 caches
    dst = torch.empty_like(src)
    n, dt = _time_loop(lambda: dst.copy_(src), budget_s / 2)
    bw = 2 * src.numel() * n / dt  # read + write
    return Device("cpu", cpu_name(), flops, bw, measured=True)


def cpu_device(refresh: bool = False) -> Device:
    """The calibrated CPU, cached per processor and thread count."""
    path = cache_dir() / "cpu_peaks.json"
    key = _cpu_key()
    if not refresh:
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                return Device("cpu", data["name"], data["flops"], data["bandwidth"], measured=True)
        except (OSError, ValueError, KeyError):
            pass
    dev = measure_cpu()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "name": dev.name, "flops": dev.flops,
                                   "bandwidth": dev.bandwidth, "measured_at": time.time()}))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home still gets the measured figures, just not cached
    return dev


def with_overrides(dev: Device) -> Device:
    """Apply LLMTOP_PEAK_FLOPS (FLOP/s, every dtype) and LLMTOP_PEAK_BW (bytes/s)."""
    pf, bw = os.environ.get("LLMTOP_PEAK_FLOPS"), os.environ.get("LLMTOP_PEAK_BW")
    if not pf and not bw:
        return dev
    flops = dict(dev.flops)
    if pf:
        value = float(pf)
        flops = {k: value for k in (flops or {"fp32": 0})}
        for k in ("fp32", "tf32", "bf16", "fp16"):
            flops.setdefault(k, value)
    return Device(dev.key, dev.name, flops, float(bw) if bw else dev.bandwidth, dev.measured)


def device_for(name: str | None) -> Device:
    """``name``: a `--device` key, a CUDA device name, "cpu" or None (the CPU). Unknown → ValueError."""
    if name is None or name.strip().lower() in ("", "cpu"):
        return with_overrides(cpu_device())
    dev = lookup(name)
    if dev is None:
        raise ValueError(f"unknown device {name!r} (known: {', '.join(names())}, cpu)")
    return with_overrides(dev)


# The verdict (compute / memory / overhead) is `llmtop.protocol.formulas.bound`: the viewer draws
# the same one.
