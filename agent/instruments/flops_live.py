"""Live per-layer FLOPs and bytes: once per model and input-shape signature, off the hot path.

Hot path (``core.BUS.root_forward``, at the end of each model-root call, which carries its kwargs):
the input shapes, dtypes and plain values are turned
into a hashable signature; a new one is queued with a weak reference to the model. No tensor is
copied or kept.

Agent thread (``poll``): the model is deep-copied with every parameter and buffer replaced by a
meta tensor (no weights copied), run once on meta inputs of the queued shapes under the counters
of ``flops.py``, and the per-module costs are joined to the layers instrument's module ids into one
``LayerFlops`` event. Peaks come from ``roofline.py`` for the model's device and dtype.
"""

from __future__ import annotations

import copy
import time
import weakref
from collections import deque
from typing import Any

from llmtop.agent.runtime import core
from llmtop.protocol.events import Event, LayerFlops

MAX_SIGNATURES = 16  # per model; decoding with a growing mask would otherwise never stop
MIN_INTERVAL_S = 1.0  # at most one count per second: each holds the GIL on the agent thread
_PLAIN = frozenset({bool, int, float, str, type(None)})


_Tensor: Any = None  # torch.Tensor, set when torch is loaded (this module imports without torch)


def _spec(x: Any, depth: int = 0) -> Any:
    """A hashable description of one argument: shapes and dtypes of tensors, plain values as is."""
    global _Tensor
    t = type(x)
    if t in _PLAIN:
        return x
    if _Tensor is None:
        import torch

        _Tensor = torch.Tensor
    # `type is` first: isinstance against torch.Tensor goes through a slow metaclass check
    if t is _Tensor or isinstance(x, _Tensor):
        return ("T", x.shape, x.dtype)  # torch.Size is a hashable tuple
    if depth < 2 and isinstance(x, (list, tuple)):
        return ("L", tuple(_spec(v, depth + 1) for v in x))
    if depth < 2 and isinstance(x, dict):
        return ("D", tuple((k, _spec(v, depth + 1)) for k, v in x.items()))
    return ("O", type(x).__name__)  # opaque (a KV cache object …): not rebuilt on meta


def signature(args: tuple, kwargs: dict, autocast: Any = None) -> tuple:
    """(args, kwargs, autocast dtype or None) as hashable specs."""
    return (tuple(_spec(a) for a in args), tuple((k, _spec(v)) for k, v in kwargs.items()), autocast)


def autocast_dtype(torch: Any) -> Any:
    """The dtype autocast runs matmuls in on this thread (CUDA first), or None."""
    for dev in ("cuda", "cpu"):
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    return None


def describe(sig: tuple) -> str:
    """``input_ids:1x128:int64 use_cache=False`` — the signature as people read it."""

    def one(s: Any) -> str:
        if isinstance(s, tuple) and s and s[0] == "T":
            return f"{'x'.join(map(str, s[1])) or 'scalar'}:{str(s[2]).replace('torch.', '')}"
        if isinstance(s, tuple) and s and s[0] == "O":
            return s[1]
        if isinstance(s, tuple) and s and s[0] in ("L", "D"):
            return "[…]"
        return repr(s)

    args, kwargs, autocast = sig
    parts = [one(a) for a in args] + [f"{k}:{one(v)}" for k, v in kwargs]
    if autocast is not None:
        parts.append(f"autocast:{str(autocast).replace('torch.', '')}")
    return " ".join(parts)


def _rebuild(s: Any, torch: Any, autocast: Any = None) -> tuple[bool, Any]:
    """(ok, meta value) for a spec; opaque objects cannot be rebuilt. Under autocast, floating
    inputs take its dtype (the first matmul would cast them)."""
    if isinstance(s, tuple) and s:
        kind = s[0]
        if kind == "T":
            _, shape, dtype = s
            if dtype.is_floating_point or dtype.is_complex:
                if autocast is not None and dtype.is_floating_point:
                    dtype = autocast
                return True, torch.empty(shape, dtype=dtype, device="meta")
            return True, torch.zeros(shape, dtype=dtype, device="meta")
        if kind == "L":
            items = [_rebuild(v, torch, autocast) for v in s[1]]
            return all(ok for ok, _ in items), [v for _, v in items]
        if kind == "D":
            out = {}
            for k, v in s[1]:
                ok, val = _rebuild(v, torch, autocast)
                if ok:
                    out[k] = val
            return True, out
        if kind == "O":
            return False, None
    return True, s


