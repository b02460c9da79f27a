"""Type checks for decoded events: a frame from a socket or a file is untrusted input.

``EventDecoder`` builds each event from a msgpack map; a field of the wrong type (a string where a
list of floats belongs, a map nested a thousand deep) would otherwise pass as the dataclass and
fail much later as a TypeError or RecursionError inside a view or the report. ``checker(cls)``
compiles the dataclass's field annotations once into a function that raises ``ProtocolError``
(one line) for the first field that does not match, and for parallel arrays of unequal length.

``fast_decoder(cls, slow)`` is the same contract at ingest speed (a viewer of a 64-rank job takes
tens of thousands of events a second): one generated straight-line function per class that reads
each field from the map, tests it with inline expressions (exact scalar types, one C-level
``set(map(type, ...))`` pass per array) and calls the class with every field positionally. It only ever
*accepts* what ``checker`` accepts; anything it does not accept at once (a missing field, an int
where a float is usual, any defect) is handed to ``slow`` (``Event._from_map_checked``, the former ``from_map``),
which decides and words the error, so acceptance and every message stay exactly ``checker``'s.
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


# --- the generated fast path -----------------------------------------------------------------

_MISSING = object()
# Values that ``_depth_ok`` accepts without looking inside (anything not a dict, list or tuple)
_ATOMS = frozenset((int, float, str, bool, type(None), bytes))
_STR = frozenset((str,))
_FLOAT = frozenset((float,))  # float values only: ints need their int64 bounds (the field's check)
_BOOL = frozenset((bool,))
# Exact element types a dict's values may have for the one-pass test (keys and values)
_DICT_FAST: dict[Any, frozenset[type]] = {str: _STR, float: _FLOAT, bool: _BOOL, Any: _ATOMS}


def _expr(tp: Any, v: str) -> str | None:
    """A Python expression true only if ``v`` passes ``_compile(tp)``; None where none is written
    here (the field then calls its compiled check). It may be stricter than the check (the slow
    path then decides), never looser. Bounds are written as literals (constants, not globals)."""
    if tp is int:
        return f"(type({v}) is int and {-MAX_INT} <= {v} < {MAX_INT})"
    if tp is float:
        return f"(type({v}) is float or (type({v}) is int and {-MAX_INT} <= {v} < {MAX_INT}))"
    if tp is str:
        return f"type({v}) is str"
    if tp is bool:
        return f"type({v}) is bool"
    if tp is Any:
        return f"type({v}) in ATOMS"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_expr(a, v) for a in args if a is not type(None)]
        if None in parts:
            return None
        if type(None) in args:
            parts.insert(0, f"{v} is None")
        return "(" + " or ".join(parts) + ")"
    if origin is list and args[0] in _FAST:
        return f"(type({v}) is list and set(map(type, {v})) <= FAST_{args[0].__name__})"
    if origin is dict and args[0] is str and args[1] in _DICT_FAST:
        values = "ATOMS" if args[1] is Any else f"DICT_{args[1].__name__}"
        return f"(type({v}) is dict and set(map(type, {v})) <= STR and set(map(type, {v}.values())) <= {values})"
    return None


def _approximate(tp: Any) -> bool:
    """Whether ``_expr(tp)`` may refuse a value the check accepts (maps and free-form values: their
    one-pass tests take only what needs no closer look)."""
    if tp is Any or typing.get_origin(tp) is dict:
        return True
    return any(_approximate(a) for a in typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType))


def _timed_expr(tp: Any, v: str) -> str | None:
    """``_expr`` of a time field: the bounds test also refuses NaN and infinities (they compare
    false), as ``_timed``'s ``math.isfinite`` does."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    nullable = origin in (typing.Union, types.UnionType) and type(None) in args
    if nullable:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return None
        tp = rest[0]
    if tp not in (int, float):
        return None
    inner = f"({_expr(tp, v)} and {-MAX_TIME!r} < {v} < {MAX_TIME!r})"
    return f"({v} is None or {inner})" if nullable else inner


def fast_decoder(cls: type, slow: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """A function ``body -> event`` for ``cls`` with ``checker(cls)``'s contract; every body it does
    not accept outright goes to ``slow(body)`` (which raises the one-line ``ProtocolError``)."""
    return _build(cls, slow)[0]


def _build(cls: type, slow: Callable[[dict[str, Any]], Any]) -> tuple[Callable[[dict[str, Any]], Any], str]:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    if any(not f.init or f.kw_only is True for f in fields):  # not callable positionally: no fast path
        return slow, ""
    env: dict[str, Any] = {
        "MISSING": _MISSING, "ATOMS": _ATOMS, "STR": _STR, "DICT_str": _STR, "DICT_float": _FLOAT,
        "DICT_bool": _BOOL, "slow": slow, "cls": cls,
        **{f"FAST_{t.__name__}": s for t, s in _FAST.items()},
    }
    lines = ["def decode(body):", "    get = body.get"]
    tests: list[str] = []
    for i, f in enumerate(fields):
        v = f"f{i}"  # locals by position: a field name could shadow a name the function uses
        if f.default is not dataclasses.MISSING:
            env[f"D{i}"] = f.default
            lines.append(f"    {v} = get({f.name!r}, D{i})")
        elif f.default_factory is not dataclasses.MISSING:
            env[f"F{i}"] = f.default_factory
            lines += [f"    {v} = get({f.name!r}, MISSING)", f"    if {v} is MISSING:", f"        {v} = F{i}()"]
        else:  # required: a missing one is __init__'s TypeError, worded by the slow path
            lines += [f"    {v} = get({f.name!r}, MISSING)", f"    if {v} is MISSING:", "        return slow(body)"]
        tp = hints[f.name]
        expr = _timed_expr(tp, v) if f.name in TIME_FIELDS else _expr(tp, v)
        if expr is None or _approximate(tp):
            # no inline test, or one stricter than the check (a map with int values, a nested
            # free-form value): the field's compiled check, as ``checker`` runs it, decides
            env[f"C{i}"] = _timed(_compile(tp)) if f.name in TIME_FIELDS else _compile(tp)
            expr = f"C{i}({v})" if expr is None else f"({expr} or C{i}({v}))"
        tests.append(expr)
    for expr in tests:
        lines += [f"    if not {expr}:", "        return slow(body)"]
    parallel = PARALLEL.get(getattr(cls, "KIND", ""))
    if parallel is not None:
        local = {f.name: f"f{i}" for i, f in enumerate(fields)}
        lead, same, optional = parallel
        lines.append(f"    n = len({local[lead]})")
        for name in same:
            lines += [f"    if len({local[name]}) != n:", "        return slow(body)"]
        for name in optional:
            lines += [f"    if {local[name]} and len({local[name]}) != n:", "        return slow(body)"]
    # every field is given, so __init__ runs no default factory; positional: the fastest call
    # (and faster than object.__new__ plus a __dict__, which also slows every later attribute read)
    lines.append(f"    return cls({', '.join(f'f{i}' for i in range(len(fields)))})")
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<llmtop decoder of {cls.__name__}>", "exec"), env)
    return env["decode"], source


def _timed(ok: Check) -> Check:
    return lambda v: ok(v) and (v is None or (math.isfinite(v) and -MAX_TIME < v < MAX_TIME))


def _hint(v: Any) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return ""
    if isinstance(v, (list, dict, str)):
        return f" of length {len(v)}"
    return ""
