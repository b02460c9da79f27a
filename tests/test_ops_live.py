"""Live instruments: aten-op windows (OpsInstrument) and per-layer FLOPs (FlopsInstrument) on CPU."""

from __future__ import annotations

import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtop.agent.flops import counting as F  # noqa: E402
from llmtop.agent.flops.roofline import Device  # noqa: E402
from llmtop.agent.flops.signatures import describe, signature  # noqa: E402
from llmtop.agent.instruments.flops_live import FlopsInstrument  # noqa: E402
from llmtop.agent.instruments.layers import LayersInstrument  # noqa: E402
from llmtop.agent.instruments.ops import OpsInstrument  # noqa: E402
from llmtop.agent.runtime import core  # noqa: E402
from llmtop.protocol.events import Event, LayerFlops, LayerStats, ModelTree, Ops  # noqa: E402
from llmtop.protocol.stream import Connection  # noqa: E402

from .conftest import LLMTOP, child_env  # noqa: E402
from .harness import Collect, clean_bus  # noqa: E402, F401 (a fixture, used by pytestmark)

pytestmark = pytest.mark.usefixtures("clean_bus")


def end_step(step: int) -> None:
    for fn in list(core.BUS.step_end):
        fn(step, time.perf_counter_ns())


def tiny_gpt2() -> Any:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=128)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def flops_rig(peaks: dict[str, float] | None = None, **options: Any) -> tuple[Collect, LayersInstrument, FlopsInstrument]:
    """The layers and FLOPs instruments installed on one context, on a test device, counting at once."""
    ctx = Collect(**options)
    layers = LayersInstrument(ctx.options)
    layers.install(ctx)
    inst = FlopsInstrument(ctx.options, layers=layers)
    inst.device = Device("test", "test device", peaks or {"fp32": 1e12}, 1e11)
    inst.min_interval_s = 0.0
    inst.install(ctx)
    return ctx, layers, inst


# --- FlopsInstrument ----------------------------------------------------------------------------------


def test_layer_flops_once_per_signature_joined_to_module_ids() -> None:
    ctx, layers, inst = flops_rig()
    try:
        model = tiny_gpt2()
        ids16 = torch.randint(0, 500, (2, 16))
        with torch.no_grad():
            for _ in range(3):
                model(ids16)
            model(torch.randint(0, 500, (2, 24)))
        events = inst.poll(time.time())  # one count per tick
        assert len(events) == 1
        events += inst.poll(time.time())
        events += inst.poll(time.time())  # nothing new: same signatures
    finally:
        inst.uninstall()
        layers.uninstall()
    layer_flops = [e for e in events if isinstance(e, LayerFlops)]
    assert len(layer_flops) == 2 and inst.computed == 2
    assert "2x16:int64" in layer_flops[0].signature and "2x24:int64" in layer_flops[1].signature
    trees = [e for e in ctx.events if isinstance(e, ModelTree)]
    assert len(trees) == 1  # the meta copy run on this thread was not taken for a new model
    by_path = dict(zip(trees[0].paths, trees[0].ids, strict=True))
    ev = layer_flops[0]
    flops = dict(zip(ev.ids, ev.flops, strict=True))
    nbytes = dict(zip(ev.ids, ev.bytes, strict=True))
    assert set(ev.ids) <= set(trees[0].ids)
    assert flops[by_path["lm_head"]] == 2 * 2 * 16 * 64 * 500
    # the whole model matches a direct count on meta tensors of the same shapes
    with torch.device("meta"):
        ref_model = transformers.GPT2LMHeadModel(model.config).eval()
    ref = F.count(ref_model, (torch.zeros(2, 16, dtype=torch.long, device="meta"),))
    assert flops[by_path[""]] == pytest.approx(ref.flops)
    assert nbytes[by_path["transformer.h.0.mlp.c_fc"]] > 64 * 256 * 4  # at least its weights
    assert ev.peak_flops == 1e12 and ev.peak_bw == 1e11 and ev.device == "test device"
    assert ctx.warnings == []


