"""The FLOP formulas of aten ops, as pure functions of shapes and plain argument values.

``op_flops(name, shapes, values)`` is the FLOPs of one call of an aten op: matmuls, convolutions and
the attention kernels (forward and fused backward, their layouts and causal-mask conventions) have a
formula in ``FORMULAS``; views, copies and gathers are 0 by definition (``ZERO_FLOP_OPS``); anything
else has none. The counter (``counting.py``) applies them to every op of a pass, and the live ops
profile (``instruments/ops.py``) to profiler rows, which only have shapes; ``PARENT_OPS`` names the
composites whose child kernel carries the work there. Conventions are in ``counting.py`` and
docs/FLOPS.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

# --- formulas on shapes (pure; shared with the live ops profile, which only has shapes) -----------

Shape = Sequence[int]


def _prod(xs: Shape) -> int:
    return math.prod(int(x) for x in xs)


def mm_flops(a: Shape, b: Shape) -> float:
    return 2.0 * a[0] * a[1] * b[1]


def bmm_flops(a: Shape, b: Shape) -> float:
    return 2.0 * a[0] * a[1] * a[2] * b[2]


def causal_pairs(q_len: int, kv_len: int, bottom_right: bool = False) -> int:
    """(query, key) pairs a causal kernel computes: sum over queries i of the keys it may see.

    PyTorch's ``is_causal`` aligns the mask top-left (query i sees keys 0..i); the KV-cache
    convention (and mem-efficient ``custom_mask_type=2``) aligns it bottom-right.
    """
    if bottom_right:
        offset = kv_len - q_len
        return sum(max(0, min(offset + i + 1, kv_len)) for i in range(q_len)) if offset < 0 else (
            q_len * offset + q_len * (q_len + 1) // 2)
    if q_len <= kv_len:
        return q_len * (q_len + 1) // 2
    return kv_len * (kv_len + 1) // 2 + (q_len - kv_len) * kv_len


def attention_flops(q: Shape, k: Shape, v: Shape, causal: bool = False, bottom_right: bool = False) -> float:
    """QK^T and PV for q (…, Hq, L, E), k (…, Hkv, S, E), v (…, Hkv, S, Ev); GQA does Hq heads' work."""
    *lead, _hq, q_len, e = q
    kv_len, ev = k[-2], v[-1]
    pairs = causal_pairs(q_len, kv_len, bottom_right) if causal else q_len * kv_len
    heads = _prod(lead) * q[-3]
    return 2.0 * heads * pairs * (e + ev)


def attention_backward_flops(q: Shape, k: Shape, v: Shape, causal: bool = False,
                             bottom_right: bool = False) -> float:
    """Fused attention backward: dV, dP, dQ, dK plus the recomputed QK^T (flash-style kernels keep
    only the log-sum-exp, not the probabilities): 2 x pairs x (3E + 2Ev) per head."""
    *lead, _hq, q_len, e = q
    kv_len, ev = k[-2], v[-1]
    pairs = causal_pairs(q_len, kv_len, bottom_right) if causal else q_len * kv_len
    return 2.0 * _prod(lead) * q[-3] * pairs * (3 * e + 2 * ev)


def conv_flops(x: Shape, w: Shape, out: Shape | None, transposed: bool = False) -> float:
    """2 x batch x spatial positions x weight elements (spatial: output, or input when transposed)."""
    spatial = x[2:] if transposed or out is None else out[2:]
    return 2.0 * x[0] * _prod(spatial) * _prod(w)


def _arg(values: Sequence[Any], i: int, default: Any = None) -> Any:
    return values[i] if i < len(values) and values[i] not in (None, "") else default


def _truthy(v: Any) -> bool:
    return v is True or str(v).lower() in ("true", "1")


# name -> formula(shapes, values, out_shapes): shapes[i] is a list for a tensor argument, else None;
# values[i] the plain value of a non-tensor argument (or "" when the profiler did not record it).
Formula = Callable[[list, list, list], float]


def _f_mm(s: list, v: list, o: list) -> float:
    return mm_flops(s[0], s[1])


def _f_addmm(s: list, v: list, o: list) -> float:
    return mm_flops(s[1], s[2])


def _f_bmm(s: list, v: list, o: list) -> float:
    return bmm_flops(s[0], s[1])


def _f_baddbmm(s: list, v: list, o: list) -> float:
    return bmm_flops(s[1], s[2])


def _causal_at(i: int) -> Formula:
    def f(s: list, v: list, o: list) -> float:
        return attention_flops(s[0], s[1], s[2], causal=_truthy(_arg(v, i, False)))

    return f


def _blhd(x: Shape) -> list:
    """(B, L, H, D) as the flash/mem-efficient kernels take it -> (B, H, L, D); varlen (T, H, D) as B=1."""
    if len(x) == 3:
        return [1, x[1], x[0], x[2]]
    return [x[0], x[2], x[1], x[3]]


def _f_flash_forward(s: list, v: list, o: list) -> float:
    return attention_flops(_blhd(s[0]), _blhd(s[1]), _blhd(s[2]), causal=_truthy(_arg(v, 8, False)))


