"""`llmtop graph MODEL`: parameters, FLOPs, MACs, memory and roofline verdicts of a model, statically.

The model is built on the meta device (no weights allocated) and run once under the counters of
``flops.py``: a 7B config costs a few hundred MB and a few seconds.

On a CPU the peaks are measured (``roofline.cpu_device``, cached). A busy machine can make that
measurement wrong: here, under load, five cold-cache runs measured 30–137 GFLOP/s and 2.1–28.7 GB/s.
So ``graph`` measures once more and doubts peaks that swing between the two, or whose FLOP/s fall below
the bandwidth's order (a ridge under 1 FLOP/B: a CPU's matmul does many FLOPs per byte it moves). Doubtful
peaks are said in the header, and no compute/memory verdict is printed on them.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELP = "static parameters, FLOPs and memory of a model, without weights"

SWING = 1.5  # two measurements of a CPU peak further apart than this: the machine is too busy to tell
MIN_RIDGE = 1.0  # FLOP/B: a CPU whose matmul FLOP/s is below its copy bandwidth's order was measured wrong

DTYPES = ("float32", "bfloat16", "float16")


class GraphError(Exception):
    """Bad input: reported as one line."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="known name (gpt2, llama-2-7b …) or Hub id, a directory "
                   "with config.json, or package.module:factory returning an nn.Module")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (encoder side)")
    p.add_argument("--dec-len", type=int, default=None, help="decoder tokens for encoder-decoders "
                   "(default: --seq-len)")
    p.add_argument("--image-size", type=int, default=None, help="image side for vision models "
                   "(default: the config's, else 224)")
    p.add_argument("--input-shape", default=None, help="input shape for a module:factory model, "
                   "e.g. 1,3,224,224 (default: guessed from its first layer)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default=None, help="roofline device: h100, h100-pcie, h200, a100, "
                   "a100-40gb, l4, a10, rtx4090 … or cpu (default: this machine's)")
    p.add_argument("--attn", choices=("eager", "sdpa"), default=None,
                   help="attention implementation for transformers models (default: the model's)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--tree", action="store_true", help="every module as an indented tree")
    p.add_argument("--top", type=int, default=15, help="rows in the ops table")
    p.add_argument("--all", action="store_true", help="profile every known model and say which work")
    p.add_argument("--list", action="store_true", help="list the known model names")


# --- building the model and its inputs -----------------------------------------------------------


@dataclass
class Built:
    name: str
    model: Any
    args: tuple
    kwargs: dict
    shape: str  # "batch 1 x seq 128" …


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _token_inputs(model: Any, task: str, a: argparse.Namespace) -> tuple[dict, str]:
    import torch

    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", "") in ("vit", "resnet") or task == "image-classification":
        side = a.image_size or getattr(cfg, "image_size", None) or 224
        channels = getattr(cfg, "num_channels", 3)
        px = torch.empty(a.batch, channels, side, side, device="meta", dtype=_torch_dtype(a.dtype))
        kwargs = {"pixel_values": px}
        if getattr(cfg, "model_type", "") == "vit" and side != getattr(cfg, "image_size", side):
            kwargs["interpolate_pos_encoding"] = True  # ViT at another resolution than trained
        return kwargs, f"batch {a.batch} x {channels}x{side}x{side}"
    ids = torch.zeros(a.batch, a.seq_len, dtype=torch.long, device="meta")
    kwargs: dict = {"input_ids": ids}
    shape = f"batch {a.batch} x seq {a.seq_len}"
    if task == "seq2seq-lm" or getattr(cfg, "is_encoder_decoder", False):
        dec = a.dec_len or a.seq_len
        kwargs["decoder_input_ids"] = torch.zeros(a.batch, dec, dtype=torch.long, device="meta")
        shape += f" (decoder {dec})"
    if task != "encoder" and "use_cache" in getattr(cfg, "__dict__", {}):
        kwargs["use_cache"] = False  # a single forward pass: no KV cache to build
    return kwargs, shape


