"""The layers instrument on small real CPU models: trees, forward/backward times, sampling, safety."""

from __future__ import annotations

import copy
import gc
import math
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn as nn
from llmtop.agent.instruments import budget as B
from llmtop.agent.instruments.layers import LayersInstrument
from llmtop.agent.runtime import core
from llmtop.protocol.events import Anomaly, LayerStats, Metric, ModelTree
from torch.nn.modules import module as nn_module

from .harness import Collect, clean_bus  # noqa: F401 (a fixture, used by pytestmark)

pytestmark = pytest.mark.usefixtures("clean_bus")

# --- harness ---------------------------------------------------------------------------------------


@pytest.fixture
def started() -> Iterator[Any]:
    made: list[LayersInstrument] = []

    def start(**options: Any) -> tuple[LayersInstrument, Collect]:
        # every step timed unless a test asks otherwise: with the automatic budget, which steps are
        # sampled depends on how fast this machine runs them
        options.setdefault("layer_every", 1)
        ctx = Collect(**options)
        inst = LayersInstrument(ctx.options)
        inst.install(ctx)
        made.append(inst)
        return inst, ctx

    yield start
    for inst in made:
        inst.uninstall()
    assert not any(getattr(h, "__self__", None) in made for h in nn_module._global_forward_pre_hooks.values())


def end_step(step: int, t_ns: int | None = None) -> None:
    for fn in list(core.BUS.step_end):
        fn(step, time.perf_counter_ns() if t_ns is None else t_ns)


def tables(inst: LayersInstrument) -> list[LayerStats]:
    return [e for e in inst.poll(time.time()) if isinstance(e, LayerStats)]


def rows(table: LayerStats) -> dict[int, dict[str, float]]:
    out = {}
    for i, gid in enumerate(table.ids):
        out[gid] = {
            "fwd": table.fwd_ms[i],
            "fwd_self": table.fwd_self_ms[i],
            "calls": table.calls[i],
            "bwd": table.bwd_ms[i] if table.bwd_ms else 0.0,
            "bwd_self": table.bwd_self_ms[i] if table.bwd_self_ms else 0.0,
        }
    return out


def mlp(inplace: bool = True, width: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, width), nn.ReLU(inplace=inplace),
        nn.Linear(width, width), nn.ReLU(inplace=inplace),
        nn.Linear(width, 1),
    )


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64)
    return GPT2LMHeadModel(cfg)


def ids_by_path(tree: ModelTree) -> dict[str, int]:
    return dict(zip(tree.paths, tree.ids, strict=True))


# --- model tree ----------------------------------------------------------------------------------


def test_tree_matches_named_modules_gpt2(started: Any) -> None:
    model = gpt2()
    inst, ctx = started()
    model(input_ids=torch.randint(0, 256, (2, 16)))
    [tree] = ctx.trees()
    named = list(model.named_modules())
    assert tree.name == "GPT2LMHeadModel"
    assert tree.paths == [p for p, _ in named]
    assert tree.classes == [type(m).__name__ for _, m in named]
    # own parameters, a tied one (GPT-2's LM head shares the token embedding) counted where first met
    assert model.lm_head.weight is model.transformer.wte.weight
    own = [sum(p.numel() for p in m.parameters(recurse=False)) for _, m in named]
    assert tree.params == [0 if path == "lm_head" else n for (path, _), n in zip(named, own, strict=True)]
    assert sum(tree.params) == sum(p.numel() for p in model.parameters())  # torch counts a tied one once
    assert tree.trainable == [any(p.requires_grad for p in m.parameters(recurse=False)) for _, m in named]
    assert len(set(tree.ids)) == len(tree.ids)
    by_path = ids_by_path(tree)
    for path, parent in zip(tree.paths, tree.parents, strict=True):
        assert parent == (-1 if path == "" else by_path[path.rpartition(".")[0]])
    assert tree.dtypes[tree.paths.index("transformer.wte")] == "float32"
    assert tree.dtypes[tree.paths.index("transformer.drop")] == ""
    assert not any(tree.compiled)
    # the joins other helpers use
    ids = inst.module_ids()
    paths = inst.module_paths()
    for path, mod in named:
        assert ids[mod] == by_path[path]
        assert paths[by_path[path]] == path
    # a second call sends nothing new
    model(input_ids=torch.randint(0, 256, (2, 16)))
    assert len(ctx.trees()) == 1


