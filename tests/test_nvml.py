"""NVML sampler error handling, with pynvml's real error classes raised from patched calls (no GPU here)."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest
from llmtop.agent.instruments.nvml import NvmlSampler


def err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # maps to the real subclass, e.g. NVMLError_NotSupported


class FakeDriver:
    """Two GPUs; ``fail[(index, call)] = code`` makes that call raise the real NVML error."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fail: dict[tuple[int, str], int] = {}
        self.calls: dict[str, int] = {}
        self.shutdown = 0

        def call(name, value_fn):
            def fn(handle, *args):
                self.calls[name] = self.calls.get(name, 0) + 1
                code = self.fail.get((handle, name))
                if code is not None:
                    raise err(code)
                return value_fn(handle, *args)
            return fn

        mp = monkeypatch
        mp.setattr(pynvml, "nvmlInit", lambda: None)
        mp.setattr(pynvml, "nvmlShutdown", lambda: setattr(self, "shutdown", self.shutdown + 1))
        mp.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
        mp.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
        mp.setattr(pynvml, "nvmlDeviceGetName", call("name", lambda h: f"Fake GPU {h}".encode()))
        mp.setattr(pynvml, "nvmlDeviceGetUtilizationRates", call("util", lambda h: SimpleNamespace(gpu=40 + h, memory=5)))
        mp.setattr(pynvml, "nvmlDeviceGetMemoryInfo",
                   call("mem", lambda h: SimpleNamespace(used=1000 * (h + 1), total=80_000, free=0)))
        mp.setattr(pynvml, "nvmlDeviceGetPowerUsage", call("power", lambda h: 250_000))
        mp.setattr(pynvml, "nvmlDeviceGetTemperature", call("temp", lambda h, sensor: 61))
        mp.setattr(pynvml, "nvmlDeviceGetClockInfo",
                   call("clock", lambda h, kind: 1980 if kind == pynvml.NVML_CLOCK_SM else 2619))


def test_all_fields_read_and_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeDriver(monkeypatch)
    s = NvmlSampler()
    assert s.enabled and s.names == ["Fake GPU 0", "Fake GPU 1"]
    a, b = s.sample(now=12.5)
    assert (a.index, a.name, a.t) == (0, "Fake GPU 0", 12.5)
    assert (a.util_pct, a.mem_used, a.mem_total, a.power_w, a.temp_c) == (40.0, 1000, 80_000, 250.0, 61.0)
    assert (a.sm_clock_mhz, a.mem_clock_mhz) == (1980.0, 2619.0)
    assert (b.util_pct, b.mem_used) == (41.0, 2000)


def test_not_supported_and_no_permission_become_none_and_are_not_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    drv = FakeDriver(monkeypatch)
    drv.fail[(0, "power")] = pynvml.NVML_ERROR_NOT_SUPPORTED
    drv.fail[(1, "temp")] = pynvml.NVML_ERROR_NO_PERMISSION
    s = NvmlSampler()
    a, b = s.sample()
    assert a.power_w is None and a.temp_c == 61.0 and a.util_pct == 40.0
    assert b.temp_c is None and b.power_w == 250.0
    before = dict(drv.calls)
    s.sample()
    assert drv.calls["power"] == before["power"] + 1  # only GPU 1 asked again
    assert drv.calls["temp"] == before["temp"] + 1  # only GPU 0 asked again


def test_gpu_lost_or_driver_gone_gives_none_fields_not_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    drv = FakeDriver(monkeypatch)
    s = NvmlSampler()
    for call in ("util", "mem", "power", "temp", "clock"):
        drv.fail[(1, call)] = pynvml.NVML_ERROR_GPU_IS_LOST
        drv.fail[(0, call)] = pynvml.NVML_ERROR_UNINITIALIZED
    for sample in s.sample():
        assert isinstance(sample.name, str)
        assert [sample.util_pct, sample.mem_used, sample.mem_total, sample.power_w, sample.temp_c,
                sample.sm_clock_mhz, sample.mem_clock_mhz] == [None] * 7
    drv.fail.clear()  # transient errors are retried: the GPU came back
    assert s.sample()[0].util_pct == 40.0


def test_error_class_mapping_is_the_real_one() -> None:
    assert isinstance(err(pynvml.NVML_ERROR_NOT_SUPPORTED), pynvml.NVMLError_NotSupported)
    assert isinstance(err(pynvml.NVML_ERROR_GPU_IS_LOST), pynvml.NVMLError_GpuIsLost)


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
                                  pynvml.NVML_ERROR_NO_PERMISSION])
def test_init_failure_disables_silently(monkeypatch: pytest.MonkeyPatch, capsys, code: int) -> None:
    def fail() -> None:
        raise err(code)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    s = NvmlSampler()
    assert not s.enabled and s.sample() == []
    s.close()
    assert capsys.readouterr() == ("", "")


def test_name_failure_keeps_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    drv = FakeDriver(monkeypatch)
    drv.fail[(1, "name")] = pynvml.NVML_ERROR_UNKNOWN
    s = NvmlSampler()
    assert s.names == ["Fake GPU 0", "GPU 1"]


def test_close_shuts_nvml_down(monkeypatch: pytest.MonkeyPatch) -> None:
    drv = FakeDriver(monkeypatch)
    s = NvmlSampler()
    s.close()
    assert drv.shutdown == 1 and not s.enabled and s.sample() == []


def test_this_machine_without_a_usable_gpu_is_silent(capsys) -> None:
    s = NvmlSampler()  # the real library: on a CPU-only machine it must just be disabled
    samples = s.sample()
    if not s.enabled:
        assert samples == []
    else:  # a machine with a GPU: every sample names its device
        assert all(x.name for x in samples)
    s.close()
    assert capsys.readouterr() == ("", "")
