"""Device peaks (dense FLOP/s per dtype, memory bandwidth) and the roofline verdict.

GPU figures are the vendors' dense datasheet numbers (the "with sparsity" figures are twice these).
On a CPU the peaks are measured by a micro-benchmark (< 1 s) once and cached in
``~/.cache/llmtop/cpu_peaks.json``: the best of many short timed calls (a busy machine slows some
calls, not all), cross-checked against a bound from the CPU's features (/proc/cpuinfo: SIMD width
x FMA x clock x threads), which stands in when the measurement fails. ``LLMTOP_PEAK_FLOPS`` /
``LLMTOP_PEAK_BW`` override any device and skip the measurement of what they give. Every figure
says where it came from (``Device.source``, ``Device.bw_source``).

The measurement never touches state the script can see: its matrices come from a private
``torch.Generator``, and it changes no global torch setting (it runs at the thread count torch
gives the calling thread).
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

T = 1e12


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    flops: dict[str, float] = field(default_factory=dict)  # dtype -> dense peak FLOP/s
    bandwidth: float = 0.0  # bytes/s
    measured: bool = False  # CPU: calibrated here, not from a datasheet
    source: str = "datasheet"  # where the FLOP/s peaks come from: measured / env / cpu-features / datasheet
    bw_source: str = "datasheet"  # the same for the bandwidth

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype`` (float32 means plain FP32, not TF32)."""
        d = normalize_dtype(dtype)
        if d in self.flops:
            return self.flops[d]
        return self.flops.get("fp32", 0.0)

    def ridge(self, dtype: str) -> float:
        """Arithmetic intensity (FLOP/byte) where the roofline turns from memory- to compute-bound."""
        return self.peak(dtype) / self.bandwidth if self.bandwidth else 0.0

    def sources(self) -> str:
        """One word when both peaks come from the same place, else "flops/bandwidth"."""
        return self.source if self.source == self.bw_source else f"{self.source}/{self.bw_source}"


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


SOURCES = ("measured", "env", "cpu-features", "datasheet")
FLOP_N, BF16_N = 1024, 512  # matrix sizes: fp32 calls of a few ms; bf16 is slower without AMX
COPY_BYTES = 16 * 2**20  # 16 MiB: beyond most L2 caches


def _best_rate(fn: Any, work: float, budget_s: float, min_calls: int = 3) -> float:
    """The best ``work`` per second over single timed calls of ``fn`` for about ``budget_s``.
    Other programs (or the script itself) slow some calls down, rarely all of them: the fastest
    call is the machine's figure, where a mean over the whole budget would be halved."""
    fn()  # warm up (allocations, thread pool)
    best, calls = 0.0, 0
    end = time.perf_counter() + budget_s
    while calls < min_calls or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        calls += 1
        if dt > 0:
            best = max(best, work / dt)
    return best


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_clock_hz() -> float:
    """The highest clock the OS tells of: cpufreq's maximum, the current MHz, the "@ x GHz" of the
    model name (the bound must not be too low: a turbo clock above the nominal one is real)."""
    found: list[float] = []
    try:
        found.append(float(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) * 1e3)
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    found.append(float(line.split(":", 1)[1]) * 1e6)
    except (OSError, ValueError):
        pass
    m = re.search(r"@\s*([\d.]+)\s*GHz", cpu_name())
    if m:
        found.append(float(m.group(1)) * 1e9)
    return max(found, default=0.0)


def fp32_flops_per_cycle(flags: set[str]) -> int:
    """fp32 FLOPs per cycle per core from the SIMD flags: lanes x 2 (FMA) x 2 FMA units, the
    most a core of that kind has (an upper bound: some parts have one AVX-512 unit)."""
    fma = 2 if "fma" in flags else 1
    if "avx512f" in flags:
        return 16 * fma * 2
    if "avx2" in flags or "avx" in flags:
        return 8 * fma * 2
    if "sse2" in flags or "asimd" in flags or "neon" in flags:
        return 4 * fma * 2
    return 0


def cpu_features_peak(threads: int, flags: set[str] | None = None, clock_hz: float | None = None) -> float:
    """An upper bound on fp32 FLOP/s from the CPU's features, or 0.0 where the OS does not say."""
    flags = _cpu_flags() if flags is None else flags
    clock = _cpu_clock_hz() if clock_hz is None else clock_hz
    cores = max(1, min(threads, os.cpu_count() or threads))
    return float(cores * clock * fp32_flops_per_cycle(flags))