def test_module_added_later_resends_tree(started: Any) -> None:
    model = mlp()
    inst, ctx = started()
    x = torch.randn(4, 8)
    model(x)
    model.append(nn.Tanh())
    model(x)
    trees = ctx.trees()
    assert len(trees) == 2
    assert trees[1].model == trees[0].model
    assert trees[1].paths == [p for p, _ in model.named_modules()]
    assert trees[1].ids[:-1] == trees[0].ids  # ids are stable
    assert inst.module_paths()[trees[1].ids[-1]] == "5"
    assert trees[1].parents[-1] == trees[1].ids[0]


# --- forward ---------------------------------------------------------------------------------------


def test_forward_self_times_sum_to_root_gpt2(started: Any) -> None:
    model = gpt2()
    inst, ctx = started()
    x = torch.randint(0, 256, (2, 16))
    t0 = time.perf_counter_ns()
    with torch.no_grad():
        model(input_ids=x)
    wall_ms = (time.perf_counter_ns() - t0) / 1e6
    end_step(0)
    [table] = tables(inst)
    [tree] = ctx.trees()
    r = rows(table)
    root = tree.ids[0]
    assert set(table.ids) <= set(tree.ids)
    assert sum(v["fwd_self"] for v in r.values()) == pytest.approx(r[root]["fwd"], rel=1e-9)
    assert 0 < r[root]["fwd"] <= wall_ms
    by_path = ids_by_path(tree)
    # each parent's inclusive time covers its children's
    for gid, parent in zip(tree.ids, tree.parents, strict=True):
        if parent >= 0 and gid in r and parent in r:
            assert r[parent]["fwd"] >= r[gid]["fwd"]
    assert r[by_path["transformer.h.0"]]["calls"] == 1
    assert table.bwd_ms == [] and table.act_bytes == []  # no backward; CUDA parts absent on CPU


def test_heavy_layer_dominates_forward_and_backward(started: Any) -> None:
    # 34 MFLOP in layer "2" against at most 0.6 MFLOP elsewhere: its self time leads in both passes.
    # Compared per step, by the median over 7 steps: a preemption of this shared machine (5 ms and
    # more, seen under load) lands in one layer of one step and flipped a comparison of sums.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 512), nn.Linear(512, 512), nn.Linear(512, 8))
    inst, ctx = started()
    x = torch.randn(64, 8)
    for step in range(7):
        model(x).sum().backward()
        end_step(step)
    [tree] = ctx.trees()
    by_path = ids_by_path(tree)
    per_step = [rows(table) for table in tables(inst)]
    assert len(per_step) == 7
    heavy = by_path["2"]
    for other in ("0", "1", "3"):
        for key in ("fwd_self", "bwd_self"):
            leads = [r[heavy][key] - r[by_path[other]][key] for r in per_step]
            assert statistics.median(leads) > 0, (other, key, leads)


# --- backward --------------------------------------------------------------------------------------


def test_backward_rows_with_inplace_relu(started: Any) -> None:
    model = mlp(inplace=True)
    inst, ctx = started()
    x = torch.randn(4, 8)  # needs no grad: the first layer ends with its parameters' grads
    out = model(x)
    t0 = time.perf_counter_ns()
    out.sum().backward()
    bwd_wall_ms = (time.perf_counter_ns() - t0) / 1e6
    end_step(0)
    [tree] = ctx.trees()
    [table] = tables(inst)
    r = rows(table)
    root = tree.ids[0]
    for gid in tree.ids:
        assert r[gid]["bwd"] > 0, tree.paths[tree.ids.index(gid)]
        assert r[gid]["bwd_self"] >= 0
    assert sum(v["bwd_self"] for v in r.values()) == pytest.approx(r[root]["bwd"], rel=1e-9)
    assert r[root]["bwd"] <= bwd_wall_ms
    assert ctx.warnings == []