def _f_efficient_forward(s: list, v: list, o: list) -> float:
    mask_type = int(_arg(v, 9, 0) or 0)  # 0 none, 1 causal top-left, 2 causal bottom-right
    return attention_flops(_blhd(s[0]), _blhd(s[1]), _blhd(s[2]), causal=mask_type in (1, 2),
                           bottom_right=mask_type == 2)


def _backward_at(i: int, blhd: bool = False, mask_type: bool = False) -> Formula:
    """Backward kernels: query, key, value are arguments 1-3; the causal flag (or mask type) is at i."""

    def f(s: list, v: list, o: list) -> float:
        q, k, val = (_blhd(x) for x in s[1:4]) if blhd else s[1:4]
        flag = _arg(v, i, 0)
        if mask_type:
            mt = int(flag or 0)
            return attention_backward_flops(q, k, val, causal=mt in (1, 2), bottom_right=mt == 2)
        return attention_backward_flops(q, k, val, causal=_truthy(flag))

    return f


def _f_full(s: list, v: list, o: list) -> float:
    return attention_flops(s[0], s[1], s[2], causal=False)  # the math path multiplies the full square


def _f_convolution(s: list, v: list, o: list) -> float:
    return conv_flops(s[0], s[1], o[0] if o else None, _truthy(_arg(v, 6, False)))


def _f_conv_backend(s: list, v: list, o: list) -> float:
    # mkldnn/cudnn/slow backends: the output shape is known in dispatch; from a profiler row it is
    # not, so the stride-1 'same' approximation (input spatial size) is used there.
    return conv_flops(s[0], s[1], o[0] if o else s[0], False)


FORMULAS: dict[str, Formula] = {
    "aten::mm": _f_mm,
    "aten::_scaled_mm": _f_mm,
    "aten::addmm": _f_addmm,
    "aten::bmm": _f_bmm,
    "aten::baddbmm": _f_baddbmm,
    "aten::convolution": _f_convolution,
    "aten::_convolution": _f_convolution,
    "aten::mkldnn_convolution": _f_conv_backend,
    "aten::cudnn_convolution": _f_conv_backend,
    "aten::_slow_conv2d_forward": _f_conv_backend,
    "aten::scaled_dot_product_attention": _causal_at(5),
    "aten::_scaled_dot_product_flash_attention_for_cpu": _causal_at(4),
    "aten::_scaled_dot_product_flash_attention": _causal_at(4),
    "aten::_scaled_dot_product_efficient_attention": _causal_at(6),
    "aten::_scaled_dot_product_cudnn_attention": _causal_at(6),
    "aten::_scaled_dot_product_attention_math": _f_full,
    "aten::_flash_attention_forward": _f_flash_forward,
    "aten::_efficient_attention_forward": _f_efficient_forward,
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": _backward_at(7),
    "aten::_scaled_dot_product_flash_attention_backward": _backward_at(11),
    "aten::_scaled_dot_product_efficient_attention_backward": _backward_at(11),
    "aten::_scaled_dot_product_cudnn_attention_backward": _backward_at(14),
    "aten::_flash_attention_backward": _backward_at(11, blhd=True),
    "aten::_efficient_attention_backward": _backward_at(14, blhd=True, mask_type=True),
}

# Composite ops whose work a child op carries (in a profiler trace both rows appear).
PARENT_OPS = frozenset({
    "aten::linear", "aten::matmul", "aten::einsum", "aten::conv1d", "aten::conv2d", "aten::conv3d",
    "aten::convolution", "aten::_convolution", "aten::scaled_dot_product_attention",
    # on CUDA these call _flash_attention_forward / _efficient_attention_forward, which hold the kernels
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_flash_attention_backward",
    "aten::_scaled_dot_product_efficient_attention_backward",
})

# Ops with 0 FLOPs by definition: views, copies, gathers, creation, concatenation.
ZERO_FLOP_OPS = frozenset({
    "aten::embedding", "aten::index_select", "aten::gather", "aten::index", "aten::cat", "aten::stack",
    "aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to", "aten::empty",
    "aten::empty_like", "aten::empty_strided", "aten::zeros", "aten::zeros_like", "aten::ones",
    "aten::ones_like", "aten::full", "aten::fill_", "aten::zero_", "aten::arange", "aten::view",
    "aten::reshape", "aten::_unsafe_view", "aten::expand", "aten::permute", "aten::transpose",
    "aten::t", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::narrow", "aten::detach", "aten::alias",
    "aten::as_strided", "aten::resize_", "aten::lift_fresh", "aten::flatten", "aten::unflatten",
    "aten::repeat", "aten::new_empty", "aten::new_zeros", "aten::scalar_tensor", "aten::masked_fill",
    "aten::where", "aten::tril", "aten::triu", "aten::dropout", "aten::native_dropout",
})


def op_flops(name: str, shapes: list, values: list, out_shapes: list | None = None) -> float | None:
    """FLOPs of one call of aten op ``name`` (``aten::mm``), or None when there is no formula."""
    f = FORMULAS.get(name)
    if f is None:
        return 0.0 if name in ZERO_FLOP_OPS else None
    try:
        return float(f(shapes, values, out_shapes or []))
    except (TypeError, ValueError, IndexError):
        return None


def has_formula(name: str) -> bool:
    return name in FORMULAS or name in ZERO_FLOP_OPS
