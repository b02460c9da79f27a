"""The step tracker on small real CPU models, real optimizers and real DataLoaders.

Most tests announce root forwards on ``core.BUS`` with a few global module hooks (what the layers
instrument does); ``test_end_to_end_with_layers_instrument`` uses the real layers instrument.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import llmtop.agent
import pytest
import torch
from llmtop.agent.instruments.roots import RootCalls
from llmtop.agent.instruments.step_inputs import _input_shape
from llmtop.agent.instruments.steps import StepInstrument
from llmtop.agent.runtime import core
from llmtop.protocol.events import PHASES, AgentWarning, LayerStats, Step
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .harness import Collect

# --- harness ------------------------------------------------------------------------------------


class Roots:
    """Root-module forwards announced on the bus by the real mechanism (agent/instruments/roots.py), without
    the layers instrument around it."""

    def __enter__(self) -> Roots:
        def ignore(*args: Any) -> None:
            pass

        self.calls = RootCalls(ignore, ignore, ignore)
        self.calls.install(torch)
        return self

    def __exit__(self, *exc: object) -> None:
        self.calls.uninstall()


@pytest.fixture
def tracked():
    ctx = Collect()
    st = StepInstrument(ctx.options)
    st.install(ctx)
    core.ACTIVE = ctx
    roots = Roots().__enter__()
    try:
        yield st, ctx
    finally:
        roots.__exit__()
        core.ACTIVE = None
        st.uninstall()


def drain(st: StepInstrument, ctx: Collect) -> list[Step]:
    ctx.events.extend(st.poll(time.time()))
    return [e for e in ctx.events if isinstance(e, Step)]


def warnings_of(ctx: Collect) -> list[AgentWarning]:
    return [AgentWarning(t=0.0, source=source, message=message) for source, message in ctx.warnings]


class SleepySet(Dataset):
    def __init__(self, n: int, sleep_s: float, dim: int = 8) -> None:
        self.n, self.sleep_s, self.dim = n, sleep_s, dim

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        g = torch.Generator().manual_seed(i)
        return torch.randn(self.dim, generator=g), torch.randn(1, generator=g)


def mlp(dim: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 1))


def assert_phases_add_up(s: Step) -> None:
    assert set(s.phases) == set(PHASES)
    assert all(v >= 0 for v in s.phases.values())
    assert math.isclose(sum(s.phases.values()), s.dur_ms, rel_tol=0.05)


# --- phases -----------------------------------------------------------------------------------


def test_phases_sum_to_step_time_and_data_wait_is_measured(tracked) -> None:
    st, ctx = tracked
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sleep_s = 0.03
    loader = DataLoader(SleepySet(5, sleep_s), batch_size=1)
    befores, afters = [], []
    for x, y in loader:
        x = x.to(torch.float32).to("cpu")  # copies that stay on the host are not h2d
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        befores.append(time.perf_counter())
        opt.step()  # the step ends inside this call
        afters.append(time.perf_counter())
    steps = drain(st, ctx)
    assert [s.step for s in steps] == [0, 1, 2, 3, 4]
    assert ctx.current_step == 5
    for s in steps:
        assert s.mode == "train"
        assert_phases_add_up(s)
        # one item per batch: the fetch slept sleep_s inside DataLoader.__next__
        assert s.phases["data"] >= sleep_s * 1e3
        assert s.phases["data"] <= s.dur_ms
        assert s.phases["forward"] > 0 and s.phases["backward"] > 0 and s.phases["optimizer"] > 0
        assert s.phases["h2d"] == 0  # CPU only: nothing moves to a device
        assert s.cuda_allocated is None and s.cuda_reserved is None and s.cuda_peak is None
        assert s.gpu_ms is None
        assert s.samples == 1
        assert s.overhead_us > 0
    # steps are contiguous: step k+1 lasts from step k's end to its own
    for k in range(1, 5):
        assert (befores[k] - afters[k - 1]) * 1e3 <= steps[k].dur_ms <= (afters[k] - befores[k - 1]) * 1e3
    assert not warnings_of(ctx)


def test_validation_loader_is_not_charged_to_training(tracked) -> None:
    st, ctx = tracked
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train = DataLoader(SleepySet(6, 0.0), batch_size=2)
    val_sleep = 0.1
    val = DataLoader(SleepySet(3, val_sleep), batch_size=1)

    def train_epoch() -> None:
        for x, y in train:
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    train_epoch()
    t_eval = time.perf_counter()
    with torch.no_grad():
        for x, _y in val:
            model(x)
    eval_ms = (time.perf_counter() - t_eval) * 1e3
    train_epoch()
    records = drain(st, ctx)
    # the evaluation is a record of its own, numbered as the training step it precedes
    assert [(s.mode, s.step) for s in records] == [("train", 0), ("train", 1), ("train", 2), ("eval", 3),
                                                   ("train", 3), ("train", 4), ("train", 5)]
    ev = records[3]
    assert_phases_add_up(ev)
    assert ev.dur_ms >= eval_ms and ev.phases["data"] >= 3 * val_sleep * 1e3
    assert ev.samples == 3  # three validation batches of one
    steps = [s for s in records if s.mode == "train"]
    after_eval = steps[3]
    assert_phases_add_up(after_eval)
    # the step after evaluation starts at its own batch's fetch, not at the previous step's end
    assert after_eval.phases["data"] < val_sleep * 1e3
    assert after_eval.dur_ms < eval_ms
    for s in steps:
        assert s.phases["data"] < val_sleep * 1e3
        assert s.samples == 2  # the no-grad validation forwards are not counted


def test_frozen_teacher_forward_stays_in_the_step(tracked) -> None:
    st, ctx = tracked
    student, teacher = mlp(), mlp()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for x, _ in DataLoader(SleepySet(6, 0.0), batch_size=2):
        t0 = time.perf_counter()
        with torch.no_grad():
            target = teacher(x)
            time.sleep(0.02)  # a slow teacher: this time belongs to the step
        loss = nn.functional.mse_loss(student(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        inside_ms = (time.perf_counter() - t0) * 1e3
    steps = drain(st, ctx)
    # before the first backward nothing says this is training: the first no-grad forward is
    # reported as an inference step (documented); every later iteration is one training step
    assert [s.mode for s in steps] == ["infer", "train", "train", "train"]
    assert steps[-1].dur_ms >= inside_ms
    assert steps[-1].phases["other"] >= 20.0  # the sleep next to the teacher
    assert steps[-1].samples == 2


# --- training signals ---------------------------------------------------------------------------


def test_loss_grad_norm_lr_equal_the_scripts(tracked) -> None:
    st, ctx = tracked
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    losses, norms, lrs = [], [], []
    for x, y in DataLoader(SleepySet(8, 0.0), batch_size=2):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        losses.append(loss.item())
        norms.append(norm.item())
    steps = drain(st, ctx)
    assert [s.loss for s in steps] == pytest.approx(losses, rel=1e-6)
    assert [s.grad_norm for s in steps] == pytest.approx(norms, rel=1e-6)
    assert [s.lr for s in steps] == pytest.approx(lrs, rel=1e-12)
    assert len(set(lrs)) == 4  # the schedule really moved


def test_gradient_accumulation_is_one_step_per_optimizer_step(tracked) -> None:
    st, ctx = tracked
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(SleepySet(24, 0.0), batch_size=2)
    micro_losses: list[float] = []
    step_losses = []
    for i, (x, y) in enumerate(loader):
        loss = nn.functional.mse_loss(model(x), y) / 4
        loss.backward()
        micro_losses.append(loss.item())
        if (i + 1) % 4 == 0:
            opt.step()
            opt.zero_grad()
            step_losses.append(sum(micro_losses))  # = the mean of the unscaled losses
            micro_losses = []
    steps = drain(st, ctx)
    assert len(steps) == 3
    for s, total in zip(steps, step_losses, strict=True):
        assert s.loss == pytest.approx(total, rel=1e-6)  # the sum of the losses backward() saw
        assert s.samples == 8  # 4 micro-batches of 2
        assert_phases_add_up(s)


def test_grad_scaler_reports_the_unscaled_loss(tracked) -> None:
    st, ctx = tracked
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    losses = []
    for x, y in DataLoader(SleepySet(4, 0.0), batch_size=2):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    steps = drain(st, ctx)
    assert len(steps) == 2
    assert [s.loss for s in steps] == pytest.approx(losses, rel=1e-6)


def test_samples_and_tokens_from_input_shapes(tracked) -> None:
    st, ctx = tracked
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        ids = torch.randint(0, 50, (4, 7))
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 50), ids.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    steps = drain(st, ctx)
    assert [(s.samples, s.tokens) for s in steps] == [(4, 28), (4, 28)]
    # the rule itself: input_ids kwarg first, then the first tensor argument
    assert _input_shape((), {"input_ids": torch.zeros(3, 5, dtype=torch.long)}) == (3, 15)
    assert _input_shape((torch.zeros(6, 8),), {}) == (6, None)  # float input: samples only
    assert _input_shape(("text", torch.zeros(2, 3, dtype=torch.int32)), {}) == (2, 6)
    assert _input_shape((), {}) == (None, None)


def test_two_optimizers_per_iteration_make_one_step(tracked) -> None:
    st, ctx = tracked
    gen, disc = mlp(), mlp()
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.01)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.01)
    x = torch.randn(4, 8)
    for _ in range(3):  # a GAN-like loop: D steps, then G steps
        opt_d.zero_grad()
        disc(x).mean().backward()
        opt_d.step()
        opt_g.zero_grad()
        gen(x).mean().backward()
        opt_g.step()
    steps = drain(st, ctx)
    assert len(steps) == 3
    for s in steps[1:]:
        assert s.phases["optimizer"] > 0
        assert_phases_add_up(s)
    # the script replaces its optimizer: the new one takes over the step boundary
    opt_new = torch.optim.SGD(gen.parameters(), lr=0.5)
    for _ in range(3):
        gen(x).mean().backward()
        opt_new.step()
    steps = drain(st, ctx)
    assert len(steps) == 5  # its first step joins the old boundary's step, then it ends steps
    assert steps[-1].lr == 0.5


# --- inference, manual steps ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_inference_steps_from_root_forwards_under_no_grad(tracked, mode) -> None:
    st, ctx = tracked
    model = mlp()
    with mode():
        for _ in range(5):
            model(torch.randn(3, 8))
    steps = drain(st, ctx)
    assert len(steps) == 5
    for s in steps:
        assert s.mode == "infer"
        assert s.samples == 3
        assert s.loss is None and s.lr is None
        assert s.phases["forward"] > 0
        assert_phases_add_up(s)


def test_grad_enabled_forwards_without_backward_are_inference(tracked) -> None:
    st, ctx = tracked
    model = mlp()
    for _ in range(3):
        model(torch.randn(2, 8))
    steps = drain(st, ctx)
    assert [s.mode for s in steps] == ["infer", "infer"]  # the third waits for the next forward
    st.uninstall()  # the script ends: the last forward was inference too
    steps = drain(st, ctx)
    assert len(steps) == 3 and steps[2].mode == "infer" and steps[2].samples == 2


def test_manual_step_takes_over(tracked) -> None:
    st, ctx = tracked
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    # one automatic step first
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    # then the user marks steps: two optimizer steps per manual step
    llmtop.agent.step()
    for _ in range(2):
        for _ in range(2):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        llmtop.agent.step()
    steps = drain(st, ctx)
    assert [s.step for s in steps] == [0, 1, 2, 3]
    assert steps[1].mode in ("train", "infer")  # the gap between the automatic step and the first call
    for s in steps[2:]:
        assert s.mode == "train"
        assert s.samples == 8
        assert s.phases["optimizer"] > 0
        assert_phases_add_up(s)


def test_step_api_is_a_no_op_without_an_agent() -> None:
    assert core.ACTIVE is None
    llmtop.agent.step()  # nothing to do, nothing raised


# --- workers, threads, failures --------------------------------------------------------------------


def test_dataloader_with_two_workers(tracked) -> None:
    st, ctx = tracked
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(SleepySet(8, 0.01), batch_size=2, num_workers=2)
    n = 0
    for x, y in loader:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += 1
    steps = drain(st, ctx)
    assert n == 4 and len(steps) == 4
    assert all(s.phases["data"] > 0 for s in steps)
    for s in steps:
        assert_phases_add_up(s)
    assert not warnings_of(ctx)


def test_step_loop_on_a_non_main_thread(tracked) -> None:
    st, ctx = tracked
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses: list[float] = []

    def loop() -> None:
        for x, y in DataLoader(SleepySet(6, 0.0), batch_size=2):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())

    th = threading.Thread(target=loop)
    th.start()
    th.join()
    steps = drain(st, ctx)
    assert len(steps) == 3
    assert [s.loss for s in steps] == pytest.approx(losses, rel=1e-6)
    for s in steps:
        assert s.phases["forward"] > 0 and s.phases["backward"] > 0
        assert_phases_add_up(s)


def run_training(seed: int) -> list[float]:
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for x, y in DataLoader(SleepySet(8, 0.0), batch_size=2):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def test_a_failing_hook_disables_itself_and_the_script_is_unchanged(tracked, monkeypatch) -> None:
    st, ctx = tracked
    expected = run_training(1)  # measured normally

    def broken(*a: Any, **k: Any) -> None:
        raise RuntimeError("planted")

    monkeypatch.setattr(st, "_end_step", broken)
    assert run_training(1) == expected
    warns = warnings_of(ctx)
    assert len(warns) == 1 and "planted" in warns[0].message and warns[0].source == "steps"
    assert st.disabled


def test_uninstall_restores_torch() -> None:
    originals = (torch.Tensor.to, torch.Tensor.backward, torch.autograd.backward,
                 torch.nn.utils.clip_grad_norm_)
    st = StepInstrument()
    st.install(Collect())
    assert torch.autograd.backward is not originals[2]
    assert torch.Tensor.backward is originals[1]  # it calls torch.autograd.backward: one wrapper
    st.uninstall()
    assert (torch.Tensor.to, torch.Tensor.backward, torch.autograd.backward,
            torch.nn.utils.clip_grad_norm_) == originals
    assert not core.BUS.root_forward and not core.BUS.root_forward_start


# --- with the real layers instrument ----------------------------------------------------------------


def test_end_to_end_with_layers_instrument() -> None:
    layers_mod = pytest.importorskip("llmtop.agent.instruments.layers")
    from transformers import GPT2Config, GPT2LMHeadModel

    # layer_call_ns 0: the layers instrument calibrates; layer_every 1: every step is sampled (the
    # automatic rate may thin sampling after a step or two when the machine is loaded: CI saw it)
    ctx = Collect(layer_call_ns=0, layer_every=1)
    layers = layers_mod.LayersInstrument(ctx.options)
    st = StepInstrument(ctx.options)
    layers.install(ctx)
    st.install(ctx)
    try:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(3):
            ids = torch.randint(0, 64, (2, 16))
            out = model(input_ids=ids, labels=ids)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        # the agent thread's tick: the layers instrument first (it accounts for the steps' costs)
        tables = {e.step: e for e in layers.poll(time.time()) if isinstance(e, LayerStats)}
        steps = drain(st, ctx)
    finally:
        st.uninstall()
        layers.uninstall()
    assert len(steps) == 3
    assert [s.loss for s in steps] == pytest.approx(losses, rel=1e-6)
    for s in steps:
        assert (s.samples, s.tokens) == (2, 32)
        assert s.phases["forward"] > 0 and s.phases["backward"] > 0
        assert_phases_add_up(s)
        assert s.layer_every >= 1
        # every step here is sampled: its reported cost includes each timed module call
        assert s.overhead_us * 1e3 >= sum(tables[s.step].calls) * layers.call_cost_ns > 0
    assert not warnings_of(ctx)


def test_host_to_device_copies_are_their_own_phase_innermost_wins(tracked) -> None:
    # no GPU here: the meta device is a real non-CPU device for Tensor.to
    st, ctx = tracked
    st.h2d_armed = True  # what CUDA in use does (on a CPU-only run copies are not even timed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    moved = []

    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([a for a, _ in items])
        y = torch.stack([b for _, b in items])
        moved.append(torch.randn(256, 256).to("meta"))  # a copy inside the data fetch
        return x, y

    for x, y in DataLoader(SleepySet(6, 0.01), batch_size=2, collate_fn=collate):
        moved.append(x.to("meta"))  # a copy in the loop body
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    steps = drain(st, ctx)
    assert len(steps) == 3 and len(moved) == 6
    for s in steps:
        assert s.phases["h2d"] > 0
        assert s.phases["data"] >= 20.0  # two items of 10 ms each
        assert_phases_add_up(s)


def test_each_generate_call_is_one_inference_step() -> None:
    layers_mod = pytest.importorskip("llmtop.agent.instruments.layers")
    integrations = pytest.importorskip("llmtop.agent.hf.instrument")
    from transformers import GPT2Config, GPT2LMHeadModel

    ctx = Collect(layer_call_ns=0)  # 0: the layers instrument calibrates
    insts = [layers_mod.LayersInstrument(ctx.options), integrations.TransformersInstrument(ctx.options),
             StepInstrument(ctx.options)]
    for inst in insts:
        inst.install(ctx)
    st = insts[-1]
    try:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
        model.eval()
        prompt = torch.randint(0, 64, (3, 10))
        for _ in range(2):
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                 min_new_tokens=5, do_sample=False, pad_token_id=0)
        assert out.shape == (3, 15)
        assert len(drain(st, ctx)) == 2  # each call's step ends when the call returns (issue 15)
        with torch.no_grad():
            model(prompt)  # a plain forward after generate: the second call's step ends
    finally:
        for inst in reversed(insts):
            inst.uninstall()
    steps = drain(st, ctx)
    assert [s.mode for s in steps] == ["infer"] * 3
    for s in steps[:2]:
        # prefill of 3×10 tokens, then 4 decode forwards of 3 tokens each (the 5th token needs none)
        assert (s.samples, s.tokens) == (3, 30 + 4 * 3)
        assert_phases_add_up(s)
    assert (steps[2].samples, steps[2].tokens) == (3, 30)


def test_patched_functions_carry_one_marker_and_inherited_ones_are_deleted_on_undo() -> None:
    from llmtop.agent.instruments import patching

    st = StepInstrument()
    st.install(Collect())
    try:
        assert "to" in torch.Tensor.__dict__  # ours, on the class that only inherited it
        assert patching.wrapped(torch.Tensor.to) is torch._C.TensorBase.to
        assert patching.wrapped(torch.autograd.backward) is not None
        assert not any(hasattr(torch.autograd.backward, m) for m in ("__llmtop_orig__",))
    finally:
        st.uninstall()
    assert "to" not in torch.Tensor.__dict__ and patching.wrapped(torch.Tensor.to) is None


def test_tracker_reaches_layers_and_generate_only_through_the_bus() -> None:
    # issue 14: no scan of BUS.step_end for the layers instrument, no lazy import of the HF integration
    import subprocess
    import sys

    code = ("import sys, torch; from llmtop.agent.instruments.steps import StepInstrument\n"
            "from tests.harness import Collect\n"
            "st = StepInstrument(); st.install(Collect()); st.uninstall()\n"
            "print(sorted(m for m in sys.modules if m.startswith('llmtop.agent.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__file__.rsplit("/tests/", 1)[0]).stdout
    assert "llmtop.agent.hf" not in out and "llmtop.agent.instruments.layers" not in out
    assert "llmtop.agent.instruments.patching" in out
    # what the layers instrument declares on the bus is what the step record carries
    ctx = Collect()
    st = StepInstrument(ctx.options)
    st.install(ctx)
    costs = core.BUS.costs
    saved = (costs.every, costs.of_step)
    costs.every, costs.of_step = 7, lambda step: 5000
    try:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with Roots():
            model(torch.ones(2, 8)).sum().backward()
            opt.step()
        steps = drain(st, ctx)
        assert costs.tracker_ns > 0  # the tracker's own cost, left for the layers instrument
    finally:
        costs.every, costs.of_step = saved
        st.uninstall()
    assert [(s.layer_every, s.overhead_us >= 5.0) for s in steps] == [(7, True)]


def _fast_loop(st: StepInstrument, ctx: Collect, n: int) -> None:
    """``n`` steps of a 0.1 ms loop (a tiny model forward each), no tick in between."""
    model = nn.Linear(4, 4)
    x = torch.ones(2, 4)
    ctx.manual_step()  # manual steps: the loop's boundaries, whatever the forward is
    with torch.no_grad():  # root calls are announced by the fixture's Roots
        for _ in range(n):
            model(x)
            ctx.manual_step()


def test_a_fast_loop_between_two_slow_ticks_loses_no_step(tracked) -> None:
    st, ctx = tracked
    n = 10_000  # 1 s of 0.1 ms steps: what LLMTOP_TICK=1.0 leaves between two ticks
    _fast_loop(st, ctx, n)
    steps = drain(st, ctx)
    assert [s.step for s in steps] == list(range(n))
    assert all(s.merged == 1 and s.samples == 2 for s in steps)


def test_steps_beyond_the_queue_are_folded_with_exact_count_and_totals(tracked) -> None:
    from llmtop.tui.session import diagnoses
    from llmtop.tui.session.model import SessionModel

    st, ctx = tracked
    st.done_max = 300  # the agent thread far behind: the rest is folded into running totals
    t0 = time.perf_counter_ns()
    _fast_loop(st, ctx, 1000)
    records = drain(st, ctx)
    assert [(s.step, s.merged) for s in records[-2:]] == [(299, 1), (999, 700)]
    assert sum(s.merged for s in records) == 1000
    assert sum(s.samples for s in records) == 2 * 1000
    total_ms = sum(s.dur_ms for s in records)
    assert total_ms <= (time.perf_counter_ns() - t0) / 1e6
    folded = records[-1]
    assert math.isclose(sum(folded.phases.values()), folded.dur_ms, rel_tol=1e-6)
    # a second batch after a poll: queued again one by one, numbering goes on
    _fast_loop(st, ctx, 10)
    more = drain(st, ctx)[len(records):]
    assert [(s.step, s.merged) for s in more] == [(s, 1) for s in range(1000, 1011)]
    # the viewer counts every step and says some arrived folded
    model = SessionModel()
    model.apply_all(drain(st, ctx))
    assert model.step_count == 1011 and model.steps_folded == 700
    assert any(d.what == "folded_steps" and "700" in d.text for d in diagnoses.diagnose(model))


def test_sequence_first_models_count_the_batch_on_dimension_1(tracked) -> None:
    st, ctx = tracked
    lstm = nn.LSTM(8, 8)  # batch_first=False
    enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with torch.no_grad():
        lstm(torch.randn(5, 3, 8))  # (seq, batch, feature)
        enc(torch.randn(3, 5, 8))  # (batch, seq, feature)
    assert [s.samples for s in drain(st, ctx)] == [3, 3]


def test_loss_modules_built_each_step_are_not_model_roots(tracked) -> None:
    st, ctx = tracked
    model = mlp()
    with torch.no_grad():
        for _ in range(3):
            out = model(torch.ones(2, 8))
            nn.MSELoss()(out, torch.zeros(2, 1))  # a new loss module each time, called on its own
    steps = drain(st, ctx)
    assert len(steps) == 3 and all(s.samples == 2 for s in steps)