def test_backward_rows_every_trainable_layer_gpt2(started: Any) -> None:
    model = gpt2()
    inst, ctx = started()
    x = torch.randint(0, 256, (2, 16))
    out = model(input_ids=x, labels=x)  # a ModelOutput (a dict) with the loss in it
    out.loss.backward()
    end_step(0)
    [tree] = ctx.trees()
    [table] = tables(inst)
    r = rows(table)
    for gid, path, trainable in zip(tree.ids, tree.paths, tree.trainable, strict=True):
        if trainable:
            assert r[gid]["bwd"] > 0, path
    root = tree.ids[0]
    assert sum(v["bwd_self"] for v in r.values()) == pytest.approx(r[root]["bwd"], rel=1e-9)
    by_path = ids_by_path(tree)
    assert r[by_path["transformer.h.1"]]["bwd"] >= r[by_path["transformer.h.1.mlp"]]["bwd"]


def test_shared_module_counts_every_call(started: Any) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    inst, ctx = started()
    model(torch.randn(4, 8)).sum().backward()
    end_step(0)
    [tree] = ctx.trees()
    assert tree.paths == ["", "0", "1"]  # a shared module appears once in the tree
    r = rows(tables(inst)[0])
    lin_id = ids_by_path(tree)["0"]
    assert r[lin_id]["calls"] == 2
    assert r[lin_id]["bwd"] > 0
    assert sum(v["fwd_self"] for v in r.values()) == pytest.approx(r[tree.ids[0]]["fwd"], rel=1e-9)


def test_two_models_get_distinct_ids(started: Any) -> None:
    a, b = mlp(), mlp(width=8)
    inst, ctx = started()
    x = torch.randn(4, 8)
    a(x).sum().backward()
    b(x).sum().backward()
    end_step(0)
    ta, tb = ctx.trees()
    assert ta.model != tb.model
    assert not set(ta.ids) & set(tb.ids)
    [table] = tables(inst)
    assert set(ta.ids) | set(tb.ids) == set(table.ids)
    r = rows(table)
    assert all(r[g]["bwd"] > 0 for g in ta.ids + tb.ids)


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.block = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
        self.out = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self.block, self.inp(x), use_reentrant=False)
        return self.out(h)


def test_activation_checkpointing(started: Any) -> None:
    torch.manual_seed(0)
    model = Checkpointed()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 8)
    ref(x).sum().backward()
    inst, ctx = started()
    model(x).sum().backward()
    end_step(0)
    assert len(ctx.trees()) == 1  # the re-run in backward is not a new model
    [tree] = ctx.trees()
    by_path = ids_by_path(tree)
    r = rows(tables(inst)[0])
    assert r[by_path["block"]]["calls"] == 1  # the recomputation is not a forward call
    assert r[by_path["block.0"]]["calls"] == 1
    for path in ("", "inp", "block", "block.0", "block.1", "block.2", "out"):
        assert r[by_path[path]]["bwd"] > 0, path
    # the agent measures integer nanoseconds: compare those, not sums of float milliseconds (ulp)
    kids = sum(round(r[by_path[p]]["bwd"] * 1e6) for p in ("block.0", "block.1", "block.2"))
    assert round(r[by_path["block"]]["bwd"] * 1e6) >= kids
    for p_ref, p in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(p_ref.grad, p.grad)
    assert ctx.warnings == []


# --- no state growth -----------------------------------------------------------------------------


def _sizes(inst: LayersInstrument) -> tuple[int, ...]:
    st = inst._tls.st
    return (inst._n, inst._seq, len(inst._tasks), len(inst._ready), len(inst._acc.calls),
            len(st.stack), len(inst._param_handles), len(inst._by_addr))


