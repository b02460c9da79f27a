"""FLOPs, MACs and bytes moved per module and per aten op, for one model and one input-shape signature.

Counting runs a forward pass under a ``TorchDispatchMode`` (every aten op, with its module stack)
plus a ``TorchFunctionMode`` that sees ``scaled_dot_product_attention`` before it is lowered, so the
attention formula knows ``is_causal`` and grouped-query heads. On meta tensors nothing is computed or
allocated, so a 7B model is counted in seconds within a few hundred MB.

Conventions (docs/FLOPS.md is the long form):

- FLOPs are the matmul-class work: mm/addmm/bmm/baddbmm, convolutions, attention. One multiply-add
  is 2 FLOPs, so MACs = FLOPs / 2. Elementwise, normalisation and softmax ops are not counted (they
  are memory-bound and a fraction of a percent of a transformer's FLOPs), but their bytes are.
- Attention is counted as the kernel computes it: an eager or masked attention multiplies the full
  L x S square; ``scaled_dot_product_attention(is_causal=True)`` (flash/efficient/cuDNN on GPU, the
  flash kernel on CPU) skips the masked blocks, so only the L(L+1)/2 (query, key) pairs below the
  diagonal are counted. Grouped-query attention does the work of all query heads.
- Bytes per op = distinct tensor inputs read (weights included) + outputs written, as if nothing
  were fused; view ops move 0 bytes; an embedding lookup reads its indices and the rows it gathers
  (not the whole table) and has 0 FLOPs. A module's bytes are the sum over the ops it runs.

The per-op formulas are in ``op_formulas.py``; this module holds the counter and its results.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from llmtop.agent.flops.op_formulas import _prod, attention_flops, op_flops

# --- results -------------------------------------------------------------------------------------


@dataclass
class OpCost:
    """One aten op with one set of input shapes, aggregated over a forward pass."""

    name: str
    calls: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    counted: bool = True  # False: no FLOP formula (elementwise, norms, unknown)
    shapes: str = ""  # input shapes of the first call
    est_s: float = 0.0  # roofline time, summed per call (only when counted with peaks)

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0


@dataclass
class ModuleCost:
    """One module, inclusive of its children; totals over all its calls in the pass."""

    path: str
    cls: str
    depth: int
    params: int  # parameters in the module and its children
    calls: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    self_flops: float = 0.0
    self_bytes: float = 0.0
    out_bytes: float = 0.0  # activations the module returned (all calls)
    # roofline time of the op calls inside it, each call's own time summed (only when counted with
    # peaks): not the time of the module's summed FLOPs and bytes, which would let a compute-bound
    # op hide a memory-bound one, so a module's figure is exactly the sum of its ops'
    est_s: float = 0.0

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0


@dataclass
class Profile:
    modules: list[ModuleCost]
    ops: list[OpCost]
    params: int
    weight_bytes: int
    input_bytes: int
    act_peak_bytes: int  # most forward intermediates alive at once (beyond weights and inputs)
    act_written_bytes: int  # every intermediate written (the unfused activation traffic)
    module_of: dict[int, ModuleCost] = field(default_factory=dict)  # id(module) -> cost

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def macs(self) -> float:
        return self.flops / 2  # every counted FLOP is half of a multiply-add

    @property
    def bytes(self) -> float:
        return sum(o.bytes for o in self.ops)

    @property
    def est_s(self) -> float:
        """Roofline time of the whole pass: every op call's own time, summed (0 without peaks)."""
        return sum(o.est_s for o in self.ops)

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.input_bytes + self.act_peak_bytes

    def coverage(self, peak_flops: float, peak_bw: float) -> float:
        """Share of the estimated (roofline) op time spent in ops that have a FLOP formula."""
        total = covered = 0.0
        for o in self.ops:
            t = roofline_time(o.flops, o.bytes, peak_flops, peak_bw)
            total += t
            if o.counted:
                covered += t
        return covered / total if total else 1.0


def roofline_time(flops: float, nbytes: float, peak_flops: float, peak_bw: float) -> float:
    return max(flops / peak_flops if peak_flops else 0.0, nbytes / peak_bw if peak_bw else 0.0)


