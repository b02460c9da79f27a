"""The agent makes no synchronizing call during a step.

Every call that can block the host on the GPU is wrapped; a call counts when the frame that made
it belongs to llmtop (its module name starts with ``llmtop.``). A training loop runs with the step
tracker and the layers instrument installed, while a thread polls them like the agent thread.
On this CPU machine the same code paths run (CUDA branches are guarded by ``cuda_ready()``); the
GPU test at the end repeats the check with torch's own sync debug mode on a real device.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest
import torch
from llmtop.agent.instruments.steps import StepInstrument
from llmtop.agent.runtime import core
from llmtop.protocol.events import Step
from torch import nn
from torch.utils.data import DataLoader

from .harness import Collect
from .test_steps import Roots, SleepySet


def _from_llmtop(depth: int = 2) -> bool:
    name = sys._getframe(depth).f_globals.get("__name__", "")
    return name.startswith("llmtop.")


class SyncSpy:
    """Counts llmtop's calls to anything that can wait for the device."""

    ALWAYS = [  # any call of these from llmtop is a violation
        (torch.cuda, "synchronize"),
        (torch.Tensor, "item"),
        (torch.Tensor, "tolist"),
        (torch.Tensor, "numpy"),
        (torch.Tensor, "cpu"),
        (torch.cuda.Event, "synchronize"),
        (torch.cuda.Event, "elapsed_time"),  # only after query() says done: never on the hot path
        (torch.cuda.Stream, "synchronize"),
    ]
    # reading a tensor's value is a sync only when it lives on a device
    ON_DEVICE = ["__float__", "__int__", "__bool__", "__index__"]

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.host_reads = 0
        self._saved: list[tuple[Any, str, Any]] = []
        self.armed = False

    def __enter__(self) -> SyncSpy:
        for owner, attr in self.ALWAYS:
            self._wrap(owner, attr, device_only=False)
        for attr in self.ON_DEVICE:
            self._wrap(torch.Tensor, attr, device_only=True)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, orig in reversed(self._saved):
            setattr(owner, attr, orig)

    def _wrap(self, owner: Any, attr: str, device_only: bool) -> None:
        orig = getattr(owner, attr)
        spy = self
        label = f"{getattr(owner, '__name__', owner)}.{attr}"

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if spy.armed and _from_llmtop():
                if not device_only:
                    spy.calls[label] += 1
                elif isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
                    spy.calls[label] += 1
                else:
                    spy.host_reads += 1
            return orig(*args, **kwargs)

        setattr(owner, attr, wrapper)
        self._saved.append((owner, attr, orig))


def test_spy_catches_a_planted_sync_from_llmtop_code() -> None:
    # the detector itself must be able to fail: code whose module is llmtop's calls .item()
    planted: dict[str, Any] = {"__name__": "llmtop.agent.planted"}
    exec("def read(t):\n    return t.item()\n", planted)
    with SyncSpy() as spy:
        spy.armed = True
        planted["read"](torch.ones(()))
        torch.ones(()).item()  # the script's own call does not count
    assert spy.calls == Counter({"Tensor.item": 1})


def test_no_synchronizing_call_during_training_steps() -> None:
    layers_mod = pytest.importorskip("llmtop.agent.instruments.layers")
    ctx = Collect(layer_call_ns=0)  # 0: the layers instrument calibrates
    layers = layers_mod.LayersInstrument(ctx.options)
    st = StepInstrument(ctx.options)
    events: list[Any] = []
    stop = threading.Event()

    def agent_thread() -> None:
        while not stop.is_set():
            events.extend(st.poll(time.time()))
            events.extend(layers.poll(time.time()))
            time.sleep(0.002)

    with SyncSpy() as spy:
        layers.install(ctx)
        st.install(ctx)
        core.ACTIVE = ctx
        poller = threading.Thread(target=agent_thread)
        try:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
            spy.armed = True
            poller.start()
            for x, y in DataLoader(SleepySet(32, 0.0), batch_size=4):
                loss = nn.functional.mse_loss(model(x.to("cpu")), y)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
            with torch.no_grad():  # an evaluation pass too
                model(torch.randn(4, 8))
        finally:
            stop.set()
            if poller.is_alive():
                poller.join()
            events.extend(st.poll(time.time()))
            spy.armed = False
            core.ACTIVE = None
            st.uninstall()
            layers.uninstall()
    steps = [e for e in events if isinstance(e, Step)]
    assert len(steps) == 8
    assert all(s.loss is not None and s.grad_norm is not None for s in steps)
    assert spy.calls == Counter(), f"synchronizing calls from llmtop: {dict(spy.calls)}"
    # on CPU the loss and gradient norm are host reads of CPU tensors (not syncs)
    assert spy.host_reads >= 16


def test_no_sync_with_the_roots_announcer_and_manual_steps() -> None:
    ctx = Collect()
    st = StepInstrument(ctx.options)
    with SyncSpy() as spy:
        st.install(ctx)
        core.ACTIVE = ctx
        try:
            with Roots():
                model = nn.Linear(4, 2)
                spy.armed = True
                for _ in range(5):
                    model(torch.randn(3, 4)).sum().backward()
                    ctx.manual_step()
                events = st.poll(time.time())
        finally:
            spy.armed = False
            core.ACTIVE = None
            st.uninstall()
    assert len([e for e in events if isinstance(e, Step)]) == 5  # the first forward opened step 0
    assert spy.calls == Counter()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_no_sync_on_a_real_gpu() -> None:
    ctx = Collect()
    st = StepInstrument(ctx.options)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = [(torch.randn(64, 256).pin_memory(), torch.randn(64, 1).pin_memory()) for _ in range(10)]
    st.install(ctx)
    st.poll(time.time())  # the agent thread's first tick allocates the pinned read-back slots
    losses = []
    try:
        with Roots(), SyncSpy() as spy:
            spy.armed = True
            torch.cuda.set_sync_debug_mode("error")  # torch raises on any synchronizing call
            try:
                for x, y in data:
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    loss = nn.functional.mse_loss(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
                    opt.step()
                    losses.append(loss.detach())
            finally:
                torch.cuda.set_sync_debug_mode(0)
                spy.armed = False
        torch.cuda.synchronize()
        events: list[Any] = []
        for _ in range(100):
            events += st.poll(time.time())
            if len([e for e in events if isinstance(e, Step)]) == 10:
                break
            time.sleep(0.01)
    finally:
        st.uninstall()
    steps = [e for e in events if isinstance(e, Step)]
    assert spy.calls == Counter()
    assert [s.loss for s in steps] == pytest.approx([v.item() for v in losses], rel=1e-6)
    assert all(s.gpu_ms is not None and s.gpu_ms > 0 for s in steps[1:])
    read = [s for s in steps if s.cuda_allocated is not None]  # within budget: maybe not every step
    assert steps[0] in read
    assert all(s.cuda_allocated > 0 and s.cuda_reserved >= s.cuda_allocated and s.cuda_peak > 0 for s in read)
    assert all(s.phases["h2d"] > 0 for s in steps)