def test_no_grad_and_inference_mode_grow_nothing(started: Any) -> None:
    model = mlp()
    inst, ctx = started()
    x = torch.randn(4, 8)
    with torch.no_grad():
        model(x)
    gc.collect()
    sizes, objects = _sizes(inst), len(gc.get_objects())
    with torch.no_grad():
        for _ in range(10_000):
            model(x)
    with torch.inference_mode():
        for _ in range(1_000):
            model(x)
    gc.collect()
    assert _sizes(inst) == sizes
    assert len(gc.get_objects()) - objects < 50
    assert ctx.warnings == []


def test_forward_with_grad_but_no_backward_grows_nothing(started: Any) -> None:
    model = mlp()
    inst, ctx = started()
    x = torch.randn(4, 8)
    model(x)
    gc.collect()
    objects = len(gc.get_objects())
    for _ in range(2_000):
        model(x)  # an evaluation loop that forgot no_grad: the records die with each graph
    gc.collect()
    assert len(gc.get_objects()) - objects < 50
    assert len(inst._tasks) == 0


# --- fail open -----------------------------------------------------------------------------------


def test_failing_forward_hook_disables_itself(started: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    x = torch.randn(4, 8)
    expected = model(x)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    def boom(*args: Any) -> None:
        raise RuntimeError("injected")

    inst, ctx = started()
    monkeypatch.setattr(inst, "_new_slot", boom)
    out = model(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected_grads, strict=True))
    assert len(ctx.warnings) == 1
    assert ctx.warnings[0][0] == "layers" and "injected" in ctx.warnings[0][1]
    assert not inst._timing
    assert not any(getattr(h, "__self__", None) is inst for h in nn_module._global_forward_pre_hooks.values())
    assert not model._forward_pre_hooks and not model._forward_hooks
    model(x)  # nothing runs any more
    assert len(ctx.warnings) == 1


def test_failing_backward_hook_disables_itself(started: Any) -> None:
    model = mlp()
    x = torch.randn(4, 8)
    model(x).sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    class Broken:
        def queue_callback(self, fn: Any) -> None:
            raise RuntimeError("injected in backward")

    inst, ctx = started()
    inst._engine = Broken()
    model(x).sum().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected_grads, strict=True))
    assert [w[0] for w in ctx.warnings] == ["layers"]
    assert "injected in backward" in ctx.warnings[0][1]


def test_out_of_memory_names_the_module_and_reraises(started: Any) -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise self.exc

    boom = Boom()
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Tanh(), boom))
    inst, ctx = started()
    with pytest.raises(torch.OutOfMemoryError) as info:
        model(torch.randn(2, 4))
    assert info.value is boom.exc
    [anomaly] = [e for e in ctx.events if isinstance(e, Anomaly)]
    assert anomaly.what == "oom" and anomaly.severity == "error"
    assert "Sequential.1.1" in anomaly.message and "Boom" in anomaly.message
    # the stacks unwound: the next call is a root again and is timed
    seen: list[Any] = []
    core.BUS.root_forward.append(lambda m, *a: seen.append(m))
    model[0](torch.randn(2, 4))
    assert seen == [model[0]]


def test_error_in_an_unsampled_root_call(started: Any) -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = nn.Sequential(nn.Linear(4, 4), Boom())
    inst, ctx = started(layer_every=2)
    x = torch.randn(2, 4)
    model[0](x)
    end_step(0)  # step 1 is not sampled: only the root is watched
    with pytest.raises(torch.OutOfMemoryError):
        model(x)
    [anomaly] = [e for e in ctx.events if isinstance(e, Anomaly)]
    assert "Sequential" in anomaly.message
    twin = copy.deepcopy(model)  # nothing of the agent's is on the model: a copy behaves the same
    with pytest.raises(torch.OutOfMemoryError):
        twin(x)
    ends: list[Any] = []
    core.BUS.root_forward.append(lambda m, *a: ends.append(m))
    model[0](x)  # the next root call clears what the failed call left behind
    assert ends == [model[0]]
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert ctx.warnings == []


