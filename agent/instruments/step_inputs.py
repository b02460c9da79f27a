"""What a root forward's inputs say about a step: its samples and tokens, and where a model keeps
the batch.

Called by the step tracker's root-forward listener (agent/instruments/steps.py) on the step loop's
thread: ``_input_shape`` runs on every counted root forward (hot path: no allocation beyond its
result), ``batch_dim`` once per model root. ``_TENSOR``/``_BOOL`` hold ``torch.Tensor`` and
``torch.bool`` once torch is loaded (set by the tracker's ``install``).
"""

from __future__ import annotations

import sys
from typing import Any


def batch_dim(module: Any) -> int:
    """Where a model's inputs hold the batch: 1 when its first module with a ``batch_first`` flag
    (``nn.LSTM``/``GRU``/``RNN``, ``nn.Transformer`` and its layers, ``nn.MultiheadAttention``)
    takes sequence-first inputs, as torch's default is; else 0."""
    try:
        for m in module.modules():
            bf = getattr(m, "batch_first", None)
            if bf.__class__ is bool and m.__class__.__module__.startswith("torch.nn."):
                return 0 if bf else 1
    except Exception:
        pass
    return 0


def _input_shape(args: tuple, kwargs: dict, bdim: int = 0) -> tuple[int | None, int | None]:
    """(samples, tokens) from a root forward's inputs: ``input_ids`` or the first tensor argument.
    ``bdim``: the batch's dimension (1 for sequence-first models)."""
    tensor = _TENSOR[0]
    if tensor is None:
        torch = sys.modules.get("torch")
        if torch is None:
            return None, None
        tensor = _TENSOR[0] = torch.Tensor
    x = kwargs.get("input_ids") if kwargs else None
    if x is None and args and args[0].__class__ is tensor:
        x = args[0]  # the common case: model(x)
    elif x is None or not isinstance(x, tensor):
        x = None
        for a in args:
            if isinstance(a, tensor):
                x = a
                break
        else:
            if kwargs:
                for a in kwargs.values():
                    if isinstance(a, tensor):
                        x = a
                        break
    if x is None:
        return None, None
    shape = x.shape
    if not shape:
        return None, None
    dtype = x.dtype
    n = shape[bdim] if bdim < len(shape) else shape[0]
    if len(shape) == 2 and not dtype.is_floating_point and not dtype.is_complex and dtype is not _BOOL[0]:
        return n, shape[0] * shape[1]
    return n, None


_TENSOR: list[Any] = [None]
_BOOL: list[Any] = [None]
