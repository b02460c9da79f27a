"""Per-step FLOPs of exactly the timed calls (StepFlops), decode FLOPs over the KV cache, the
sampled-forward fallback, and FLOP/s that never exceed the peak — on real tiny torch models."""

from __future__ import annotations

import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtop.agent.flops.roofline import Device  # noqa: E402
from llmtop.agent.flops.signatures import bucket_past  # noqa: E402
from llmtop.agent.instruments.flops_live import FlopsInstrument  # noqa: E402
from llmtop.agent.instruments.layers import LayersInstrument  # noqa: E402
from llmtop.agent.runtime import core  # noqa: E402
from llmtop.protocol.events import Event, LayerFlops, LayerStats, ModelTree, StepFlops  # noqa: E402
from llmtop.tui.session.model import SessionModel  # noqa: E402

from .harness import Collect, clean_bus  # noqa: E402, F401 (a fixture, used by pytestmark)

pytestmark = pytest.mark.usefixtures("clean_bus")

N_EMBD, N_LAYER, N_HEAD, VOCAB = 64, 2, 4, 500


def gpt2(attn: str = "eager") -> Any:
    cfg = transformers.GPT2Config(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, vocab_size=VOCAB,
                                  n_positions=256)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def rig(device: Any = None, **options: Any) -> tuple[Collect, LayersInstrument, FlopsInstrument]:
    """Layers (every step timed) and FLOPs instruments on one context, counting at every poll."""
    options.setdefault("layer_every", 1)
    ctx = Collect(**options)
    layers = LayersInstrument(ctx.options)
    layers.install(ctx)
    inst = FlopsInstrument(ctx.options, layers=layers)
    inst.device = device
    inst.min_interval_s = 0.0
    inst.install(ctx)
    return ctx, layers, inst


def end_step(step: int) -> None:
    for fn in list(core.BUS.step_end):
        fn(step, time.perf_counter_ns())


polled: list[Event] = []


@pytest.fixture(autouse=True)
def _fresh_polled() -> None:
    polled.clear()


def drain(ctx: Collect, layers: LayersInstrument, inst: FlopsInstrument, rounds: int = 40) -> list[Event]:
    """Poll both instruments until the FLOPs instrument has nothing left to count or sum; the events
    polled so far (``ctx.events`` holds what the instruments emitted directly: model trees)."""
    out: list[Event] = []
    for _ in range(rounds):
        out += layers.poll(time.time())
        out += inst.poll(time.time())
        if not inst._queue and not inst._pending and not inst._live_done:
            break
    polled.extend(out)
    return list(ctx.events) + polled


def matmul_params() -> int:
    """Weights that multiply each token: attention in/out projections, MLP, LM head (GPT-2 ties it)."""
    block = N_EMBD * 3 * N_EMBD + N_EMBD * N_EMBD + 2 * N_EMBD * 4 * N_EMBD
    return N_LAYER * block + N_EMBD * VOCAB


def decode_flops(past: int) -> float:
    """One new token: 2 x matmul params, plus QK^T and PV over past + 1 keys in every layer."""
    head_dim = N_EMBD // N_HEAD
    attention = N_LAYER * 2 * N_HEAD * (past + 1) * (head_dim + head_dim)
    return 2.0 * matmul_params() + attention


def by_path(events: list[Event]) -> dict[str, int]:
    tree = next(e for e in events if isinstance(e, ModelTree))
    return dict(zip(tree.paths, tree.ids, strict=True))


# --- generate: decode calls are counted with their own past length -----------------------------------


def test_bucket_past_is_bounded_and_close() -> None:
    assert [bucket_past(n) for n in (0, 1, 64, 65, 1024, 1025, 3000)] == [0, 64, 64, 128, 1024, 1152, 3072]
    assert len({bucket_past(n) for n in range(1, 32769)}) == 16 + 8 * 5  # bounded counts per generate
    assert all(n <= bucket_past(n) <= max(n + 63, n * 1.125) for n in range(1, 20000))