# --- counting ------------------------------------------------------------------------------------


def _tensor_bytes(t: Any) -> int:
    """Bytes a kernel touches for ``t``: broadcast (stride-0) dimensions are read once."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _list_shape(a: Any) -> list | None:
    """A list of tensors (cat, stack) shows as its first tensor's shape times the count."""
    if isinstance(a, (list, tuple)) and a and hasattr(a[0], "shape"):
        return [f"{len(a)}*[{'x'.join(map(str, a[0].shape))}]"]
    return None


def _shape_str(shapes: list) -> str:
    return ", ".join("x".join(map(str, s)) for s in shapes if s is not None)


class _Counter:
    """Holds the state of one counting pass; the modes call into it."""

    def __init__(self, model: Any, peaks: tuple[float, float] | None = None) -> None:
        import torch

        self.torch = torch
        self.peaks = peaks  # (FLOP/s, bytes/s): each op call's roofline time is added where it runs
        self.stack: list[ModuleCost] = []
        self.ops: dict[tuple[str, str], OpCost] = {}
        self.modules: dict[int, ModuleCost] = {}
        self.in_sdpa = 0
        self.live: dict[int, list[int]] = {}  # storage id -> [bytes, refs]
        self.cur = self.peak = self.written = 0
        for path, mod in model.named_modules():
            self.modules[id(mod)] = ModuleCost(
                path=path, cls=type(mod).__name__, depth=path.count(".") + 1 if path else 0,
                params=sum(p.numel() for p in mod.parameters()),
            )

    # module stack ------------------------------------------------------------------------------
    def pre(self, mod: Any, args: Any) -> None:
        cost = self.modules.get(id(mod))
        if cost is not None:
            cost.calls += 1
            self.stack.append(cost)

    def post(self, mod: Any, args: Any, out: Any) -> None:
        cost = self.modules.get(id(mod))
        if cost is not None and self.stack and self.stack[-1] is cost:
            self.stack.pop()
            cost.out_bytes += sum(_tensor_bytes(t) for t in _tensors(out))

    # ops ---------------------------------------------------------------------------------------
    def record(self, name: str, flops: float | None, nbytes: float, shapes: list) -> None:
        key = (name, _shape_str(shapes))  # one row per op and input shapes: one intensity per row
        op = self.ops.get(key)
        if op is None:
            op = self.ops[key] = OpCost(name, counted=flops is not None, shapes=key[1])
        op.calls += 1
        op.flops += flops or 0.0
        op.bytes += nbytes
        t = roofline_time(flops or 0.0, nbytes, *self.peaks) if self.peaks else 0.0
        op.est_s += t
        if self.stack:
            top = self.stack[-1]
            top.self_flops += flops or 0.0
            top.self_bytes += nbytes
            seen: set[int] = set()
            for m in self.stack:  # a shared module may be on the stack twice: count it once
                if id(m) not in seen:
                    seen.add(id(m))
                    m.flops += flops or 0.0
                    m.bytes += nbytes
                    m.est_s += t

    def track(self, out: Any) -> None:
        """Follow the lifetime of each output storage to find the activation peak."""
        for t in _tensors(out):
            try:
                key = t.untyped_storage()._cdata
            except Exception:
                continue
            entry = self.live.get(key)
            if entry is None:
                n = _tensor_bytes(t)
                entry = self.live[key] = [n, 0]
                self.cur += n
                self.written += n
                self.peak = max(self.peak, self.cur)
            entry[1] += 1
            weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                self.cur -= entry[0]
                del self.live[key]


def _tensors(obj: Any) -> list:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors(x)]
    if hasattr(obj, "to_tuple"):  # transformers ModelOutput
        try:
            return _tensors(obj.to_tuple())
        except Exception:
            return []
    return []


def _flatten_args(func: Any, args: tuple, kwargs: dict) -> list:
    """Positional view of every schema argument (keyword-only ones included), defaults filled."""
    out = list(args)
    try:
        for a in func._schema.arguments[len(args):]:
            if a.name in kwargs:
                out.append(kwargs[a.name])
            else:
                out.append(a.default_value if a.has_default_value() else None)
    except Exception:
        out.extend(kwargs.values())
    return out