def test_muted_thread_is_not_seen(started: Any) -> None:
    model = mlp()
    inst, ctx = started(layer_every=2)
    x = torch.randn(4, 8)
    starts: list[Any] = []
    core.BUS.root_forward_start.append(lambda m, t, a, k: starts.append(m))
    for step in range(2):  # a sampled and an unsampled step
        with inst.muted():
            other = mlp()
            other(x).sum().backward()
            with inst.muted():
                other(x)
            inst._gen += 1  # hooks re-added meanwhile must not unmute the thread
            other(x)
        model(x)
        end_step(step)
    assert starts == [model, model]
    assert [t.paths for t in ctx.trees()] == [[p for p, _ in model.named_modules()]]
    assert inst._tls.st.mute == 0 and inst._tls.st.hold == 0


# --- sampling, steps, threads ----------------------------------------------------------------------


class Probe(nn.Module):
    """Notes whether per-layer timing is in force while it runs, and that no global module hook
    (torch's slow path for every call) ever is."""

    def __init__(self, inst: LayersInstrument) -> None:
        super().__init__()
        self.inst = inst
        self.seen: list[bool] = []
        self.global_hooks = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.inst._rc.each is not None)
        self.global_hooks |= bool(nn_module._global_forward_pre_hooks or nn_module._global_forward_hooks)
        return x


def test_sampling_every_nth_step(started: Any) -> None:
    inst, ctx = started(layer_every=3)
    probe = Probe(inst)
    model = nn.Sequential(mlp(), probe)
    starts: list[Any] = []
    ends: list[Any] = []
    core.BUS.root_forward_start.append(lambda m, t, a, k: starts.append(m))
    core.BUS.root_forward.append(lambda m, t0, t1, a, k: ends.append((m, t1 - t0)))
    x = torch.randn(4, 8)
    for step in range(9):
        model(x).sum().backward()
        end_step(step)
    assert [t.step for t in tables(inst)] == [0, 3, 6]
    # unsampled steps pay nothing inside the model but a depth count (agent/instruments/roots.py)
    assert probe.seen == [True, False, False] * 3 and not probe.global_hooks
    assert starts == [model] * 9  # roots are announced on every step
    assert [m for m, _ in ends] == [model] * 9 and all(d > 0 for _, d in ends)
    assert inst.current_every == 3
    assert not model._forward_hooks and not model._forward_pre_hooks  # nothing left on the model


def test_copy_and_pickle_a_model_while_measured(started: Any) -> None:
    import io
    import pickle

    model = mlp()
    inst, ctx = started(layer_every=2)
    x = torch.randn(4, 8)
    for step in range(4):  # sampled and unsampled steps
        model(x).sum().backward()
        end_step(step)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x), model(x))
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), model(x))
        pickle.loads(pickle.dumps(model))
    assert ctx.warnings == []


def test_sampled_step_that_starts_inside_a_root_call(started: Any) -> None:
    # A step tracker may end the previous step as the next root forward starts (a grad-enabled
    # inference loop): per-layer timing then comes on while that root call is already running.
    model = mlp()
    inst, ctx = started(layer_every=2)
    started_steps: list[int] = []

    def on_root_start(m: Any, t: int, args: Any, kwargs: Any) -> None:
        if started_steps:
            end_step(started_steps[-1])  # the previous forward's step ends as this one starts
        started_steps.append(len(started_steps))

    core.BUS.root_forward_start.append(on_root_start)
    x = torch.randn(4, 8)
    for _ in range(6):
        model(x)
    end_step(started_steps[-1])
    got = tables(inst)
    assert [t.step for t in got] == [0, 2, 4]
    [tree] = ctx.trees()
    for table in got:
        r = rows(table)
        assert set(r) == set(tree.ids)
        assert all(v["calls"] == 1 for v in r.values())
        assert sum(v["fwd_self"] for v in r.values()) == pytest.approx(r[tree.ids[0]]["fwd"], rel=1e-9)


def _rate_for(inst: LayersInstrument, budget_pct: float) -> int:
    """The rate the budget's formula gives for the costs the instrument measured: half the budget
    (``AIM``) of the step without per-layer timing, less the op reserve and the fixed cost."""
    b = inst.budget
    fixed = B._median(b.fixed_ns) if b.fixed_ns else 0
    left = budget_pct / 100 * B.AIM * b.base_ns() * (1 - B.OPS_RESERVE) - fixed
    return math.ceil(b.extra_ns() / left)


