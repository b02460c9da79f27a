"""The transformers integration: loading, tokenizing, pipelines, generation, Trainer, autocast.

Two kinds of test. In-process ones install ``TransformersInstrument`` with a small collecting context
and compare what it reports with what the test measures itself (forward times, tokenizer output,
``trainer.state.log_history``). Child-process ones run the shipped examples under the real
``llmtop attach --headless --record`` and read the recording.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from llmtop.agent.hf import instrument as integ
from llmtop.agent.hf import tokenizers as tokenizing
from llmtop.agent.hf.generate import cache_nbytes
from llmtop.agent.hf.tokenizers import SPANS_PER_TICK, token_counts
from llmtop.protocol.events import AgentWarning, Generation, Metric, Span, Step
from llmtop.protocol.formulas import percentile
from llmtop.protocol.recording import RecordingReader

from .conftest import LLMTOP, ROOT, child_env

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from .harness import Collect  # noqa: E402

sys.path.insert(0, str(ROOT / "examples"))
import hf_local  # noqa: E402
import tinylib  # noqa: E402

EXAMPLES = ROOT / "examples"


@pytest.fixture
def ctx() -> Any:
    c = Collect()
    inst = integ.TransformersInstrument(c.options)
    inst.install(c)
    c.instrument = inst  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        inst.uninstall()


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = tinylib.tiny_gpt_config(n_layer=2, n_embd=32, n_head=2, n_positions=128)
    return hf_local.save_model(transformers.GPT2LMHeadModel(config), hf_local.gpt_tokenizer_dir(),
                               tmp_path_factory.mktemp("gpt"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=2048, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64, num_labels=3)
    return hf_local.save_model(transformers.BertForSequenceClassification(config),
                               hf_local.bert_tokenizer_dir(), tmp_path_factory.mktemp("bert"))


# --- generation -----------------------------------------------------------------------------------


def test_generation_latencies_agree_with_the_models_forward_times(ctx: Collect, gpt_dir: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(gpt_dir)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    enc = tok(["a quiet harbour", "the engineers walked to the mill"], return_tensors="pt", padding=True)

    # The test's own forward timing, registered before the instrument's hooks (so it runs first
    # on entry and first on exit: each of its forwards lies inside the instrument's intervals).
    starts: list[int] = []
    ends: list[int] = []
    model.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter_ns()))
    model.register_forward_hook(lambda m, a, o: ends.append(time.perf_counter_ns()))
    new = 9
    out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=tok.pad_token_id)

    (gen,) = ctx.of(Generation)
    prompt = enc["input_ids"].shape[1]
    assert (gen.batch, gen.prompt_tokens, gen.new_tokens) == (2, prompt, out.shape[1] - prompt) == (2, prompt, new)
    assert len(starts) == len(ends) == new  # one prefill forward, then one forward per further token
    fwd_ms = [(e - s) / 1e6 for s, e in zip(starts, ends, strict=True)]
    assert len(gen.decode_ms) == new - 1
    assert gen.ttft_ms >= fwd_ms[0]  # time to first token holds the whole prefill forward
    for j, lat in enumerate(gen.decode_ms):
        # Token j+2 is ready when forward j+1 ends: the latency holds that whole forward …
        assert lat >= fwd_ms[j + 1], f"decode step {j} shorter than its forward"
        # … and lies between the end of forward j and the start of forward j+2.
        if j + 2 < new:
            assert lat <= (starts[j + 2] - ends[j]) / 1e6
    assert gen.ttft_ms + sum(gen.decode_ms) <= gen.total_ms
    # KV cache: keys and values, per layer, batch × heads × positions × head_dim floats.
    cfg = model.config
    positions = prompt + new - 1  # the last token's keys are never computed
    assert gen.kv_bytes == 2 * cfg.n_layer * 2 * cfg.n_head * positions * (cfg.n_embd // cfg.n_head) * 4

    (g,) = ctx.spans("generate")
    (pre,) = ctx.spans("prefill")
    (dec,) = ctx.spans("decode")
    assert (pre.attrs["phase"], dec.attrs["phase"]) == ("prefill", "decode")
    assert pre.depth == dec.depth == g.depth + 1
    assert dec.attrs["steps"] == new - 1 and g.attrs["forwards"] == new
    assert pre.attrs["kv_bytes"] == gen.kv_bytes * prompt // positions


def test_generation_phase_is_visible_to_other_instruments(ctx: Collect, gpt_dir: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt_dir).eval()
    seen: list[str | None] = []
    model.register_forward_pre_hook(lambda m, a: seen.append(integ.generation_phase()))
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                   pad_token_id=0)
    model(torch.tensor([[5, 6]]))
    assert seen == ["prefill", "decode", "decode", "decode", None]


def test_generate_leaves_the_model_picklable(ctx: Collect, gpt_dir: Path) -> None:
    import copy
    import io
    import pickle

    model = transformers.AutoModelForCausalLM.from_pretrained(gpt_dir).eval()
    before = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    for _ in range(2):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                       pad_token_id=0)
    # Whole-model saving, pickling and copying work as they would without llmtop …
    torch.save(model, io.BytesIO())
    clone = pickle.loads(pickle.dumps(model))
    copy.deepcopy(model)
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == before
    assert not clone._forward_pre_hooks and not clone._forward_hooks
    # … and each call was still timed: time to first token and three decode latencies.
    gens = ctx.of(Generation)
    assert len(gens) == 2 and all(len(g.decode_ms) == 3 and g.ttft_ms > 0 for g in gens)


# --- tokenization ---------------------------------------------------------------------------------


def test_token_counts_equal_the_tokenizers_output(ctx: Collect, bert_dir: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(bert_dir)
    texts = ["short one", "a somewhat longer sentence about the river and the mill",
             "the old harbour was quiet when the boats came back in the evening light", "x"]
    plain = [len(ids) for ids in tok(texts)["input_ids"]]  # lengths before truncation
    ctx.events.clear()

    out = tok(texts, padding=True, truncation=True, max_length=10)
    (s,) = ctx.spans("tokenize")
    mask = out["attention_mask"]
    assert s.category == "text_preprocessing"
    assert s.attrs["texts"] == len(texts)
    assert s.attrs["tokens"] == sum(len(ids) for ids in out["input_ids"])
    assert s.attrs["pad_tokens"] == sum(row.count(0) for row in mask)
    assert s.attrs["padding_share"] == pytest.approx(s.attrs["pad_tokens"] / s.attrs["tokens"])
    assert s.attrs["truncated"] == sum(n > 10 for n in plain) == 2
    assert s.attrs["tokens_per_s"] > 0

    ctx.events.clear()
    pt = tok(texts, padding="longest", return_tensors="pt")
    ids = tok.encode("one more line of text")
    a, b = ctx.spans("tokenize")
    assert a.attrs["tokens"] == pt["input_ids"].numel()
    assert a.attrs["pad_tokens"] == int((pt["attention_mask"] == 0).sum())
    assert "truncated" not in a.attrs  # not asked to truncate: not counted
    assert (b.attrs["texts"], b.attrs["tokens"]) == (1, len(ids))


def test_many_small_tokenizer_calls_are_summed_not_lost(ctx: Collect, bert_dir: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(bert_dir)
    ctx.events.clear()
    n = SPANS_PER_TICK + 25
    expected = sum(len(tok(f"sentence number {i} of the batch")["input_ids"]) for i in range(n))
    ctx.events.extend(ctx.instrument.poll(time.time()))  # type: ignore[attr-defined]
    spans = ctx.spans("tokenize")
    assert len(spans) == SPANS_PER_TICK + 1
    assert spans[-1].attrs["summed"] is True and spans[-1].attrs["calls"] == 25
    assert sum(s.attrs["calls"] for s in spans) == n
    assert sum(s.attrs["tokens"] for s in spans) == expected


# --- loading --------------------------------------------------------------------------------------


def test_every_from_pretrained_on_a_local_directory_is_a_span(ctx: Collect, gpt_dir: Path) -> None:
    d = str(gpt_dir)
    calls = [
        ("config", "AutoConfig", lambda: transformers.AutoConfig.from_pretrained(d)),
        ("config", "GPT2Config", lambda: transformers.GPT2Config.from_pretrained(d)),
        ("tokenizer", "AutoTokenizer", lambda: transformers.AutoTokenizer.from_pretrained(d)),
        # An alias of TokenizersBackend in transformers 5: the span names the class really called.
        ("tokenizer", transformers.PreTrainedTokenizerFast.__name__,
         lambda: transformers.PreTrainedTokenizerFast.from_pretrained(d)),
        ("model", "AutoModelForCausalLM", lambda: transformers.AutoModelForCausalLM.from_pretrained(d)),
        ("model", "GPT2LMHeadModel",
         lambda: transformers.GPT2LMHeadModel.from_pretrained(d, dtype=torch.bfloat16)),
    ]
    for what, called, load in calls:
        ctx.events.clear()
        obj = load()
        top = [s for s in ctx.spans(category="model_loading") if s.depth == 0]
        assert [(s.name, s.attrs["what"], s.attrs["name"]) for s in top] == [
            (f"{called}.from_pretrained", what, d)], called
        attrs = top[0].attrs
        assert attrs["class"] == type(obj).__name__
        assert attrs["load_ms"] == pytest.approx(top[0].dur_ms)
        if what == "model":
            assert attrs["params"] == sum(p.numel() for p in obj.parameters())
            assert attrs["dtype"] == str(obj.dtype).removeprefix("torch.")
            assert attrs["device_map"] == "cpu"
            assert isinstance(attrs["rss_added"], int)
    assert attrs["requested_dtype"] == attrs["dtype"] == "bfloat16"


def test_a_failing_load_is_reported_and_raises_unchanged(ctx: Collect, tmp_path: Path) -> None:
    with pytest.raises(OSError) as err:
        transformers.AutoConfig.from_pretrained(str(tmp_path / "missing"))
    assert "missing" in str(err.value)
    (s,) = ctx.spans(category="model_loading")
    assert s.attrs["error"] == "OSError"


# --- pipelines ------------------------------------------------------------------------------------


def test_pipeline_calls_split_into_phases(ctx: Collect, bert_dir: Path) -> None:
    classify = transformers.pipeline("text-classification", model=str(bert_dir), device="cpu")
    texts = [f"sentence {i} about the quiet harbour" for i in range(10)]
    ctx.events.clear()
    single = classify(texts[0])
    batched = classify(texts, batch_size=4)
    assert len(single) == 1 and len(batched) == 10

    calls = ctx.spans(category="model_inference")
    pipes = [s for s in calls if s.name == "pipeline text-classification"]
    assert [p.attrs["items"] for p in pipes] == [1, 10]
    assert [p.attrs["batch_size"] for p in pipes] == [1, 4]
    assert [p.attrs["forward_calls"] for p in pipes] == [1, 3]  # 10 items in batches of 4
    for p in pipes:
        assert p.attrs["items_per_s"] == pytest.approx(p.attrs["items"] / (p.dur_ms / 1e3))
        phases = p.attrs["preprocess_ms"] + p.attrs["forward_ms"] + p.attrs["postprocess_ms"]
        assert phases <= p.dur_ms
    children = {(s.name, s.attrs["calls"]) for s in ctx.spans() if s.attrs.get("phase") in
                ("preprocess", "forward", "postprocess")}
    assert children == {("preprocess", 1), ("forward", 1), ("postprocess", 1),
                        ("preprocess", 10), ("forward", 3), ("postprocess", 10)}
    # The tokenizer runs inside preprocess: its spans nest one level deeper.
    assert all(s.depth == 2 for s in ctx.spans("tokenize"))


def test_a_lazily_consumed_pipeline_is_summed_per_tick(ctx: Collect, bert_dir: Path) -> None:
    classify = transformers.pipeline("text-classification", model=str(bert_dir), device="cpu")
    ctx.events.clear()
    results = list(classify(t for t in ["one line", "another line", "a third line"]))
    assert len(results) == 3
    assert not ctx.spans("pipeline text-classification")  # the call returned before the work
    ctx.events.extend(ctx.instrument.poll(time.time()))  # type: ignore[attr-defined]
    (p,) = ctx.spans("pipeline text-classification")
    assert p.attrs["items"] == 3 and p.attrs["summed"] is True


# --- Trainer --------------------------------------------------------------------------------------


def test_trainer_metrics_equal_trainers_own_log(ctx: Collect, bert_dir: Path, tmp_path: Path) -> None:
    from pipeline_classify import sentences
    from trainer_tiny_bert import Encoded

    tok = transformers.AutoTokenizer.from_pretrained(bert_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(bert_dir)
    texts = sentences(96)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, logging_steps=2, eval_strategy="steps", eval_steps=4,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Encoded(tok, texts[:80], 16),
                                   eval_dataset=Encoded(tok, texts[80:], 16))
    callbacks = [cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "LlmtopCallback"]
    assert len(callbacks) == 1 and isinstance(callbacks[0], integ.LlmtopCallback)
    trainer.train()

    history = trainer.state.log_history
    metrics = ctx.of(Metric)
    for key in ("loss", "learning_rate", "grad_norm", "epoch"):
        logged = [(h["step"], h[key]) for h in history if key in h]
        sent = [(m.step, m.value) for m in metrics if m.name == f"trainer/{key}"]
        assert sent == logged and logged, key
    assert [h["step"] for h in history if "loss" in h] == [2, 4, 6, 8]  # optimizer steps
    evals = ctx.spans("evaluate")
    assert [e.attrs["eval_loss"] for e in evals] == [h["eval_loss"] for h in history if "eval_loss" in h]
    assert all(e.category == "model_inference" and e.dur_ms > 0 for e in evals)
    (train,) = ctx.spans("train")
    assert train.attrs["global_step"] == 8 and train.attrs["grad_accum"] == 2


def test_explicit_callback_is_not_added_twice(ctx: Collect, bert_dir: Path, tmp_path: Path) -> None:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(bert_dir)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args, callbacks=[integ.LlmtopCallback()])
    assert sum(isinstance(cb, integ.LlmtopCallback) for cb in trainer.callback_handler.callbacks) == 1


# --- fail open, uninstall -------------------------------------------------------------------------


def test_an_instrument_error_disables_that_part_only(ctx: Collect, bert_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(bert_dir)
    expected = tok(["alpha beta", "gamma"], padding=True)

    def broken(*a: Any) -> Any:
        raise RuntimeError("boom")

    with pytest.raises(ValueError, match="text input must be of type"):
        tok(12345)  # the library's own errors pass through unchanged
    monkeypatch.setattr(tokenizing, "token_counts", broken)
    ctx.events.clear()
    assert tok(["alpha beta", "gamma"], padding=True) == expected  # the user's result is untouched
    assert ctx.warnings == [("transformers.tokenize", "RuntimeError: boom")]
    monkeypatch.undo()
    tok("delta")
    assert not ctx.spans("tokenize")  # disabled after its error
    transformers.AutoConfig.from_pretrained(str(bert_dir))
    assert ctx.spans("AutoConfig.from_pretrained")  # other parts still on


def test_uninstall_restores_transformers() -> None:
    base = transformers.tokenization_utils_base.PreTrainedTokenizerBase
    gen = transformers.generation.utils.GenerationMixin
    originals = (base.__dict__["__call__"], gen.__dict__["generate"],
                 transformers.Trainer.__dict__["__init__"])
    c = Collect()
    inst = integ.TransformersInstrument(c.options)
    inst.install(c)
    assert inst.active and base.__dict__["__call__"] is not originals[0]
    inst.uninstall()
    assert (base.__dict__["__call__"], gen.__dict__["generate"],
            transformers.Trainer.__dict__["__init__"]) == originals
    assert integ._CURRENT is None


def test_a_restarted_agent_measures_loads_again(gpt_dir: Path) -> None:
    # AutoModelFor* classes keep copies of whatever from_pretrained they saw when transformers
    # imported them (possibly an earlier instrument's wrapper): a new instrument must still count.
    for _ in range(2):
        c = Collect()
        inst = integ.TransformersInstrument(c.options)
        inst.install(c)
        try:
            transformers.AutoModelForCausalLM.from_pretrained(gpt_dir)
        finally:
            inst.uninstall()
        top = [s.name for s in c.spans(category="model_loading") if s.depth == 0]
        assert top == ["AutoModelForCausalLM.from_pretrained"]


def test_pure_helpers() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0
    assert token_counts([[1, 2, 0], [3, 0, 0]], [[1, 1, 0], [1, 0, 0]]) == (2, 6, 3)
    assert token_counts([1, 2, 3], None) == (1, 3, None)
    assert token_counts(torch.ones(2, 5), torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])) == (2, 10, 3)
    legacy = ((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)),)
    assert cache_nbytes(legacy) == 2 * 24 * 4
    assert cache_nbytes(None) is None


# --- child processes: the examples under `llmtop attach --headless --record` ------------------------


def attach(script: str, args: list[str], tmp: Path, timeout: float = 120) -> tuple[str, list[Any]]:
    rec = tmp / "run.lrec"
    env = child_env(LLMTOP_SOCKET=str(tmp / "a.sock"))
    proc = subprocess.run([LLMTOP, "attach", "--headless", "--record", str(rec), str(EXAMPLES / script),
                           *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with RecordingReader(rec) as reader:
        events = list(reader.events())
    return proc.stdout, events


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line.split("|")[0]))


@pytest.mark.slow
def test_generate_example_under_attach(short_tmp: Path) -> None:
    out, events = attach("generate_tiny_gpt.py", ["--rounds", "1", "--max-new-tokens", "6", "--bf16"],
                         short_tmp)
    assert not [e for e in events if isinstance(e, AgentWarning) and e.source.startswith("transformers")]
    printed = [_fields(line) for line in out.splitlines() if line.startswith("gen ")]
    gens = [e for e in events if isinstance(e, Generation)]
    assert [(g.batch, g.prompt_tokens, g.new_tokens) for g in gens] == [
        (int(p["batch"]), int(p["prompt_tokens"]), int(p["new_tokens"])) for p in printed]
    assert len(gens) == 7
    for g in gens:
        assert len(g.decode_ms) == g.new_tokens - 1
        assert 0 < g.ttft_ms <= g.total_ms and g.ttft_ms + sum(g.decode_ms) <= g.total_ms
        assert g.kv_bytes and g.kv_bytes > 0
    spans = [e for e in events if isinstance(e, Span)]
    loads = {(s.name, s.attrs["what"]) for s in spans if s.category == "model_loading" and s.depth == 0}
    assert {("AutoTokenizer.from_pretrained", "tokenizer"),
            ("AutoModelForCausalLM.from_pretrained", "model")} <= loads
    # The step tracker reads integrations.generation_phase(): one generate() call is one inference
    # step (its prefill and decode forwards), the last one committed only if the agent flushes it.
    infer = [e for e in events if isinstance(e, Step) and e.mode == "infer"]
    assert len(gens) - 1 <= len(infer) <= len(gens)
    autocast = [s for s in spans if s.name == "autocast"]
    assert autocast and autocast[0].attrs == {"enabled": True, "device": "cpu", "dtype": "bfloat16"}
    dtypes = [s for s in spans if s.name == "model dtype"]
    assert dtypes and dtypes[0].attrs["model"] == "GPT2LMHeadModel" and dtypes[0].attrs["dtype"] == "float32"


@pytest.mark.slow
def test_pipeline_example_under_attach(short_tmp: Path) -> None:
    out, events = attach("pipeline_classify.py", ["--texts", "12", "--batch-size", "4"], short_tmp)
    assert "batched texts=12 batch_size=4" in out
    pipes = [e for e in events if isinstance(e, Span) and e.name == "pipeline text-classification"]
    assert [(p.attrs["items"], p.attrs["batch_size"], p.attrs["forward_calls"]) for p in pipes] == [
        (1, 1, 1)] * 4 + [(12, 4, 3)]
    toks = [e for e in events if isinstance(e, Span) and e.name == "tokenize"]
    assert sum(t.attrs["texts"] for t in toks) == 16  # 4 single calls, then 12 one by one in preprocess


@pytest.mark.slow
def test_trainer_example_under_attach(short_tmp: Path) -> None:
    hist_file = short_tmp / "history.json"
    out, events = attach("trainer_tiny_bert.py", ["--steps", "16", "--logging-steps", "4", "--eval-steps",
                                                  "8", "--log-history", str(hist_file)], short_tmp)
    history = json.loads(hist_file.read_text())
    losses = [(m.step, m.value) for m in events if isinstance(m, Metric) and m.name == "trainer/loss"]
    assert losses == [(h["step"], h["loss"]) for h in history if "loss" in h] and len(losses) == 4
    evals = [e for e in events if isinstance(e, Span) and e.name == "evaluate"]
    assert len(evals) == 3  # at steps 8 and 16, then the final trainer.evaluate()
    # Gradient accumulation (2 micro-batches): one training step per optimizer step.
    train_steps = [e for e in events if isinstance(e, Step) and e.mode == "train"]
    assert len(train_steps) == 16


NO_TRANSFORMERS = """
import sys
sys.modules["transformers"] = None  # as if it were not installed: `import transformers` fails
import llmtop.agent
from llmtop.agent.hf import instrument as integrations
import torch

llmtop.agent.start(record=sys.argv[1])
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for _ in range(12):
    loss = model(torch.randn(4, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
try:
    import transformers
except ImportError:
    print("no transformers")
print("instrument installed:", integrations._CURRENT is not None, "active:", integrations._CURRENT.active)
llmtop.agent.stop()
"""


@pytest.mark.slow
def test_a_torch_script_runs_unchanged_without_transformers(short_tmp: Path) -> None:
    script = short_tmp / "plain.py"
    script.write_text(textwrap.dedent(NO_TRANSFORMERS))
    rec = short_tmp / "plain.lrec"
    proc = subprocess.run([sys.executable, str(script), str(rec)], capture_output=True, text=True,
                          env=child_env(LLMTOP_SOCKET=str(short_tmp / "a.sock")), timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["no transformers", "instrument installed: True active: False"]
    with RecordingReader(rec) as reader:
        events = list(reader.events())
    assert len([e for e in events if isinstance(e, Step) and e.mode == "train"]) >= 11
    assert not [e for e in events if isinstance(e, AgentWarning) and e.source.startswith("transformers")]


def test_importing_the_integration_does_not_import_transformers() -> None:
    code = ("import sys, llmtop.agent.hf.instrument as m; "
            "print('transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
