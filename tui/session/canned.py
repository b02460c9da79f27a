"""Deterministic canned event streams built from the real event classes: a GPT-2-shaped session for
tests, snapshots, benchmarks and trying the dashboard without a model (no torch needed)."""

from __future__ import annotations

import math
import random

from llmtop.protocol.events import (
    PHASES,
    AgentWarning,
    Anomaly,
    DeviceSample,
    End,
    Event,
    Generation,
    HostSample,
    LayerFlops,
    LayerStats,
    LogLine,
    Metric,
    ModelTree,
    Ops,
    Session,
    SnapshotDone,
    Span,
    Stats,
    Step,
    StepFlops,
)

T0 = 1_700_000_000.0
PID = 4242
GIB = 1024**3


def gpt2_tree(n_layer: int = 12, n_embd: int = 768, vocab: int = 50257, n_ctx: int = 1024,
              model: int = 0, first_id: int = 0) -> ModelTree:
    """The module tree of HF's GPT2LMHeadModel (12 layers: 164 modules)."""
    ids: list[int] = []
    paths: list[str] = []
    classes: list[str] = []
    params: list[int] = []
    parents: list[int] = []

    def add(path: str, cls: str, n: int, parent: int) -> int:
        mid = first_id + len(ids)
        ids.append(mid)
        paths.append(path)
        classes.append(cls)
        params.append(n)
        parents.append(parent)
        return mid

    e = n_embd
    root = add("", "GPT2LMHeadModel", 0, -1)
    tr = add("transformer", "GPT2Model", 0, root)
    add("transformer.wte", "Embedding", vocab * e, tr)
    add("transformer.wpe", "Embedding", n_ctx * e, tr)
    add("transformer.drop", "Dropout", 0, tr)
    h = add("transformer.h", "ModuleList", 0, tr)
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        block = add(p, "GPT2Block", 0, h)
        add(f"{p}.ln_1", "LayerNorm", 2 * e, block)
        attn = add(f"{p}.attn", "GPT2Attention", 0, block)
        add(f"{p}.attn.c_attn", "Conv1D", e * 3 * e + 3 * e, attn)
        add(f"{p}.attn.c_proj", "Conv1D", e * e + e, attn)
        add(f"{p}.attn.attn_dropout", "Dropout", 0, attn)
        add(f"{p}.attn.resid_dropout", "Dropout", 0, attn)
        add(f"{p}.ln_2", "LayerNorm", 2 * e, block)
        mlp = add(f"{p}.mlp", "GPT2MLP", 0, block)
        add(f"{p}.mlp.c_fc", "Conv1D", e * 4 * e + 4 * e, mlp)
        add(f"{p}.mlp.c_proj", "Conv1D", 4 * e * e + e, mlp)
        add(f"{p}.mlp.act", "NewGELUActivation", 0, mlp)
        add(f"{p}.mlp.dropout", "Dropout", 0, mlp)
    add("transformer.ln_f", "LayerNorm", 2 * e, tr)
    add("lm_head", "Linear", 0, root)  # tied to wte
    n = len(ids)
    return ModelTree(model=model, name="GPT2LMHeadModel", ids=ids, paths=paths, classes=classes,
                     params=params, parents=parents, trainable=[True] * n,
                     dtypes=["float32" if x else "" for x in params], compiled=[False] * n)


# relative forward cost of each leaf class (self time), the rest is shared out to parents
_COST = {"Conv1D": 1.0, "Linear": 3.0, "Embedding": 0.05, "LayerNorm": 0.08, "Dropout": 0.02,
         "NewGELUActivation": 0.15}


def layer_times(tree: ModelTree, fwd_total_ms: float, rng: random.Random) -> tuple[list[float], list[float]]:
    """Inclusive and self forward ms per module, consistent (parents include their children)."""
    self_ms = []
    for path, cls in zip(tree.paths, tree.classes, strict=True):
        base = _COST.get(cls, 0.01)
        if path.endswith("c_fc") or path.endswith("mlp.c_proj"):
            base *= 1.6
        self_ms.append(base * (0.9 + 0.2 * rng.random()))
    scale = fwd_total_ms / sum(self_ms)
    self_ms = [s * scale for s in self_ms]
    incl = list(self_ms)
    index = {mid: i for i, mid in enumerate(tree.ids)}
    for i in range(len(tree.ids) - 1, -1, -1):  # children come after parents in tree order
        parent = tree.parents[i]
        if parent in index:
            incl[index[parent]] += incl[i]
    return incl, self_ms