def _is_view(func: Any) -> bool:
    try:
        return any(r.alias_info is not None for r in func._schema.returns) or func.is_view
    except Exception:
        return False


_NO_BYTES = frozenset({"aten::_unsafe_view", "aten::detach", "aten::lift_fresh", "aten::empty",
                       "aten::empty_strided", "aten::empty_like", "aten::new_empty"})


def _may_draw(func: Any, args: tuple, kwargs: dict) -> bool:
    """False for a seeded op told not to draw (``dropout_p=0``, ``train=False``: attention kernels)."""
    try:
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name, arg.default_value)
            if (arg.name == "dropout_p" and value == 0) or (arg.name == "train" and value is False):
                return False
    except Exception:
        pass
    return True


def _all_meta(args: tuple, kwargs: dict, is_tensor: type) -> bool:
    """True when the op's tensors are meta tensors, or it makes them (``device=meta``)."""
    dev = kwargs.get("device")
    if dev is not None:
        return str(dev) == "meta"
    tensors = [t for a in (*args, *kwargs.values()) for t in _tensors(a)]
    return bool(tensors) and all(t.device.type == "meta" for t in tensors if isinstance(t, is_tensor))


def count(model: Any, args: tuple = (), kwargs: dict | None = None,
          peaks: tuple[float, float] | None = None) -> Profile:
    """Run ``model(*args, **kwargs)`` once under the counters; use meta tensors to compute nothing.
    ``peaks`` (FLOP/s, bytes/s): also sum each op call's roofline time into its op and modules."""
    import torch

    kwargs = kwargs or {}
    session = Counting(model, peaks=peaks)
    session.inputs(args, kwargs)
    with torch.no_grad(), session:
        out = model(*args, **kwargs)
        del out
    return session.profile()


class Counting:
    """The counters of one forward pass of ``model``, as a context (``count`` is the usual way in).

    Entered around a real call (the live instrument's sampled-forward fallback, for models that
    cannot run on meta), it only observes: every op runs exactly as it would have, on the same
    tensors, in the same order, and no generator is touched. ``enter``/``exit`` are split so a hook
    at a root call's start and one at its end can bracket the call; ``root`` names a module already
    running when entered (its pre-hook has passed), whose costs still count.
    """

    def __init__(self, model: Any, observing: bool = False, peaks: tuple[float, float] | None = None) -> None:
        self.model = model
        # observing: around the script's own call, whose random ops are its own draws (they happen
        # whether counted or not); otherwise a random op on real tensors is refused
        self.observing = observing
        self.c = _Counter(model, peaks)
        self._handles: list[Any] = []
        self._modes: list[Any] = []
        self.weights = sum(p.numel() * p.element_size() for p in model.parameters())
        self.weights += sum(b.numel() * b.element_size() for b in model.buffers())
        self.input_bytes = 0

    def inputs(self, args: tuple, kwargs: dict) -> None:
        self.input_bytes = sum(_tensor_bytes(t) for t in _tensors(list(args)) + _tensors(kwargs))

    def __enter__(self) -> Counting:
        self.enter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.exit()

    def enter(self, root: Any = None) -> None:
        c = self.c
        for mod in self.model.modules():
            self._handles.append(mod.register_forward_pre_hook(c.pre))
            self._handles.append(mod.register_forward_hook(c.post))
        if root is not None:
            c.pre(root, ())
        functions, dispatch = _modes(c, self.observing)
        functions.__enter__()
        self._modes.append(functions)
        dispatch.__enter__()
        self._modes.append(dispatch)

    def exit(self) -> None:
        while self._modes:
            self._modes.pop().__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.c.stack.clear()

    def profile(self) -> Profile:
        c = self.c
        return Profile(
            modules=list(c.modules.values()),
            ops=sorted(c.ops.values(), key=lambda o: -o.flops),
            params=sum(p.numel() for p in self.model.parameters()),
            weight_bytes=self.weights,
            input_bytes=self.input_bytes,
            act_peak_bytes=c.peak,
            act_written_bytes=c.written,
            module_of=dict(c.modules),
        )