def measure_cpu(budget_s: float = 0.6, flops: bool = True, bandwidth: bool = True) -> Device:
    """Matmul FLOP/s (fp32, bf16) and copy bandwidth, about ``budget_s`` seconds in all, best of
    many short calls, on this thread's torch thread count. The matrices come from a private
    generator: the script's random streams are not drawn from."""
    import torch

    peaks: dict[str, float] = {}
    if flops:
        gen = torch.Generator().manual_seed(0)
        a = torch.empty(FLOP_N, FLOP_N).uniform_(-1, 1, generator=gen)
        peaks["fp32"] = _best_rate(lambda: torch.mm(a, a), 2.0 * FLOP_N**3, budget_s * 0.4)
        b = torch.empty(BF16_N, BF16_N).uniform_(-1, 1, generator=gen).to(torch.bfloat16)
        peaks["bf16"] = _best_rate(lambda: torch.mm(b, b), 2.0 * BF16_N**3, budget_s * 0.2)
        peaks["fp16"] = peaks["bf16"]
    bw = 0.0
    if bandwidth:
        src = torch.empty(COPY_BYTES, dtype=torch.uint8)
        dst = torch.empty_like(src)
        bw = _best_rate(lambda: dst.copy_(src), 2.0 * COPY_BYTES, budget_s * 0.4)  # read + write
    return Device("cpu", cpu_name(), peaks, bw, measured=True, source="measured", bw_source="measured")


def cross_check(dev: Device, threads: int, bound: float | None = None) -> Device:
    """The measured CPU against the bound from its features: a measurement that failed (no
    figure) takes the bound. A measurement above the bound is kept: the bound's clock is only
    what the OS says, and a turbo clock beats it."""
    bound = cpu_features_peak(threads) if bound is None else bound
    if dev.flops.get("fp32", 0.0) > 0 or bound <= 0:
        return dev
    flops = {"fp32": bound, "bf16": bound, "fp16": bound}  # no AMX flag read: fp32's bound for all
    return replace(dev, flops=flops, measured=False, source="cpu-features")


def cpu_device(refresh: bool = False) -> Device:
    """The calibrated CPU, cached per processor and thread count (figures the environment gives
    are not measured: see ``device_for``)."""
    import torch

    path = cache_dir() / "cpu_peaks.json"
    key = _cpu_key()
    cached = None if refresh else _cached_cpu()
    if cached is not None:
        return cached
    threads = torch.get_num_threads()
    bound = cpu_features_peak(threads)
    try:
        dev = measure_cpu()
    except Exception:  # no figure: the bound stands in
        dev = Device("cpu", cpu_name(), {}, 0.0, measured=True, source="measured", bw_source="measured")
    dev = cross_check(dev, threads, bound)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "name": dev.name, "flops": dev.flops,
                                   "bandwidth": dev.bandwidth, "source": dev.source,
                                   "features_bound_fp32": bound, "measured_at": time.time()}))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home still gets the measured figures, just not cached
    return dev


def _env_peaks() -> tuple[float | None, float | None]:
    """LLMTOP_PEAK_FLOPS (FLOP/s, every dtype) and LLMTOP_PEAK_BW (bytes/s); a bad value is ignored."""
    out: list[float | None] = []
    for name in ("LLMTOP_PEAK_FLOPS", "LLMTOP_PEAK_BW"):
        raw = os.environ.get(name)
        try:
            value = float(raw) if raw else None
        except ValueError:
            value = None
        out.append(value if value is not None and value > 0 else None)
    return out[0], out[1]


def with_overrides(dev: Device) -> Device:
    """Apply LLMTOP_PEAK_FLOPS (FLOP/s, every dtype) and LLMTOP_PEAK_BW (bytes/s)."""
    pf, bw = _env_peaks()
    if pf is None and bw is None:
        return dev
    flops = dict(dev.flops)
    source, bw_source = dev.source, dev.bw_source
    if pf is not None:
        flops = {k: pf for k in (flops or {"fp32": 0})}
        for k in ("fp32", "tf32", "bf16", "fp16"):
            flops.setdefault(k, pf)
        source = "env"
    if bw is not None:
        bw_source = "env"
    return replace(dev, flops=flops, bandwidth=bw if bw is not None else dev.bandwidth, source=source,
                   bw_source=bw_source)


def _cpu_from_env_or_measured() -> Device:
    """The CPU: what the environment gives is not measured (both given: nothing is measured,
    nothing cached); what it does not give is measured (and cached) or read from the cache."""
    pf, bw = _env_peaks()
    if pf is not None and bw is not None:
        return with_overrides(Device("cpu", cpu_name(), {}, 0.0))
    if pf is not None:  # FLOP/s given: time the copy only (no matmul, no generator)
        cached = _cached_cpu()
        if cached is not None:
            return with_overrides(cached)
        return with_overrides(measure_cpu(flops=False))
    return with_overrides(cpu_device())


def _cached_cpu() -> Device | None:
    try:
        data = json.loads((cache_dir() / "cpu_peaks.json").read_text())
        if data.get("key") == _cpu_key():
            return Device("cpu", data["name"], data["flops"], data["bandwidth"], measured=True,
                          source=data.get("source", "measured"), bw_source="measured")
    except (OSError, ValueError, KeyError):
        pass
    return None


def device_for(name: str | None) -> Device:
    """``name``: a `--device` key, a CUDA device name, "cpu" or None (the CPU). Unknown → ValueError."""
    if name is None or name.strip().lower() in ("", "cpu"):
        return _cpu_from_env_or_measured()
    dev = lookup(name)
    if dev is None:
        raise ValueError(f"unknown device {name!r} (known: {', '.join(names())}, cpu)")
    return with_overrides(dev)


# The verdict (compute / memory / overhead) is `llmtop.protocol.formulas.bound`: the viewer draws
# the same one.