def _guess_inputs(model: Any, a: argparse.Namespace) -> tuple[tuple, str]:
    """Inputs for an arbitrary module: from --input-shape, else from its first layer's type."""
    import torch
    from torch import nn

    dtype = _torch_dtype(a.dtype)
    if a.input_shape:
        try:
            shape = tuple(int(x) for x in a.input_shape.replace("x", ",").split(",") if x.strip())
        except ValueError:
            raise GraphError(f"--input-shape {a.input_shape!r} is not a list of integers") from None
        first = next((m for m in model.modules() if not list(m.children())), None)
        if isinstance(first, nn.Embedding):
            return (torch.zeros(shape, dtype=torch.long, device="meta"),), "x".join(map(str, shape))
        return (torch.empty(shape, dtype=dtype, device="meta"),), "x".join(map(str, shape))
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            x = torch.zeros(a.batch, a.seq_len, dtype=torch.long, device="meta")
            return (x,), f"batch {a.batch} x seq {a.seq_len}"
        if isinstance(m, nn.Linear):
            x = torch.empty(a.batch, a.seq_len, m.in_features, dtype=dtype, device="meta")
            return (x,), f"batch {a.batch} x seq {a.seq_len} x {m.in_features}"
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            side = a.image_size or 224
            dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(m)]
            shape = (a.batch, m.in_channels, *([side] * dims))
            return (torch.empty(shape, dtype=dtype, device="meta"),), "x".join(map(str, shape))
    raise GraphError("cannot guess this module's input: give --input-shape")


def _from_factory(spec: str, a: argparse.Namespace) -> Built:
    import torch

    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise GraphError(f"cannot load {spec!r}: {exc}") from None
    with torch.device("meta"):
        made = factory()
    args: tuple = ()
    kwargs: dict = {}
    if isinstance(made, tuple):  # (module, example args[, example kwargs])
        made, args, *rest = made
        kwargs = rest[0] if rest else {}
        args = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in args)
    if not isinstance(made, torch.nn.Module):
        raise GraphError(f"{spec} returned {type(made).__name__}, not an nn.Module")
    model = made.to("meta").to(_torch_dtype(a.dtype)).eval()
    if args or kwargs:
        return Built(spec, model, args, kwargs, "example inputs")
    if hasattr(model, "config") and hasattr(model.config, "model_type"):
        from llmtop.agent.flops.hub_configs import task_of

        kw, shape = _token_inputs(model, task_of(model.config), a)
        return Built(spec, model, (), kw, shape)
    args, shape = _guess_inputs(model, a)
    return Built(spec, model, args, {}, shape)


def build(a: argparse.Namespace, name: str) -> Built:
    from llmtop.agent.flops import hub_configs

    known = hub_configs.find(name)
    dtype = _torch_dtype(a.dtype)
    if known is not None:
        config, task, label = hub_configs.build_config(known), known.task, known.id
    elif Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise GraphError(f"{name}: no config.json in this directory")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(name)
        except Exception as exc:
            raise GraphError(f"{name}/config.json: {str(exc).splitlines()[0]}") from None
        task, label = hub_configs.task_of(config), name
    elif ":" in name:
        return _from_factory(name, a)
    else:
        raise GraphError(f"unknown model {name!r}: not a known name (see --list), a directory with "
                         "config.json, or package.module:factory")
    model = hub_configs.build(config, task, dtype, a.attn)
    kwargs, shape = _token_inputs(model, task, a)
    return Built(label, model, (), kwargs, shape)


# --- analysis ------------------------------------------------------------------------------------