def test_generate_decode_steps_are_counted_once_without_warnings() -> None:
    ctx, layers, inst = flops_rig()
    try:
        model = tiny_gpt2()
        with torch.no_grad():
            model.generate(torch.randint(0, 500, (1, 5)), max_new_tokens=6, do_sample=False,
                           pad_token_id=0)
        events = [e for _ in range(8) for e in inst.poll(time.time())]
    finally:
        inst.uninstall()
        layers.uninstall()
    assert ctx.warnings == []
    decode = [e for e in events if isinstance(e, LayerFlops) and "input_ids:1x1:int64" in e.signature]
    assert len(decode) == 1  # every decode step has the same signature
    tree = next(e for e in ctx.events if isinstance(e, ModelTree))
    head = dict(zip(decode[0].ids, decode[0].flops, strict=True))[tree.ids[tree.paths.index("lm_head")]]
    assert head == 2 * 1 * 64 * 500  # one new token through the LM head


def test_timing_switched_on_during_the_count_does_not_take_the_copy_for_a_model() -> None:
    ctx, layers, inst = flops_rig()

    class Toggles(torch.nn.Module):
        """On meta (the agent's count) it switches per-layer timing off and on mid-forward, as
        sampling does."""

        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)

        def forward(self, x):
            x = self.a(x)
            if x.device.type == "meta":
                layers._timing_off()
                layers._timing_on()
            return self.b(x)

    try:
        model = Toggles()
        for _ in range(2):
            model(torch.randn(2, 8))
        events = [e for _ in range(3) for e in inst.poll(time.time())]
    finally:
        inst.uninstall()
        layers.uninstall()
    assert len([e for e in events if isinstance(e, LayerFlops)]) == 1
    assert len([e for e in ctx.events if isinstance(e, ModelTree)]) == 1
    assert ctx.warnings == []


def test_count_between_unsampled_steps_leaves_per_layer_timing_alone() -> None:
    ctx, layers, inst = flops_rig(layer_every=3)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
        model(torch.randn(4, 8))
        end_step(1)  # step 2 is not sampled: per-layer timing is off (roots.py sees root calls)
        model(torch.randn(4, 8))
        nnm = torch.nn.modules.module
        assert layers._rc.each is None
        events = [e for _ in range(3) for e in inst.poll(time.time())]
        # The count on this thread neither switched per-layer timing on nor put torch hooks in …
        assert layers._rc.each is None
        assert not nnm._global_forward_pre_hooks and not nnm._global_forward_hooks
        # … and the next sampled step is still measured, module by module.
        end_step(2)
        model(torch.randn(4, 8))
        end_step(3)
        stats = [e for e in layers.poll(time.time()) if isinstance(e, LayerStats)]
    finally:
        inst.uninstall()
        layers.uninstall()
    assert len([e for e in events if isinstance(e, LayerFlops)]) == 1
    assert len([e for e in ctx.events if isinstance(e, ModelTree)]) == 1
    assert ctx.warnings == []
    ids = layers.module_ids()
    (last,) = [s for s in stats if s.step == 3]
    assert dict(zip(last.ids, last.calls, strict=True)) == {ids[m]: 1 for m in model.modules()}


def test_wrapped_model_is_counted_through_its_wrapper() -> None:
    ctx, layers, inst = flops_rig()
    try:
        model = torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()))
        for _ in range(2):
            model(torch.randn(4, 8))
        events = [e for _ in range(3) for e in inst.poll(time.time())]
    finally:
        inst.uninstall()
        layers.uninstall()
    assert ctx.warnings == []
    (ev,) = events
    tree = next(e for e in ctx.events if isinstance(e, ModelTree))
    flops = dict(zip(ev.ids, ev.flops, strict=True))
    by_path = dict(zip(tree.paths, tree.ids, strict=True))
    assert flops[by_path[""]] == flops[by_path["module"]] == flops[by_path["module.0"]] == 2 * 4 * 8 * 16


def test_autocast_is_part_of_the_signature_and_sets_the_dtype() -> None:
    ctx, layers, inst = flops_rig(peaks={"fp32": 1e12, "bf16": 4e12})
    try:
        model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        x = torch.randn(4, 64)
        model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        events = [e for _ in range(4) for e in inst.poll(time.time())]
    finally:
        inst.uninstall()
        layers.uninstall()
    assert [e.peak_flops for e in events] == [1e12, 4e12]
    assert "autocast:bfloat16" in events[1].signature
    assert events[0].flops == events[1].flops
    assert events[1].bytes[0] == events[0].bytes[0] / 2  # the same traffic in 2-byte elements


