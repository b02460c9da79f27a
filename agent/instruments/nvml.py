"""NVML sampler: one ``DeviceSample`` per GPU, taken by the agent thread each tick.

pynvml is imported only when the sampler starts. A field the driver cannot give (not supported,
no permission, GPU lost, driver unloaded) is None in the sample, never zero and never an error.
If NVML cannot start at all (a CPU-only machine, no driver) the sampler is simply disabled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from llmtop.protocol.events import DeviceSample


def _decode(name: Any) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


class NvmlSampler:
    def __init__(self) -> None:
        self.enabled = False
        self.names: list[str] = []
        self._nvml: Any = None
        self._handles: list[Any] = []
        # (device index, field) pairs that failed with a permanent error: not asked again.
        self._unsupported: set[tuple[int, str]] = set()
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no library, no driver, no GPU: stay disabled, silently
            return
        self._nvml = pynvml
        try:
            count = pynvml.nvmlDeviceGetCount()
            for i in range(count):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                self._handles.append(handle)
                try:
                    self.names.append(_decode(pynvml.nvmlDeviceGetName(handle)))
                except pynvml.NVMLError:
                    self.names.append(f"GPU {i}")
        except Exception:
            self.close()
            return
        self.enabled = bool(self._handles)

    def _permanent(self, exc: Exception) -> bool:
        nv = self._nvml
        return isinstance(exc, (nv.NVMLError_NotSupported, nv.NVMLError_NoPermission,
                                nv.NVMLError_FunctionNotFound))

    def _field(self, index: int, name: str, read: Callable[[], Any]) -> Any:
        if (index, name) in self._unsupported:
            return None
        try:
            return read()
        except self._nvml.NVMLError as exc:
            if self._permanent(exc):
                self._unsupported.add((index, name))
            return None
        except Exception:  # a binding bug must not stop the other fields
            return None

    def sample(self, now: float | None = None) -> list[DeviceSample]:
        if not self.enabled:
            return []
        nv = self._nvml
        t = time.time() if now is None else now
        out: list[DeviceSample] = []
        for i, h in enumerate(self._handles):
            util = self._field(i, "util", lambda h=h: float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
            mem = self._field(i, "mem", lambda h=h: nv.nvmlDeviceGetMemoryInfo(h))
            power = self._field(i, "power", lambda h=h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0)
            temp = self._field(
                i, "temp", lambda h=h: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))
            sm = self._field(i, "sm_clock", lambda h=h: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)))
            memclk = self._field(
                i, "mem_clock", lambda h=h: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)))
            out.append(DeviceSample(
                t=t, index=i, name=self.names[i], util_pct=util,
                mem_used=int(mem.used) if mem is not None else None,
                mem_total=int(mem.total) if mem is not None else None,
                power_w=power, temp_c=temp, sm_clock_mhz=sm, mem_clock_mhz=memclk,
            ))
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self.enabled = False
        self._handles = []