def peak_doubts(dev: Any, again: Any | None) -> list[str]:
    """Why the measured CPU peaks of ``dev`` cannot be trusted (none: they can), ``again`` a second
    measurement of the same (None: not taken). Peaks from a datasheet or the environment are not doubted."""
    flops_measured = dev.source == "measured"
    bw_measured = dev.bw_source == "measured"
    if dev.key != "cpu" or not (flops_measured or bw_measured):
        return []
    out = []
    pf, bw = dev.peak("fp32"), dev.bandwidth
    if pf > 0 and bw > 0 and pf / bw < MIN_RIDGE:
        out.append(f"{_si(pf, 'FLOP/s')} is below the bandwidth's order ({_si(bw, 'B/s')}): "
                   "a CPU's matmul does many FLOPs per byte")
    if again is not None:
        swings = []
        if flops_measured and _swings(pf, again.peak("fp32")):
            swings.append(_si(again.peak("fp32"), "FLOP/s"))
        if bw_measured and _swings(bw, again.bandwidth):
            swings.append(_si(again.bandwidth, "B/s"))
        if swings:
            out.append(f"a second measurement gave {' and '.join(swings)}: the machine is too busy to measure")
    return out


def _swings(a: float, b: float) -> bool:
    if a <= 0 or b <= 0:
        return a != b
    return max(a, b) / min(a, b) > SWING


def analyse(built: Built, a: argparse.Namespace, dev: Any, doubts: list[str] | None = None) -> dict:
    """Everything the command prints, as plain data (the json format is this dict). With ``doubts``
    (the peaks cannot be trusted) no verdict is given: ``bound`` and ``summary`` are None."""
    from llmtop.agent.flops import counting as F
    from llmtop.agent.flops.roofline import normalize_dtype
    from llmtop.protocol.formulas import bound

    pf, bw = dev.peak(a.dtype), dev.bandwidth
    # each op call's roofline time is summed where it runs (its op row, every module around it): the
    # header, the op rows and the layer rows are sums of the same per-call times, so the root row
    # is the header's figure (a module's time is not that of its summed FLOPs and bytes)
    prof = F.count(built.model, built.args, built.kwargs, peaks=(pf, bw))

    ops = []
    share = {"compute": [0, 0.0], "memory": [0, 0.0]}
    total_t = prof.est_s or 1.0
    trusted = not doubts
    for o in prof.ops:
        t = o.est_s
        verdict = bound(o.flops, o.bytes, None, pf, bw) if trusted else None
        if verdict is not None and (o.bytes or o.flops):
            share[verdict][0] += o.calls
            share[verdict][1] += t
        ops.append({"op": o.name, "shapes": o.shapes, "calls": o.calls, "flops": o.flops,
                    "macs": o.flops / 2, "bytes": o.bytes, "intensity": o.intensity,
                    "bound": verdict, "est_s": t, "share": t / total_t, "formula": o.counted})
    ops.sort(key=lambda r: -r["est_s"])
    layers = []
    for m in prof.modules:
        if not m.calls:
            continue
        layers.append({"path": m.path or "(root)", "class": m.cls, "depth": m.depth, "params": m.params,
                       "calls": m.calls, "flops": m.flops, "macs": m.flops / 2, "bytes": m.bytes,
                       "intensity": m.intensity,
                       "bound": bound(m.flops, m.bytes, None, pf, bw) if trusted else None,
                       "est_s": m.est_s, "out_bytes": m.out_bytes})
    return {
        "model": built.name, "class": type(built.model).__name__, "inputs": built.shape,
        "batch": a.batch, "seq_len": a.seq_len, "dtype": a.dtype,
        "device": {"key": dev.key, "name": dev.name, "peak_flops": pf, "bandwidth": bw,
                   "ridge": pf / bw if bw else 0.0, "measured": dev.measured,
                   "source": dev.sources(), "doubts": list(doubts or []),
                   "dtype": normalize_dtype(a.dtype)},
        "params": prof.params, "flops": prof.flops, "macs": prof.macs, "bytes": prof.bytes,
        "memory": {"weights": prof.weight_bytes, "inputs": prof.input_bytes,
                   "activations_peak": prof.act_peak_bytes, "activations_written": prof.act_written_bytes,
                   "peak": prof.peak_bytes},
        "est_s": total_t,
        "coverage": prof.coverage(pf, bw),
        "summary": {k: {"ops": v[0], "time_share": v[1] / total_t} for k, v in share.items()} if trusted else None,
        "ops": ops,
        "layers": layers,
    }


# --- output --------------------------------------------------------------------------------------


