"""Root calls seen from ``nn.Module.__call__`` (agent/instruments/roots.py), with real torch models."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from llmtop.agent.instruments.roots import RootCalls
from llmtop.agent.runtime import core
from torch import nn
from torch.nn.modules import module as nn_module
from torch.utils.checkpoint import checkpoint

from .harness import clean_bus  # noqa: F401 (a fixture, used by pytestmark)

pytestmark = pytest.mark.usefixtures("clean_bus")
TORCH_CALL = nn.Module.__dict__["__call__"]


class Seen:
    """The owner's callbacks and the bus listeners, recording what they are told."""

    def __init__(self) -> None:
        self.starts: list[Any] = []
        self.ends: list[Any] = []
        self.errors: list[Any] = []
        self.bus_starts: list[tuple[Any, dict]] = []
        self.bus_ends: list[tuple[Any, int, int, dict]] = []
        core.BUS.root_forward_start.append(lambda m, t, a, k: self.bus_starts.append((m, k)))
        core.BUS.root_forward.append(lambda m, t0, t1, a, k: self.bus_ends.append((m, t0, t1, k)))

    def roots(self, **kw: Any) -> RootCalls:
        return RootCalls(lambda m, t0: self.starts.append(m), lambda m, t0, t1: self.ends.append(m),
                         self.errors.append, **kw)


@pytest.fixture
def rig() -> Iterator[tuple[Seen, RootCalls]]:
    seen = Seen()
    rc = seen.roots()
    rc.install(torch)
    try:
        yield seen, rc
    finally:
        rc.uninstall()
    assert nn.Module.__dict__["__call__"] is TORCH_CALL


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()))


def test_only_the_outermost_call_is_a_root_and_no_hook_is_registered(rig: Any) -> None:
    seen, rc = rig
    model = mlp()
    x = torch.randn(2, 4)
    with rc.muted():
        expected = model(x)
    out = model(x)
    assert torch.equal(out, expected)
    model[0](x)  # a submodule called on its own is a root too
    assert seen.starts == seen.ends == [model, model[0]]
    assert [m for m, _ in seen.bus_starts] == [model, model[0]]
    assert all(t1 > t0 for _, t0, t1, _ in seen.bus_ends)
    assert not nn_module._global_forward_pre_hooks and not nn_module._global_forward_hooks
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert rc.calls == 2 and rc.listeners_ns > 0


def test_kwargs_reach_both_announcements(rig: Any) -> None:
    seen, _ = rig

    class Takes(nn.Module):
        def forward(self, input_ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return input_ids * scale

    model = Takes()
    ids = torch.ones(2, 3)
    model(input_ids=ids, scale=2.0)
    assert seen.bus_starts[0][1] == {"input_ids": ids, "scale": 2.0}
    assert seen.bus_ends[0][3]["input_ids"] is ids


def test_a_raising_root_reraises_unchanged_and_the_next_call_is_a_root(rig: Any) -> None:
    seen, rc = rig

    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.exc = ValueError("bad shape")
            raise self.exc

    boom = Boom()
    model = nn.Sequential(nn.Linear(4, 4), boom)
    with pytest.raises(ValueError) as info:
        model(torch.randn(2, 4))
    assert info.value is boom.exc
    assert seen.errors == [model] and seen.ends == [] and seen.bus_ends == []
    assert rc.current()[0] is None
    model[0](torch.randn(2, 4))
    assert seen.ends == [model[0]]


def test_tracebacks_are_as_deep_as_without_the_agent() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("deep")

    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), Boom()))

    def depth() -> list[str]:
        try:
            model(torch.randn(2, 4))
        except ValueError as exc:
            return [f.name for f in traceback.extract_tb(exc.__traceback__)]
        raise AssertionError("no error")

    plain = depth()
    rc = Seen().roots()
    rc.install(torch)
    try:
        hooked = depth()
    finally:
        rc.uninstall()
    assert len(hooked) == len(plain)
    # torch's _wrapped_call_impl frames are ours instead: the same place in the stack
    assert [n for n in hooked if n != "__call__"] == [n for n in plain if n != "_wrapped_call_impl"]


def test_each_thread_has_its_own_roots(rig: Any) -> None:
    seen, _ = rig
    model = mlp()
    inside = threading.Event()
    release = threading.Event()

    class Waits(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            inside.set()
            release.wait(5)
            return x

    waits = Waits()
    worker = threading.Thread(target=lambda: waits(torch.randn(2, 4)))
    worker.start()
    assert inside.wait(5)
    model(torch.randn(2, 4))  # while the other thread is inside its own root call
    release.set()
    worker.join(5)
    assert sorted(seen.ends, key=id) == sorted([waits, model], key=id)


def test_a_forward_re_run_by_backward_is_not_a_root(rig: Any) -> None:
    seen, _ = rig

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.block, x, use_reentrant=False)

    model = Checkpointed()
    model(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert seen.starts == [model]
    assert model.block[0].weight.grad is not None


def test_muted_calls_are_not_roots(rig: Any) -> None:
    seen, rc = rig
    model = mlp()
    with rc.muted():
        model(torch.randn(2, 4))
        with rc.muted():
            model(torch.randn(2, 4))
    model(torch.randn(2, 4))
    assert seen.starts == [model]


def test_a_replacement_installed_before_stays_in_the_chain() -> None:
    calls: list[Any] = []

    def theirs(mod: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(mod)
        return TORCH_CALL(mod, *args, **kwargs)

    nn.Module.__call__ = theirs
    seen = Seen()
    rc = seen.roots()
    try:
        rc.install(torch)
        model = mlp()
        model(torch.randn(2, 4))
        assert seen.starts == [model]
        assert calls[0] is model and len(calls) == 6  # theirs still sees every module call
        rc.uninstall()
        assert nn.Module.__dict__["__call__"] is theirs
    finally:
        nn.Module.__call__ = TORCH_CALL


def test_a_replacement_installed_after_keeps_ours_inert_once_uninstalled() -> None:
    seen = Seen()
    rc = seen.roots()
    rc.install(torch)
    ours = nn.Module.__dict__["__call__"]

    def theirs(mod: Any, *args: Any, **kwargs: Any) -> Any:
        return ours(mod, *args, **kwargs)

    nn.Module.__call__ = theirs
    try:
        rc.uninstall()
        assert nn.Module.__dict__["__call__"] is theirs  # not ours to take out of their chain
        model = mlp()
        out = model(torch.randn(2, 4))
        assert out.shape == (2, 8) and seen.starts == []
    finally:
        nn.Module.__call__ = TORCH_CALL


def test_a_failing_listener_does_not_reach_the_call(rig: Any) -> None:
    seen, _ = rig

    def broken(*args: Any) -> None:
        raise RuntimeError("listener bug")

    core.BUS.root_forward_start.insert(0, broken)
    core.BUS.root_forward.insert(0, broken)
    model = mlp()
    out = model(torch.randn(2, 4))
    assert out.shape == (2, 8)
    assert [m for m, _ in seen.bus_starts] == [model] and [e[0] for e in seen.bus_ends] == [model]


def test_a_compiled_model_is_one_root_and_computes_the_same(rig: Any) -> None:
    seen, _ = rig
    model = mlp()
    x = torch.randn(2, 4)
    expected = model(x)
    compiled = torch.compile(model, backend="eager")
    assert torch.allclose(compiled(x), expected)
    assert seen.starts == [model, compiled]