def _modes(c: _Counter, observing: bool = False) -> tuple[Any, Any]:
    """(the function mode, the dispatch mode) that feed counter ``c``."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    is_tensor = torch.Tensor
    aten = torch.ops.aten
    local_scalar = aten._local_scalar_dense.default
    truth_ops = {aten.all.default: True, aten.any.default: False, aten.is_nonzero.default: False,
                 aten.eq.Scalar: True, aten.eq.Tensor: True, aten.ne.Scalar: False, aten.ne.Tensor: False}
    scalar_only = {aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ne.Tensor}  # `mask.sum() == n`
    seeded = torch.Tag.nondeterministic_seeded

    class Dispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: N805
            kwargs = kwargs or {}
            if func is local_scalar and args[0].device.type == "meta":
                # Data-dependent checks on meta ids (`pad in input_ids`, "one packed sequence?"):
                # answer as for ordinary unpadded input. Other reads of values stay errors.
                truth = getattr(args[0], "_llmtop_truth", None)
                if truth is not None:
                    return truth
            if (not observing and seeded in func.tags and _may_draw(func, args, kwargs)
                    and not _all_meta(args, kwargs, is_tensor)):
                # a random op off the meta device would draw from the script's generator
                raise RuntimeError(f"{func.__name__} on real tensors: not counted (it would draw "
                                   "from the script's random generator)")
            out = func(*args, **kwargs)
            if func in truth_ops and isinstance(out, is_tensor) and out.device.type == "meta" and (
                    func not in scalar_only or out.dim() == 0):
                out._llmtop_truth = truth_ops[func]
            if c.in_sdpa:
                c.track(out)
                return out
            name = "aten::" + func.__name__.split(".")[0]
            flat = _flatten_args(func, args, kwargs)
            shapes = [list(a.shape) if isinstance(a, is_tensor) else _list_shape(a) for a in flat]
            if _is_view(func) or name in _NO_BYTES:
                c.record(name, 0.0, 0.0, shapes)
                return out
            outs = _tensors(out)
            if name == "aten::embedding":
                nbytes = _tensor_bytes(flat[1]) + 2 * sum(_tensor_bytes(t) for t in outs)
            else:
                seen: set[int] = set()
                nbytes = 0
                for a in flat:
                    for t in _tensors(a):
                        if id(t) not in seen:
                            seen.add(id(t))
                            nbytes += _tensor_bytes(t)
                nbytes += sum(_tensor_bytes(t) for t in outs)
            values = [None if isinstance(a, is_tensor) else a for a in flat]
            flops = op_flops(name, shapes, values, [list(t.shape) for t in outs])
            c.record(name, flops, nbytes, shapes)
            c.track(out)
            return out

    class Functions(TorchFunctionMode):
        """Sees sdpa before it is lowered: causal flag and GQA heads are known here."""

        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: N805
            kwargs = kwargs or {}
            if func is not F.scaled_dot_product_attention or c.in_sdpa:
                return func(*args, **kwargs)
            q, k, v = args[:3] if len(args) >= 3 else (kwargs["query"], kwargs["key"], kwargs["value"])
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            causal = bool(args[5] if len(args) > 5 else kwargs.get("is_causal", False))
            flops = attention_flops(q.shape, k.shape, v.shape, causal=causal and mask is None)
            out_shape = (*q.shape[:-1], v.shape[-1])
            nbytes = sum(_tensor_bytes(t) for t in (q, k, v)) + _prod(out_shape) * q.element_size()
            if mask is not None:
                nbytes += _tensor_bytes(mask)
            c.record("aten::scaled_dot_product_attention", flops, nbytes,
                     [list(q.shape), list(k.shape), list(v.shape)])
            if q.device.type == "meta":  # the math lowering would only make meta scores: skip it
                out = q.new_empty(out_shape)
                c.track(out)
                return out
            c.in_sdpa += 1
            try:
                return func(*args, **kwargs)
            finally:
                c.in_sdpa -= 1

    return Functions(), Dispatch()