def test_automatic_sampling_keeps_the_budget(started: Any) -> None:
    model = mlp()
    # 6 module calls at 50 us each (300 us, and the backward bookkeeping as measured) in a 10 ms
    # step; sampling aims at half of a 1 % budget (about 48 us of the step without them), a quarter
    # of which is kept for op profiles: 36 us -> every 9th step at least
    inst, ctx = started(layer_every=0, budget_pct=1.0, layer_call_ns=50_000)
    x = torch.randn(4, 8)
    assert inst.current_every == 1
    t = 1_000_000_000
    end_step(0, t)  # the first boundary opens step 1
    got: list[LayerStats] = []
    rate = 0
    for step in range(1, 25):
        model(x).sum().backward()
        t += 10_000_000
        end_step(step, t)
        got += tables(inst)  # the agent thread's tick: the budget is kept there
        if step == 1:
            assert inst.budget.extra_ns() >= 6 * 50_000
            assert inst.overhead_ns_last_step() >= inst.budget.extra_ns()  # plus the root hooks
            rate = _rate_for(inst, 1.0)
            assert 9 <= rate <= 20
            assert inst.current_every == rate
    # the rate set by the tick after step 1 applies from the next boundary on: step 2 had begun
    # under the old one
    assert [t.step for t in got][:3] == [1, 2, rate]


def test_sampling_rate_follows_the_budget_when_the_agent_thread_is_behind(started: Any) -> None:
    """With no tick (the agent thread busy, or a tick not due yet), the step loop accounts for its
    own steps once the oldest unaccounted one is 20 ms old, in one batch: the rate still adapts."""
    model = mlp()
    inst, ctx = started(layer_every=0, budget_pct=1.0, layer_call_ns=50_000)
    x = torch.randn(4, 8)
    t = 1_000_000_000
    end_step(0, t)
    every = []
    for step in range(1, 4):
        model(x).sum().backward()
        t += 10_000_000
        end_step(step, t)
        every.append(inst.current_every)
    # steps 0 and 1 end 10 ms apart: nothing accounted yet; at step 2's end step 0 is 20 ms old,
    # and steps 0-2 are accounted in one go (step 3's end is 10 ms after that: it waits)
    rate = _rate_for(inst, 1.0)
    assert rate >= 9
    assert every == [1, rate, rate]
    assert [m[0] for m in inst._marks] == [3]
    assert [t.step for t in tables(inst)] == [1, 2]  # queued by the step loop, sent by the tick


def test_step_on_another_thread(started: Any) -> None:
    model = mlp()
    inst, ctx = started()
    errors: list[BaseException] = []

    def train() -> None:
        try:
            x = torch.randn(4, 8)
            for step in range(2):
                model(x).sum().backward()
                end_step(step)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=train)
    t.start()
    t.join()
    assert errors == []
    [tree] = ctx.trees()
    got = tables(inst)
    assert [g.step for g in got] == [0, 1]
    r = rows(got[1])
    assert all(r[g]["bwd"] > 0 and r[g]["calls"] == 1 for g in tree.ids)
    assert ctx.warnings == []


def test_root_forward_announcements_carry_kwargs(started: Any) -> None:
    # both announcements carry the call's kwargs, sampled or not (agent/instruments/roots.py sees the call itself)
    model = gpt2()
    inst, ctx = started(layer_every=2)
    starts: list[tuple[Any, dict]] = []
    ends: list[tuple[Any, int, int, dict]] = []
    core.BUS.root_forward_start.append(lambda m, t, a, k: starts.append((m, k)))
    core.BUS.root_forward.append(lambda m, t0, t1, a, k: ends.append((m, t0, t1, k)))
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        model(input_ids=x)  # sampled step 0
        end_step(0)
        model(input_ids=x)  # unsampled step 1
    assert [m for m, _ in starts] == [model, model]  # submodules are not roots
    assert all(k["input_ids"] is x for _, k in starts)
    assert [m for m, *_ in ends] == [model, model]
    assert all(k["input_ids"] is x and t1 > t0 for _, t0, t1, k in ends)


