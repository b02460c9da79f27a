"""Type checks for decoded events: a frame from a socket or a file is untrusted input.

``EventDecoder`` builds each event from a msgpack map; a field of the wrong type (a string where a
list of floats belongs, a map nested a thousand deep) would otherwise pass as the dataclass and
fail much later as a TypeError or RecursionError inside a view or the report. ``checker(cls)``
compiles the dataclass's field annotations once into a function that raises ``ProtocolError``
(one line) for the first field that does not match, and for parallel arrays of unequal length.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any

from .frames import ProtocolError

MAX_DEPTH = 16  # free-form values (session options, span attributes) nest at most this deep
MAX_INT = 1 << 63  # msgpack gives up to 64-bit integers; beyond int64 is no count or id we send
# Wall-clock times (seconds since the epoch) and durations: finite and within any date a clock can
# give, so that no formatter or datetime overflows on them. Loss and other measurements may be NaN.
TIME_FIELDS = frozenset(("t", "start", "started", "since", "dur_ms"))
MAX_TIME = 1e12

Check = Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return type(v) is int and -MAX_INT <= v < MAX_INT


def _is_float(v: Any) -> bool:
    # ints are numbers too (an agent may send 0 for 0.0); bools are not
    return type(v) is float or _is_int(v)


def _is_str(v: Any) -> bool:
    return type(v) is str


def _is_bool(v: Any) -> bool:
    return type(v) is bool


def _depth_ok(v: Any, depth: int = 0) -> bool:
    if depth > MAX_DEPTH:
        return False
    if isinstance(v, dict):
        return all(_depth_ok(k, depth + 1) and _depth_ok(x, depth + 1) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return all(_depth_ok(x, depth + 1) for x in v)
    return True


_SCALARS: dict[Any, Check] = {int: _is_int, float: _is_float, str: _is_str, bool: _is_bool}
# Element checks done at C speed for the big per-step arrays: the set of element types must be a
# subset of these (an int outside int64 cannot come out of msgpack).
_FAST: dict[Any, frozenset[type]] = {float: frozenset((float, int)), int: frozenset((int,)),
                                     str: frozenset((str,)), bool: frozenset((bool,))}


def _compile(tp: Any) -> Check:
    if tp is Any:
        return _depth_ok
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_compile(a) for a in args if a is not type(None)]
        nullable = type(None) in args
        return lambda v: (v is None and nullable) or any(p(v) for p in parts)
    if origin is list:
        (elem,) = args
        fast = _FAST.get(elem)
        if fast is not None:
            return lambda v: type(v) is list and set(map(type, v)) <= fast
        each = _compile(elem)
        return lambda v: type(v) is list and all(each(x) for x in v)
    if origin is dict:
        key, value = (_compile(a) for a in args)
        return lambda v: type(v) is dict and all(key(k) and value(x) for k, x in v.items())
    # A field type this module has not learnt (a schema change): bounded in depth, as free-form
    # values are, rather than refusing every event of the kind. Teach it here to check it fully.
    return _depth_ok


# Parallel arrays: (the array that sets the length, arrays that must match it, arrays that are
# either empty or match it).
PARALLEL: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "model": ("ids", ("paths", "classes", "params", "parents"), ("trainable", "dtypes", "compiled")),
    "layers": ("ids", ("fwd_ms", "fwd_self_ms", "calls"), ("bwd_ms", "bwd_self_ms", "act_bytes")),
    "ops": ("names", ("self_ms", "calls"), ("flops", "shapes")),
    "flops": ("ids", ("flops", "bytes"), ()),
}


def checker(cls: type) -> Callable[[Any], None]:
    """A function that raises ``ProtocolError`` if an instance of ``cls`` has a field of the wrong
    type or ragged parallel arrays."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, _timed(_compile(hints[f.name])) if f.name in TIME_FIELDS else _compile(hints[f.name]))
              for f in dataclasses.fields(cls)]
    kind = getattr(cls, "KIND", "")
    parallel = PARALLEL.get(kind)

    def check(event: Any) -> None:
        values = event.__dict__
        for name, ok in fields:
            v = values[name]
            if not ok(v):
                raise ProtocolError(f"malformed {kind!r} event: field {name!r} has a bad value "
                                    f"({type(v).__name__}{_hint(v)})")
        if parallel is not None:
            lead, same, optional = parallel
            n = len(values[lead])
            for name in same:
                if len(values[name]) != n:
                    raise ProtocolError(f"malformed {kind!r} event: {name} has {len(values[name])} "
                                        f"values for {n} {lead}")
            for name in optional:
                if values[name] and len(values[name]) != n:
                    raise ProtocolError(f"malformed {kind!r} event: {name} has {len(values[name])} "
                                        f"values for {n} {lead}")

    return check


def _timed(ok: Check) -> Check:
    return lambda v: ok(v) and (v is None or (math.isfinite(v) and -MAX_TIME < v < MAX_TIME))


def _hint(v: Any) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return ""
    if isinstance(v, (list, dict, str)):
        return f" of length {len(v)}"
    return ""
