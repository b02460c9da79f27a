"""Input signatures of a model's root call: what the FLOPs are counted for, once each.

``signature(args, kwargs, autocast)`` turns a call's inputs into a hashable spec, cheaply enough for
the hot path (it runs at the start of each detailed root call): tensors by shape and dtype, plain
values as they are, lists and dicts two levels deep, a transformers KV cache by its per-layer
key/value shapes with the past length bucketed (``bucket_past``), anything else opaque by its type
name. ``describe`` writes a signature as people read it. The specs are rebuilt as meta inputs by
``meta_rebuild.py``. No tensor is copied or kept.
"""

from __future__ import annotations

from typing import Any

_PLAIN = frozenset({bool, int, float, str, type(None)})


_Tensor: Any = None  # torch.Tensor, set when torch is loaded (this module imports without torch)
_Device: Any = None


def bucket_past(n: int) -> int:
    """A KV cache's past length as counted: rounded up to 64 tokens up to 1024, then to an eighth of
    its power of two (at most 12.5 % more). A generate call of any length then needs a bounded
    number of counts (16 buckets up to 1024 tokens, 8 per doubling after), each exact to the bucket."""
    if n <= 0:
        return 0
    if n <= 1024:
        return -(-n // 64) * 64
    step = (1 << (n.bit_length() - 1)) // 8
    return -(-n // step) * step


def _cache_spec(x: Any) -> Any:
    """A transformers cache (``DynamicCache`` and the like: a ``layers`` list of objects holding
    key/value tensors shaped (batch, heads, past, dim)) as a hashable spec, past length bucketed;
    None when it does not look like one (it is then opaque)."""
    layers = getattr(x, "layers", None)
    if not isinstance(layers, list):
        return None
    attrs = []
    for k, v in vars(x).items():
        if k == "layers":
            continue
        if type(v) not in _PLAIN:
            return None
        attrs.append((k, v))
    specs = []
    for layer in layers:
        fields = []
        for k, v in vars(layer).items():
            t = type(v)
            if t in _PLAIN:
                fields.append((k, v))
            elif t is _Tensor or isinstance(v, _Tensor):
                shape = tuple(v.shape)
                if len(shape) >= 2:  # (…, past, dim): the past length is the second-to-last
                    shape = shape[:-2] + (bucket_past(shape[-2]), shape[-1])
                fields.append((k, ("T", shape, v.dtype)))
            elif t is _Device:
                fields.append((k, ("DEV",)))
            else:
                return None
        specs.append((type(layer), tuple(fields)))
    return ("C", type(x), tuple(attrs), tuple(specs))


def _spec(x: Any, depth: int = 0) -> Any:
    """A hashable description of one argument: shapes and dtypes of tensors, plain values as is."""
    global _Tensor, _Device
    t = type(x)
    if t in _PLAIN:
        return x
    if _Tensor is None:
        import torch

        _Tensor, _Device = torch.Tensor, torch.device
    # `type is` first: isinstance against torch.Tensor goes through a slow metaclass check
    if t is _Tensor or isinstance(x, _Tensor):
        return ("T", x.shape, x.dtype)  # torch.Size is a hashable tuple
    if depth < 2 and isinstance(x, (list, tuple)):
        return ("L", tuple(_spec(v, depth + 1) for v in x))
    if depth < 2 and isinstance(x, dict):
        return ("D", tuple((k, _spec(v, depth + 1)) for k, v in x.items()))
    if t.__name__.endswith("Cache"):
        spec = _cache_spec(x)
        if spec is not None:
            return spec
    return ("O", t.__name__)  # opaque: not rebuilt on meta


def signature(args: tuple, kwargs: dict, autocast: Any = None) -> tuple:
    """(args, kwargs, autocast dtype or None) as hashable specs.

    With a KV cache of past length P among them, a tensor whose last dimension spans the past and
    the new tokens (``attention_mask``: P + q) is described at the bucketed past plus q, like the
    cache: otherwise every decode call (its mask one token longer) would be a signature of its own.
    """
    sargs = tuple(_spec(a) for a in args)
    skw = tuple((k, _spec(v)) for k, v in kwargs.items())
    past = _exact_past(args, kwargs)
    if past:
        sargs = tuple(_rebucket(x, past) for x in sargs)
        skw = tuple((k, _rebucket(v, past)) for k, v in skw)
    return (sargs, skw, autocast)


def _exact_past(args: tuple, kwargs: dict) -> int:
    """The past length of the first transformers cache among the arguments (0 if none)."""
    for x in (*args, *kwargs.values()):
        if type(x).__name__.endswith("Cache"):
            for layer in getattr(x, "layers", None) or ():
                for v in vars(layer).values():
                    if isinstance(v, _Tensor) and v.dim() >= 2:
                        return int(v.shape[-2])
    return 0


def _rebucket(s: Any, past: int) -> Any:
    """A tensor spec whose last dimension is past + q (q new tokens, at most 64) at bucket(past) + q."""
    if isinstance(s, tuple) and s and s[0] == "T" and len(s[1]) >= 2 and past < s[1][-1] <= past + 64:
        return ("T", tuple(s[1][:-1]) + (bucket_past(past) + s[1][-1] - past,), s[2])
    return s


def autocast_dtype(torch: Any) -> Any:
    """The dtype autocast runs matmuls in on this thread (CUDA first), or None."""
    for dev in ("cuda", "cpu"):
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    return None


def _past_len(s: Any) -> int | None:
    """The (bucketed) past length of a cache spec."""
    for _cls, fields in s[3]:
        for _k, v in fields:
            if isinstance(v, tuple) and v and v[0] == "T" and len(v[1]) >= 2:
                return int(v[1][-2])
    return 0


def describe(sig: tuple) -> str:
    """``input_ids:1x128:int64 use_cache=False`` — the signature as people read it."""

    def one(s: Any) -> str:
        if isinstance(s, tuple) and s and s[0] == "T":
            return f"{'x'.join(map(str, s[1])) or 'scalar'}:{str(s[2]).replace('torch.', '')}"
        if isinstance(s, tuple) and s and s[0] == "O":
            return s[1]
        if isinstance(s, tuple) and s and s[0] == "C":
            return f"{s[1].__name__}(past≤{_past_len(s)})"
        if isinstance(s, tuple) and s and s[0] in ("L", "D"):
            return "[…]"
        return repr(s)

    args, kwargs, autocast = sig
    parts = [one(a) for a in args] + [f"{k}:{one(v)}" for k, v in kwargs]
    if autocast is not None:
        parts.append(f"autocast:{str(autocast).replace('torch.', '')}")
    return " ".join(parts)