def session_events(steps: int = 60, *, n_layer: int = 12, seed: int = 0, step_ms: float = 120.0,
                   gpu: bool = False, nan_from: int | None = None, data_share: float = 0.1,
                   generations: int = 8, end: bool = False, creep: bool = False) -> list[Event]:
    """A whole session: snapshot, ``steps`` training steps with layers, samples, spans, logs, an op
    profile, FLOPs, a few generate calls, and (``end``) the end of the script."""
    rng = random.Random(seed)
    tree = gpt2_tree(n_layer=n_layer)
    out: list[Event] = [
        Session(pid=PID, argv=["train_tiny_gpt.py", "--steps", str(steps)], cwd="/work", started=T0,
                hostname="box", python="3.12.0", torch="2.13.0", transformers="5.24.0",
                devices=["NVIDIA H100 80GB HBM3"] if gpu else ["cpu"], options={"interval": 0.25}),
        tree,
        SnapshotDone(events=2),
    ]
    n = len(tree.ids)
    flops_ev = LayerFlops(signature="(8, 128) int64", ids=list(tree.ids),
                          flops=[(p * 2 * 1024.0) if p else 1e6 for p in tree.params],
                          bytes=[(p * 4 + 8 * 128 * 768 * 8) if p else 8e6 for p in tree.params],
                          peak_flops=989e12 if gpu else None, peak_bw=3.35e12 if gpu else None,
                          device="H100" if gpu else "cpu")
    out.append(flops_ev)
    t = T0 + 2.0
    out.append(LogLine(t=t, text=f"tiny GPT: {len(tree.ids)} modules, batch 8, {steps} steps", stream="stdout"))
    loss = 10.5
    for k in range(1, steps + 1):
        dur = step_ms * (0.9 + 0.2 * rng.random())
        if k % 17 == 0:
            dur *= 3.0  # an occasional slow step
        data = dur * data_share
        fwd = (dur - data) * 0.32
        bwd = (dur - data) * 0.55
        opt = (dur - data) * 0.08
        other = dur - data - fwd - bwd - opt
        t += dur / 1000.0
        loss = loss * 0.985 + 0.05 * rng.random()
        step_loss = float("nan") if nan_from is not None and k >= nan_from else loss
        mem = int(2 * GIB + (k * 8 * 1024 * 1024 if creep else 0))
        out.append(Step(step=k, t=t, dur_ms=dur, mode="train",
                        phases=dict(zip(PHASES, (data, 0.0, fwd, bwd, opt, other), strict=True)),
                        loss=step_loss, grad_norm=1.0 + rng.random(), lr=3e-4, samples=8, tokens=8 * 128,
                        overhead_us=dur * 1000 * 0.004, layer_every=1,
                        cuda_allocated=mem if gpu else None, cuda_reserved=mem + GIB // 2 if gpu else None,
                        cuda_peak=mem + GIB if gpu else None, gpu_ms=dur * 0.9 if gpu else None))
        incl, self_ms = layer_times(tree, fwd, rng)
        bincl, bself = layer_times(tree, bwd, rng)
        out.append(LayerStats(step=k, ids=list(tree.ids), fwd_ms=incl, fwd_self_ms=self_ms, calls=[1] * n,
                              bwd_ms=bincl, bwd_self_ms=bself,
                              act_bytes=[int(p * 0.5 + 8 * 128 * 768 * 4) for p in tree.params] if gpu else []))
        out.append(StepFlops(step=k, ids=list(flops_ev.ids), flops=list(flops_ev.flops), bytes=list(flops_ev.bytes),
                             peak_flops=flops_ev.peak_flops))  # one call per module per step
        out.append(HostSample(t=t, cpu_pct=95.0 + 10 * rng.random(),
                              rss=int(1.5 * GIB + (k * 12 * 1024 * 1024 if creep else 0) + rng.random() * 1e6),
                              sys_used=int(12 * GIB), sys_total=int(64 * GIB), threads=12))
        if gpu:
            out.append(DeviceSample(t=t, index=0, name="NVIDIA H100 80GB HBM3", util_pct=80 + 15 * rng.random(),
                                    mem_used=mem + GIB, mem_total=80 * GIB, power_w=500.0, temp_c=60.0,
                                    sm_clock_mhz=1980.0, mem_clock_mhz=2619.0))
        out.append(Span(name="tokenize", category="text_preprocessing", start=t - dur / 1000, dur_ms=data * 0.5,
                        step=k))
        out.append(Span(name="eval" if k % 20 == 0 else "log_metrics", category="training_loop",
                        start=t - 0.001, dur_ms=0.5 + rng.random(), step=k))
        out.append(Metric(name="tokens_seen", value=float(k * 1024), t=t, step=k))
        pct = int(100 * k / steps)
        out.append(LogLine(t=t, text=f"\r{pct:3d}%|{'█' * (pct // 10):<10}| {k}/{steps} loss={loss:.3f}",
                           stream="stderr", replace=k > 1))
        if k % 10 == 0:
            out.append(LogLine(t=t, text=f"\x1b[32mstep {k}\x1b[0m loss {loss:.4f}", stream="stdout"))
            out.append(Ops(step=k, names=["aten::mm", "aten::addmm", "aten::gelu", "aten::native_layer_norm",
                                          "aten::softmax", "aten::embedding"],
                           self_ms=[fwd * 0.4, fwd * 0.3, fwd * 0.08, fwd * 0.05, fwd * 0.04, fwd * 0.01],
                           calls=[48, 49, 12, 25, 12, 2],
                           flops=[2.4e11, 1.8e11, 0.0, 0.0, 0.0, 0.0],
                           shapes=["[1024, 768]x[768, 3072]", "[1024, 768]x[768, 2304]", "[8, 128, 3072]",
                                   "[8, 128, 768]", "[8, 12, 128, 128]", "[8, 128]"],
                           coverage=0.86))
            out.append(Stats(t=t, dropped=0, clients=1, agent_cpu_pct=1.5))
    for g in range(generations):
        t += 0.5
        new = 32
        decode = [8.0 + 0.5 * math.sin(i / 3) + 0.01 * g for i in range(new - 1)]
        out.append(Generation(t=t, batch=2, prompt_tokens=40 + g, new_tokens=new, ttft_ms=35.0 + g,
                              decode_ms=decode, kv_bytes=(40 + g + new) * 2 * 2 * n_layer * 768 * 4,
                              total_ms=35.0 + g + sum(decode)))
    out.append(Anomaly(t=t, what="loss_spike", message="loss spiked to 3.1× its recent mean", step=steps // 2))
    out.append(AgentWarning(t=t, source="ops", message="profiler unavailable in this build"))
    if end:
        out.append(End(t=t + 0.5, exit_code=0, reason="exit"))
    return out