def test_no_count_starts_while_the_agent_stops() -> None:
    ctx, layers, inst = flops_rig()
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
        for _ in range(2):
            model(torch.randn(4, 8))
        ctx.stopping = True
        assert inst.poll(time.time()) == [] and inst.computed == 0
        ctx.stopping = False  # (an agent does not come back; this shows the signature was queued)
        assert len(inst.poll(time.time())) == 1 and inst.computed == 1
    finally:
        inst.uninstall()
        layers.uninstall()


def test_no_ops_window_is_opened_or_summarized_while_the_agent_stops() -> None:
    ctx = Collect(ops_every=3)
    inst = OpsInstrument(ctx.options)
    inst.install(ctx)
    model = torch.nn.Linear(8, 8)
    try:
        model(torch.randn(2, 8))
        end_step(1)  # opens the early window (step 2)
        model(torch.randn(2, 8))
        ctx.stopping = True
        end_step(2)  # closes it; step 3's window is not opened
        assert inst.windows == 1
        assert inst.poll(time.time()) == []  # its trace is dropped, not summarized
        model(torch.randn(2, 8))
        end_step(3)
        assert inst.windows == 1 and inst.poll(time.time()) == []
    finally:
        inst.uninstall()


def test_signature_captures_shapes_not_tensors() -> None:
    x = torch.ones(3, 5)
    sig = signature((x,), {"mask": torch.ones(3, 5, dtype=torch.bool), "flag": True, "cache": object()})
    assert x not in [v for part in sig[:2] for v in part]  # no reference to the tensor itself
    assert describe(sig) == "3x5:float32 mask:3x5:bool flag:True cache:object"
    assert signature((torch.zeros(3, 5),), {}) == signature((x,), {})


# --- OpsInstrument ------------------------------------------------------------------------------------


def test_ops_window_one_step_in_n_with_real_aten_names() -> None:
    ctx = Collect(ops_every=3, budget_pct=1e9)  # a budget that never binds: exactly one step in N
    inst = OpsInstrument(ctx.options)
    inst.install(ctx)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 32)
    events: list[Event] = []
    try:
        for step in range(1, 8):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            end_step(step)
            events += inst.poll(time.time())  # the agent thread's tick
    finally:
        inst.uninstall()
    ops = [e for e in events if isinstance(e, Ops)]
    # windows: step 2 (the early one), then 4 (step 3's was due while step 2's was unread: it
    # opens at the first step end after its reading) and 6 (every 3rd)
    assert [e.step for e in ops] == [2, 4, 6]
    ev = ops[-1]
    assert len(ev.names) == len(ev.self_ms) == len(ev.calls) == len(ev.flops) == len(ev.shapes)
    assert all(n.startswith("aten::") for n in ev.names)
    assert ev.self_ms == sorted(ev.self_ms, reverse=True)
    rows = dict(zip(zip(ev.names, ev.shapes, strict=True), ev.flops, strict=True))
    assert rows[("aten::addmm", "64; 16x32; 32x64")] == 2 * 16 * 32 * 64  # first Linear's forward
    assert 0 < ev.coverage <= 1
    assert sum(ev.flops) > 0
    assert ctx.warnings == []