def test_generate_decode_calls_get_their_own_flops_over_the_kv_cache() -> None:
    ctx, layers, inst = rig(device=Device("test", "test device", {"fp32": 1e15}, 1e12))
    prompt, new = 60, 10  # decode past lengths 60…68: two buckets (64, 128)
    try:
        model = gpt2().eval()
        out = model.generate(torch.randint(0, VOCAB, (1, prompt)), max_new_tokens=new, do_sample=False,
                             pad_token_id=0)
        end_step(1)  # the whole generate call is one inference step
        events = drain(ctx, layers, inst)
    finally:
        inst.uninstall()
        layers.uninstall()
    assert out.shape == (1, prompt + new)
    assert ctx.warnings == []
    paths = by_path(events)
    root = paths[""]
    counted = {e.signature: dict(zip(e.ids, e.flops, strict=True)) for e in events if isinstance(e, LayerFlops)}
    decodes = {sig: f for sig, f in counted.items() if "input_ids:1x1:int64" in sig}
    assert len(decodes) == 2, list(counted)
    for sig, flops in decodes.items():
        past = 64 if "past≤64" in sig else 128
        assert f"past≤{past}" in sig
        # independent: 2 x params-in-matmuls x 1 token + attention over the (bucketed) cache
        assert flops[root] == pytest.approx(decode_flops(past))
        # a decode block is a small fraction of a prefill block, not the prefill's figure
        prefill = next(f for s, f in counted.items() if f"input_ids:1x{prompt}:int64" in s)
        block = paths["transformer.h.0"]
        assert flops[block] < prefill[block] / 20
    (step,) = [e for e in events if isinstance(e, StepFlops)]
    assert step.step == 1 and step.note == "" and step.method == "meta"
    prefill_root = next(f for s, f in counted.items() if f"input_ids:1x{prompt}:int64" in s)[root]
    expected = prefill_root + sum(decode_flops(bucket_past(p)) for p in range(prompt, prompt + new - 1))
    assert step.fwd_flops == pytest.approx(expected)
    assert step.flops_total == step.fwd_flops  # no grad: no backward counted
    assert dict(zip(step.roots, step.root_calls, strict=True)) == {root: new}
    # against the real past lengths, bucketing adds at most the 64-token rounding of the cache
    real = prefill_root + sum(decode_flops(p) for p in range(prompt, prompt + new - 1))
    assert real <= step.fwd_flops <= real + (new - 1) * decode_flops(63) - (new - 1) * decode_flops(0)


# --- training: FLOP/s from the same calls, never above the peak the agent uses ---------------------


def test_training_run_flops_per_layer_and_per_step_stay_below_the_agents_peak() -> None:
    ctx, layers, inst = rig()  # the real CPU device: its measured peak
    try:
        model = gpt2(attn="sdpa").train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        for step in range(1, 9):
            ids = torch.randint(0, VOCAB, (4, 32), generator=gen)
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 2 == 0:  # an eval forward of another shape inside the same step
                model.eval()
                with torch.no_grad():
                    model(torch.randint(0, VOCAB, (1, 100), generator=gen))
                model.train()
            end_step(step)
            if step == 1:
                drain(ctx, layers, inst)  # counts start while the run goes on
        events = drain(ctx, layers, inst)
    finally:
        inst.uninstall()
        layers.uninstall()
    assert ctx.warnings == []
    counted = [e for e in events if isinstance(e, LayerFlops)]
    peak = counted[0].peak_flops
    assert peak and peak > 0
    paths = by_path(events)
    root = paths[""]
    sig_root = {e.signature: dict(zip(e.ids, e.flops, strict=True))[root] for e in counted}
    train_root = next(f for s, f in sig_root.items() if s.startswith("4x32:int64"))
    eval_root = next(f for s, f in sig_root.items() if s.startswith("1x100:int64"))
    steps = {e.step: e for e in events if isinstance(e, StepFlops)}
    assert sorted(steps) == list(range(1, 9))
    for n, e in steps.items():
        # exactly this step's calls: the training forward, plus the eval forward on even steps
        assert e.fwd_flops == pytest.approx(train_root + (eval_root if n % 2 == 0 else 0.0))
        assert e.flops_total == pytest.approx(3 * e.fwd_flops)  # backward counted as twice forward
        assert e.note == "" and e.achieved_flops is not None and e.mfu is not None
        assert 0 < e.achieved_flops <= peak and 0 < e.mfu <= 1
    # the viewer joins the per-module FLOPs to the same step's forward times
    model_view = SessionModel()
    model_view.apply_all(events)
    stats = {e.step: e for e in events if isinstance(e, LayerStats)}
    last = max(steps)
    fwd = dict(zip(stats[last].ids, stats[last].fwd_ms, strict=True))
    checked = 0
    for layer in model_view.layers.values():
        value = layer.achieved_flops
        if layer.step_flops and layer.id in fwd:
            assert layer.step_flops_step == last
            assert value == pytest.approx(layer.step_flops / (fwd[layer.id] / 1000.0)) or (
                value is None and "peak" in layer.achieved_note)
        if value is not None:
            assert value <= peak
            checked += 1
    assert checked >= 10  # linear layers, blocks and the root all have a figure
    assert model_view.mfu == steps[last].mfu and model_view.achieved_flops == steps[last].achieved_flops


def test_a_figure_above_the_peak_is_shown_as_unknown_with_the_reason() -> None:
    ctx, layers, inst = rig(device=Device("slow", "slow device", {"fp32": 1e3}, 1e3))  # 1 kFLOP/s
    try:
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
        with torch.no_grad():
            for step in range(1, 4):
                model(torch.randn(8, 64))
                end_step(step)
                drain(ctx, layers, inst)
        events = drain(ctx, layers, inst)
    finally:
        inst.uninstall()
        layers.uninstall()
    steps = [e for e in events if isinstance(e, StepFlops)]
    assert steps and all(e.achieved_flops is None and e.mfu is None and "exceed" in e.note for e in steps)
    assert all(e.fwd_flops == 2 * 8 * 64 * 256 * 2 for e in steps)
    view = SessionModel()
    view.apply_all(events)
    linear = view.layers[by_path(events)["0"]]
    assert linear.step_flops == 2 * 8 * 64 * 256
    assert linear.achieved_flops is None and "peak" in linear.achieved_note