def meta_copy(model: Any) -> Any:
    """``model`` deep-copied with meta parameters and buffers and no hooks: weights are not copied."""
    import torch

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    for m in model.modules():
        for attr, value in vars(m).items():
            if "hooks" in attr and isinstance(value, dict):  # hooks hold other objects (our agent…)
                memo[id(value)] = type(value)()
    return copy.deepcopy(model, memo)


# Wrappers whose forward must not run on meta (compiled graphs, collectives): count what they wrap.
_WRAPPERS = {"OptimizedModule": "_orig_mod", "DistributedDataParallel": "module", "DataParallel": "module"}


def unwrap(model: Any) -> tuple[Any, str]:
    """(the innermost wrapped model, its path prefix inside ``model``)."""
    prefix = ""
    while type(model).__name__ in _WRAPPERS:
        attr = _WRAPPERS[type(model).__name__]
        inner = getattr(model, attr, None)
        if inner is None:
            break
        model, prefix = inner, prefix + attr + "."
    return model, prefix


def _layers_instrument() -> Any:
    """The running layers instrument (``layers.LayersInstrument``), found on the agent."""
    agent = core.ACTIVE
    for inst in list(getattr(agent, "_instruments", []) or []):
        if getattr(inst, "name", "") == "layers" and hasattr(inst, "module_ids"):
            return inst
    return None