def test_flush_per_tick_without_steps(started: Any) -> None:
    model = mlp()
    inst, ctx = started()
    ctx.current_step = 7
    with torch.no_grad():
        model(torch.randn(4, 8))
    [table] = tables(inst)
    assert table.step == 7 and len(table.ids) == 6
    assert tables(inst) == []


def test_calibration_is_private(started: Any) -> None:
    inst, ctx = started(layer_call_ns=0)  # 0: calibrate
    assert inst.call_cost_ns > 0
    assert ctx.events == []  # the probe model sent nothing
    # the probe's own Module.__call__ replacement is gone: the one in force is the instrument's
    assert nn.Module.__dict__["__call__"] is inst._rc._new and inst._rc.each is not None
    assert not nn_module._global_forward_pre_hooks and not nn_module._global_forward_hooks
    assert core.BUS.step_end == [inst._on_step_end]


# --- torch.compile ---------------------------------------------------------------------------------


def test_compiled_module_is_one_node(started: Any) -> None:
    model = mlp()
    x = torch.randn(4, 8)
    expected = model(x)
    inst, ctx = started()
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings(record=True) as caught:  # the filters in force, as the user has them
        for step in range(2):
            out = compiled(x)
            out.sum().backward()
            end_step(step)
    assert torch.equal(out, expected)
    assert not [w for w in caught if "global hooks" in str(w.message)]
    [tree] = ctx.trees()
    assert tree.name == "OptimizedModule" and tree.compiled[0] is True
    events = inst.poll(time.time())
    r = rows([e for e in events if isinstance(e, LayerStats)][-1])
    assert r[tree.ids[0]]["calls"] == 1 and r[tree.ids[0]]["bwd"] > 0
    metrics = {e.name: e.value for e in events if isinstance(e, Metric)}
    assert metrics["compile_time_s"] > 0 and metrics["recompilations"] == 0
    # a new input shape on a static compile recompiles the frame, and the count says so
    static = torch.compile(mlp(), backend="eager", dynamic=False)
    static(x)
    before = {e.name: e.value for e in inst.poll(time.time()) if isinstance(e, Metric)}
    static(torch.randn(5, 8))
    after = {e.name: e.value for e in inst.poll(time.time()) if isinstance(e, Metric)}
    assert after["recompilations"] == before.get("recompilations", metrics["recompilations"]) + 1
    assert ctx.warnings == []


def test_module_compiled_in_place_is_one_node_with_its_root_calls(started: Any) -> None:
    model = mlp()
    x = torch.randn(4, 8)
    expected = model(x)
    model.compile(backend="eager")  # nothing runs eagerly inside: it is one call, one row
    inst, ctx = started(layer_every=2)
    ends: list[Any] = []
    core.BUS.root_forward.append(lambda m, t0, t1, a, k: ends.append((m, t1 - t0)))
    for step in range(4):
        out = model(x)
        out.sum().backward()
        end_step(step)
    assert torch.equal(out, expected)
    assert [m for m, _ in ends] == [model] * 4 and all(dt > 0 for _, dt in ends)
    [tree] = ctx.trees()
    assert tree.name == "Sequential" and tree.compiled[0] is True
    got = tables(inst)
    assert [t.step for t in got] == [0, 2]  # the sampled steps
    for table in got:
        [row] = rows(table).values()
        assert table.ids == [tree.ids[0]] and row["calls"] == 1 and row["fwd"] == row["fwd_self"] > 0
        assert row["bwd"] == row["bwd_self"] > 0
    assert ctx.warnings == []


# --- instrument list -----------------------------------------------------------------------------


def test_default_instruments() -> None:
    from llmtop.agent.instruments import default_instruments

    insts = default_instruments(core.Options())
    assert isinstance(insts[0], LayersInstrument)
    assert all(hasattr(i, "install") and hasattr(i, "poll") for i in insts)
    code = "import sys, llmtop.agent.instruments, llmtop.agent.instruments.layers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