# --- a model the meta copy cannot run: one real sampled forward is counted ------------------------


class Routed(torch.nn.Module):
    """Picks a path from its data (a Python branch on a value, as routers and kernel dispatchers
    do): on meta tensors there is no value to read, so the meta copy cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(32, 64)
        self.drop = torch.nn.Dropout(0.5)
        self.down = torch.nn.Linear(64, 32)

    def forward(self, x: Any) -> Any:
        h = self.drop(torch.relu(self.up(x)))
        if float(h.detach().sum()) >= 0:  # always true here; a real branch on data
            return self.down(h)
        return h[..., :32]


def run_routed(with_agent: bool) -> tuple[list[Any], list[Event], list[str]]:
    """A few training steps; returns the per-step losses and gradients, and the events."""
    torch.manual_seed(3)
    model = Routed().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    results: list[Any] = []
    ctx = layers = inst = None
    if with_agent:
        ctx, layers, inst = rig(device=Device("test", "test device", {"fp32": 1e15}, 1e12))
    try:
        for step in range(1, 6):
            x = torch.randn(16, 32)
            loss = model(x).pow(2).mean()
            loss.backward()
            results.append((loss.detach().clone(), model.up.weight.grad.clone(), torch.rand(1)))
            opt.step()
            opt.zero_grad()
            if with_agent:
                end_step(step)
                drain(ctx, layers, inst)
        events = drain(ctx, layers, inst) if with_agent else []
    finally:
        if with_agent:
            inst.uninstall()
            layers.uninstall()
    return results, events, [str(w) for w in ctx.warnings] if with_agent else []


def test_a_model_that_cannot_run_on_meta_is_counted_on_one_real_forward_without_changing_it() -> None:
    plain, _, _ = run_routed(False)
    seen, events, warnings = run_routed(True)
    for (l0, g0, r0), (l1, g1, r1) in zip(plain, seen, strict=True):
        assert torch.equal(l0, l1) and torch.equal(g0, g1) and torch.equal(r0, r1)  # same bytes, same RNG
    assert any("on meta failed" in w and "real forward" in w for w in warnings)
    (counted,) = [e for e in events if isinstance(e, LayerFlops)]
    assert counted.method == "sampled-forward"
    paths = by_path(events)
    flops = dict(zip(counted.ids, counted.flops, strict=True))
    assert flops[paths["up"]] == 2 * 16 * 32 * 64 and flops[paths["down"]] == 2 * 16 * 64 * 32
    assert flops[paths[""]] == flops[paths["up"]] + flops[paths["down"]]
    steps = [e for e in events if isinstance(e, StepFlops)]
    assert steps and steps[-1].method == "sampled-forward" and steps[-1].note == ""
    assert steps[-1].fwd_flops == flops[paths[""]] and steps[-1].flops_total == 3 * flops[paths[""]]
    # no counting mode is left behind on the script's thread
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    assert _get_current_dispatch_mode() is None


# --- the HF Trainer on a model kernelized by the `kernels` package ----------------------------------


def test_trainer_on_a_kernelized_model_is_counted_on_meta() -> None:
    pytest.importorskip("kernels")
    ctx, layers, inst = rig(device=Device("test", "test device", {"fp32": 1e15}, 1e12))
    try:
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        model.set_use_kernels(True)  # what from_pretrained does when `kernels` is installed
        assert model.use_kernels

        class Data(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return 24

            def __getitem__(self, i: int) -> dict:
                ids = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(i))
                return {"input_ids": ids, "labels": ids}

        class Ends(transformers.TrainerCallback):
            """Ends llmtop steps where the Trainer ends its steps (the step tracker's job in a real run)."""

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                end_step(state.global_step)
                drain(ctx, layers, inst)

        import tempfile

        with tempfile.TemporaryDirectory() as out:
            args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=5,
                                                  report_to=[], save_strategy="no", use_cpu=True,
                                                  disable_tqdm=True, logging_strategy="no")
            transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Ends()]).train()
        events = drain(ctx, layers, inst)
    finally:
        inst.uninstall()
        layers.uninstall()
    assert ctx.warnings == []  # the meta copy ran: no "Unsupported device type 'meta'"
    counted = [e for e in events if isinstance(e, LayerFlops)]
    assert counted and all(e.method == "meta" for e in counted)
    paths = by_path(events)
    (ev,) = counted
    head = dict(zip(ev.ids, ev.flops, strict=True))[paths["lm_head"]]
    assert head == 2 * 4 * 16 * 64 * VOCAB
    steps = [e for e in events if isinstance(e, StepFlops)]
    assert steps and all(e.note == "" and e.flops_total == 3 * e.fwd_flops for e in steps)