def _si(x: float, unit: str = "") -> str:
    for div, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {p}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _mb(x: float) -> str:
    return f"{x / 1e6:.1f} MB" if x < 1e9 else f"{x / 1e9:.2f} GB"


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def ridge_text(ridge: float) -> str:
    """A ridge as people read it: whole FLOP/B from 10 on, two significant digits below (a ``:.0f`` made
    0.33 FLOP/B "0"), "—" without a bandwidth."""
    if not ridge or not math.isfinite(ridge) or ridge < 0:
        return "—"
    return f"{ridge:.0f}" if ridge >= 10 else f"{ridge:.2g}"


def render_table(r: dict, tree: bool, top: int) -> str:
    d = r["device"]
    out = io.StringIO()
    w = out.write
    w(f"{r['model']} ({r['class']}), {r['inputs']}, {r['dtype']}\n")
    w(f"device       {d['name']}: {_si(d['peak_flops'], 'FLOP/s')} {d['dtype']}, "
      f"{_si(d['bandwidth'], 'B/s')} ({d['source']}), ridge {ridge_text(d['ridge'])} FLOP/B\n")
    for why in d["doubts"]:
        w(f"peaks        doubtful: {why}\n")
    if d["doubts"]:
        w("             (no compute/memory verdicts; set LLMTOP_PEAK_FLOPS and LLMTOP_PEAK_BW, or --device)\n")
    w(f"parameters   {_si(r['params'])}\n")
    w(f"FLOPs        {_si(r['flops'])} forward   MACs {_si(r['macs'])}\n")
    m = r["memory"]
    w(f"memory       weights {_mb(m['weights'])}, activations peak {_mb(m['activations_peak'])}, "
      f"peak {_mb(m['peak'])} (written {_mb(m['activations_written'])})\n")
    s = r["summary"]
    if s is None:
        w("bottleneck   — (the measured peaks are doubtful)\n")
    else:
        w(f"bottleneck   compute-bound {s['compute']['ops']} op calls, {s['compute']['time_share']:.0%} of "
          f"est. time; memory-bound {s['memory']['ops']} op calls, {s['memory']['time_share']:.0%}\n")
    w(f"roofline     est. {_ms(r['est_s'])} ms per forward"
      + (" on the doubtful peaks" if s is None else "")
      + f"; FLOP formula coverage {r['coverage']:.0%} of est. op time\n\n")
    w(f"{'op':<38} {'calls':>5} {'GFLOP':>9} {'MB':>9} {'FLOP/B':>7} {'bound':>7} {'est ms':>8} "
      f"{'share':>6}  shapes\n")
    for o in r["ops"][:top]:
        w(f"{o['op'][:38]:<38} {o['calls']:>5} {o['flops'] / 1e9:>9.3f} {o['bytes'] / 1e6:>9.2f} "
          f"{o['intensity']:>7.1f} {o['bound'] or '?':>7} {_ms(o['est_s']):>8} {o['share']:>6.1%}  "
          f"{o['shapes'][:40]}\n")
    if len(r["ops"]) > top:
        w(f"… {len(r['ops']) - top} more op/shape rows (--top N, --format json)\n")
    w(f"\n{'layer':<44} {'class':<22} {'params':>8} {'GFLOP':>9} {'MB':>9} {'FLOP/B':>7} "
      f"{'bound':>7} {'est ms':>8}\n")
    shown: list[str] = []  # tree mode: the shown ancestors of the current row
    for lay in r["layers"]:
        if not tree and lay["depth"] > 3:
            continue
        name = lay["path"]
        if tree:
            path = "" if lay["path"] == "(root)" else lay["path"]
            while shown and not (shown[-1] == "" or path.startswith(shown[-1] + ".")):
                shown.pop()
            rel = path[len(shown[-1]) + 1:] if shown and shown[-1] else path
            name = "  " * len(shown) + (rel or "(root)")  # uncalled containers (ModuleList) fold in
            shown.append(path)
        w(f"{name[:44]:<44} {lay['class'][:22]:<22} {_si(lay['params']):>8} {lay['flops'] / 1e9:>9.3f} "
          f"{lay['bytes'] / 1e6:>9.2f} {lay['intensity']:>7.1f} {lay['bound'] or '?':>7} "
          f"{_ms(lay['est_s']):>8}\n")
    if not tree:
        w("(modules up to depth 3; --tree for all)\n")
    return out.getvalue()