class FlopsInstrument:
    name = "flops"

    def __init__(self, options: core.Options | None = None, layers: Any = None) -> None:
        self.options = options or core.Options()
        self.layers = layers  # the layers instrument; found on the running agent when None
        self.ctx: Any = None
        self._seen: dict[int, set] = {}  # id(model) -> signatures queued
        self._queue: deque[tuple[Any, tuple]] = deque(maxlen=64)
        self._dead = False
        self._installed = False
        self.computed = 0
        self._torch: Any = None
        self.min_interval_s = MIN_INTERVAL_S
        self._last = -1e9
        self.device: Any = None  # overrides the device lookup (tests, --device)

    # --- Instrument contract ---------------------------------------------------------------------
    def install(self, ctx: core.Context) -> None:
        self.ctx = ctx
        if not self.options.flops:
            return
        import torch

        self._torch = torch
        core.BUS.root_forward.append(self._on_root)
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            try:
                core.BUS.root_forward.remove(self._on_root)
            except ValueError:
                pass
            self._installed = False

    def poll(self, now: float) -> list[Event]:
        """Count at most one queued signature per call, and at most once per MIN_INTERVAL_S."""
        if not self._queue or time.monotonic() - self._last < self.min_interval_s:
            return []
        if self.ctx.stopping:
            return []  # a count holds the GIL for a while: the script's exit must not wait for it
        retry = []
        out: list[Event] = []
        while self._queue and not out:
            ref, sig = self._queue.popleft()
            model = ref()
            if model is None:
                continue
            self._last = time.monotonic()
            try:
                ev = self.compute(model, sig)
            except Exception as exc:  # a model that cannot run on meta: say so, keep the run going
                self._warn(f"FLOPs for {type(model).__name__} ({describe(sig)}) failed: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
                continue
            if ev is None:
                retry.append((ref, sig))  # the layers instrument has not named its modules yet
                break
            out.append(ev)
        self._queue.extendleft(reversed(retry))
        return out

    # --- hot path --------------------------------------------------------------------------------
    def _on_root(self, module: Any, t_start_ns: int, t_end_ns: int, args: tuple, kwargs: dict) -> None:
        # BUS.root_forward (the call's end: a call that raised is not counted). Only on
        # detailed steps: a new input signature is still seen within a few steps, at a fraction
        # of the cost of reading every call's shapes.
        if self._dead or not core.BUS.detail:
            return
        try:
            sig = signature(args, kwargs, autocast_dtype(self._torch) if self._torch else None)
            seen = self._seen.get(id(module))
            if seen is None:
                if len(self._seen) >= 1024:  # many short-lived roots: start over rather than grow
                    self._seen.clear()
                seen = self._seen[id(module)] = set()
                weakref.finalize(module, self._seen.pop, id(module), None)  # ids are reused
            if sig in seen or len(seen) >= MAX_SIGNATURES:
                return
            seen.add(sig)
            self._queue.append((weakref.ref(module), sig))
        except Exception as exc:  # fail open
            self._dead = True
            self._warn(f"signature capture failed: {type(exc).__name__}: {exc}")

    # --- agent thread ----------------------------------------------------------------------------
    def compute(self, model: Any, sig: tuple) -> LayerFlops | None:
        import torch
        from llmtop.agent.flops import counting as F

        layers = self.layers or _layers_instrument()
        if layers is None:
            return None  # no module ids to join the counts to
        ids = layers.module_ids()
        if ids.get(model) is None:
            return None
        args_spec, kwargs_spec, autocast = sig
        args = []
        for s in args_spec:
            ok, v = _rebuild(s, torch, autocast)
            args.append(v if ok else None)
        kwargs = {}
        for k, s in kwargs_spec:
            ok, v = _rebuild(s, torch, autocast)
            if ok:
                kwargs[k] = v
        inner, prefix = unwrap(model)
        clone = meta_copy(inner)
        clone.eval()
        if autocast is not None:
            # autocast runs the matmuls (most of the FLOPs and weight traffic) in its dtype; norms
            # and softmax stay fp32 in reality, a small part of the bytes
            clone = clone.to(autocast)
        # The layers instrument must not see the meta copy's module calls.
        with layers.muted():
            prof = F.count(clone, tuple(args), kwargs)
        originals = dict(model.named_modules())
        out_ids: list[int] = []
        fl: list[float] = []
        by: list[float] = []
        for cost in prof.modules:
            if not cost.calls:
                continue
            paths = [prefix + cost.path] if cost.path else ([prefix[:-1], ""] if prefix else [""])
            for path in paths:  # a wrapper's root gets its wrapped model's figures too
                orig = originals.get(path)
                gid = ids.get(orig) if orig is not None else None
                if gid is not None:
                    out_ids.append(gid)
                    fl.append(cost.flops / cost.calls)
                    by.append(cost.bytes / cost.calls)
        dev, dtype = self._device(model)
        if autocast is not None:
            dtype = str(autocast)
        self.computed += 1
        return LayerFlops(
            signature=describe(sig), ids=out_ids, flops=fl, bytes=by,
            peak_flops=dev.peak(dtype) if dev is not None else None,
            peak_bw=dev.bandwidth if dev is not None else None,
            device=dev.name if dev is not None else "",
            peak_source=dev.sources() if dev is not None else "",
        )

    def _device(self, model: Any) -> tuple[Any, str]:
        from llmtop.agent.flops import roofline

        p = next(iter(model.parameters()), None)
        dtype = str(p.dtype) if p is not None else "float32"
        if self.device is not None:
            return self.device, dtype
        try:
            if p is not None and p.device.type == "cuda":
                import torch

                if dtype == "torch.float32" and torch.backends.cuda.matmul.allow_tf32:
                    dtype = "tf32"  # fp32 matmuls run on tensor cores
                dev = roofline.lookup(torch.cuda.get_device_name(p.device))
                return (roofline.with_overrides(dev) if dev is not None else None), dtype
            return roofline.device_for("cpu"), dtype
        except Exception:
            return None, dtype

    def _warn(self, message: str) -> None:
        core.warn_safely(self.ctx, self.name, message)
