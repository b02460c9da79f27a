"""A counted call rebuilt on the meta device: its inputs from their signature, its model without weights.

``_rebuild`` turns a spec of ``signatures.py`` back into a meta value (a KV cache as an object of the
same class holding meta keys/values of the bucketed past; opaque objects cannot be rebuilt);
``meta_copy`` deep-copies a model with every parameter and buffer replaced by a meta tensor and its
hooks dropped, so no weight is copied; ``unwrap`` finds the model inside a compiled or distributed
wrapper, whose own forward must not run on meta.
"""

from __future__ import annotations

import copy
from typing import Any


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
        if kind == "C":
            return True, _rebuild_cache(s, torch, autocast)
        if kind == "DEV":
            return True, torch.device("meta")
        if kind == "O":
            return False, None
    return True, s


def _rebuild_cache(s: tuple, torch: Any, autocast: Any) -> Any:
    """A cache object of the spec's class holding meta keys/values of the (bucketed) past length:
    built without ``__init__`` (its signature changes across transformers versions), with the same
    attributes the live one had."""
    _, cls, attrs, layers = s
    cache = cls.__new__(cls)
    vars(cache).update(dict(attrs))
    built = []
    for layer_cls, fields in layers:
        layer = layer_cls.__new__(layer_cls)
        for k, v in fields:
            ok, val = _rebuild(v, torch, autocast)
            setattr(layer, k, val if ok else None)
        built.append(layer)
    cache.layers = built
    return cache


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