def render_csv(r: dict) -> str:
    out = io.StringIO()
    cols = ["kind", "name", "class", "shapes", "calls", "params", "flops", "macs", "bytes", "intensity",
            "bound", "est_s"]
    wr = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    wr.writeheader()
    for lay in r["layers"]:
        wr.writerow({**lay, "kind": "layer", "name": lay["path"]})
    for o in r["ops"]:
        wr.writerow({**o, "kind": "op", "name": o["op"], "class": ""})
    return out.getvalue()


# --- command -------------------------------------------------------------------------------------


def _device(a: argparse.Namespace) -> tuple[Any, list[str]]:
    """The roofline device, and why its peaks are doubtful (a measured CPU's are measured once more)."""
    from llmtop.agent.flops.roofline import device_for, measure_cpu

    name = a.device
    if name is None:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
    try:
        dev = device_for(name)
    except ValueError as exc:
        raise GraphError(str(exc)) from None
    again = None
    if dev.key == "cpu" and "measured" in (dev.source, dev.bw_source):
        try:
            again = measure_cpu(flops=dev.source == "measured", bandwidth=dev.bw_source == "measured")
        except Exception:  # no second figure: only the first's own plausibility is judged
            again = None
    return dev, peak_doubts(dev, again)


def _run_all(a: argparse.Namespace, dev: Any, doubts: list[str]) -> int:
    from llmtop.agent.flops import hub_configs

    failed = 0
    results = []
    for m in hub_configs.known():
        t0 = time.perf_counter()
        try:
            r = analyse(build(a, m.id), a, dev, doubts)
            results.append({"model": m.id, "ok": True, "class": r["class"], "params": r["params"],
                            "flops": r["flops"], "seconds": time.perf_counter() - t0})
        except Exception as exc:
            failed += 1
            msg = str(exc).splitlines()[0] if str(exc) else ""
            results.append({"model": m.id, "ok": False, "error": f"{type(exc).__name__}: {msg}"[:200],
                            "seconds": time.perf_counter() - t0})
    if a.format == "json":
        print(json.dumps({"results": results, "failed": failed}, indent=1))
    else:
        for x in results:
            if x["ok"]:
                print(f"ok    {x['model']:<38} {x['class']:<30} {_si(x['params']):>9} params "
                      f"{_si(x['flops'], 'FLOPs'):>13}  {x['seconds']:.2f}s")
            else:
                print(f"FAIL  {x['model']:<38} {x['error']}")
        print(f"{len(results) - failed}/{len(results)} models profiled")
    return 1 if failed else 0


def run(a: argparse.Namespace) -> int:
    try:
        if a.list:
            from llmtop.agent.flops import hub_configs

            for m in hub_configs.known():
                print(f"{m.short:<34} {m.id}")
            return 0
        if a.batch < 1 or a.seq_len < 1 or (a.dec_len is not None and a.dec_len < 1):
            raise GraphError("--batch, --seq-len and --dec-len must be positive")
        dev, doubts = _device(a)
        if a.all:
            return _run_all(a, dev, doubts)
        if not a.model:
            raise GraphError("give a MODEL (or --all, --list)")
        r = analyse(build(a, a.model), a, dev, doubts)
    except GraphError as exc:
        print(f"llmtop graph: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a model that cannot run on meta tensors, a broken config …
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"llmtop graph: {a.model}: {type(exc).__name__}: {msg}"[:300], file=sys.stderr)
        return 1
    text = {"json": lambda: json.dumps(r, indent=1) + "\n", "csv": lambda: render_csv(r),
            "table": lambda: render_table(r, a.tree, a.top)}[a.format]()
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `llmtop graph … | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