def test_cpu_window_read_from_raw_events_matches_torchs_parse() -> None:
    """The fast path (raw profiler events, our own self-time sweep) gives what torch's
    FunctionEvent parse gives, on a real GPT-2 training step: same ops, calls, shapes, FLOPs and
    self times, nested same-name ops (an overload calling another) counted once, as torch does."""
    from llmtop.agent.instruments.ops import cpu_op_rows, summarize, summarize_window
    from torch.autograd import profiler

    model = tiny_gpt2().train()
    ids = torch.randint(0, 500, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    prof = profiler.profile(record_shapes=True, use_kineto=False)
    prof.__enter__()
    try:
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        prof.__exit__(None, None, None)
    assert cpu_op_rows(prof.kineto_results.events()) is not None  # a CPU window: the fast path
    fast = summarize_window(prof, 5, top_k=1000)
    slow = summarize(prof.function_events, 5, top_k=1000)
    assert len(fast.names) > 20
    by_key = lambda ev: {(n, sh): (ms, c, fl) for n, sh, ms, c, fl in  # noqa: E731
                         zip(ev.names, ev.shapes, ev.self_ms, ev.calls, ev.flops, strict=True)}
    f, s = by_key(fast), by_key(slow)
    assert f.keys() == s.keys()
    for key, (ms, calls, flops) in f.items():
        assert calls == s[key][1], key
        assert flops == s[key][2], key
        assert ms == pytest.approx(s[key][0], abs=1e-6), key
    assert fast.coverage == pytest.approx(slow.coverage)


def test_raw_rows_refuse_a_window_with_device_events() -> None:
    """Device time needs torch's matching of kernels to ops: the fast path declines the window."""
    class Raw:  # a raw profiler event as torch exposes it, from a GPU window
        def __init__(self, device: str) -> None:
            self.device = device

        def device_type(self) -> Any:
            return type("DeviceType", (), {"name": self.device})()

        def is_async(self) -> bool:
            return False

        def start_thread_id(self) -> int:
            return 1

        def start_ns(self) -> int:
            return 1000

        def duration_ns(self) -> int:
            return 500

        def name(self) -> str:
            return "aten::mm"

    from llmtop.agent.instruments.ops import cpu_op_rows

    assert cpu_op_rows([Raw("CPU"), Raw("CUDA")]) is None


def test_ops_windows_keep_within_their_share_of_the_budget() -> None:
    """On short steps, one step in N would profile many times a second: each window waits until
    the previous one's measured cost (profiled step + parsing its trace) fits the budget share."""
    ctx = Collect(ops_every=1, budget_pct=40.0)  # generous, so that several windows open
    inst = OpsInstrument(ctx.options)
    inst.install(ctx)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(16, 32)
    steps = 0
    try:
        while inst.windows < 5 and steps < 50_000:  # run until several windows have opened
            steps += 1
            model(x).square().mean().backward()
            end_step(steps)
            inst.poll(time.time())
    finally:
        inst.uninstall()
    windows = list(inst.costs)
    assert inst.windows == 5 and steps > 20  # without the budget, five windows open by step 6
    assert all(cost > 0 for _, cost in windows)
    # every window after the early one opened only once the previous one's cost fitted the share
    for (start0, cost0), (start1, _) in zip(windows[1:], windows[2:], strict=False):
        assert start1 - start0 >= cost0 / inst.share


def test_uninstall_from_another_thread_stops_the_window_on_its_own_thread() -> None:
    import threading

    ctx = Collect(ops_every=2)
    inst = OpsInstrument(ctx.options)
    inst.install(ctx)
    end_step(1)  # opens the window for step 2 on this thread
    assert torch.autograd._profiler_enabled()
    t = threading.Thread(target=inst.uninstall)
    t.start()
    t.join()
    assert torch.autograd._profiler_enabled()  # not touched from the other thread
    end_step(2)
    assert not torch.autograd._profiler_enabled()
    assert inst._on_step_end not in core.BUS.step_end


# --- end to end: a real script under `llmtop attach --headless` -------------------------------------

SCRIPT = textwrap.dedent("""
    import os, time
    import torch
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 500, (4, 32))
    for step in range(2000):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(0.002)
        if step > 10 and os.path.exists("enough"):
            break
    print("done", flush=True)
""")


@pytest.mark.slow
def test_attached_script_streams_ops_and_layer_flops(short_tmp: Path) -> None:
    (short_tmp / "train.py").write_text(SCRIPT)
    sock = short_tmp / "a.sock"
    env = child_env(LLMTOP_SOCKET=str(sock), LLMTOP_TICK="0.1", LLMTOP_OPS_EVERY="5",
                    XDG_CACHE_HOME=str(short_tmp / "cache"))
    proc = subprocess.Popen([LLMTOP, "attach", "--headless", "train.py"], cwd=short_tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got: dict[type, list[Event]] = {Ops: [], LayerFlops: [], ModelTree: []}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = Connection(sock, timeout=10)
                break
            except ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        for ev in conn.events():
            if type(ev) in got:
                got[type(ev)].append(ev)
            if got[Ops] and got[LayerFlops]:
                break
        conn.close()
    finally:
        (short_tmp / "enough").write_text("")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "profiler_start" not in err and out == "done\n"
    ops = got[Ops][0]
    assert any(n in ("aten::addmm", "aten::mm") for n in ops.names)
    lf = got[LayerFlops][0]
    tree = got[ModelTree][0]
    assert set(lf.ids) <= set(tree.ids)
    root = dict(zip(lf.ids, lf.flops, strict=True))[tree.ids[tree.paths.index("")]]
    assert root > 2 * 4 * 32 * 64 * 500  # at least the LM head
    assert lf.peak_flops and lf.peak_bw  # the calibrated CPU
