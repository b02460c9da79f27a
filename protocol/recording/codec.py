"""The file form of per-layer tables, and frame-level helpers for snapshots (kind peeking, trimming)."""

from __future__ import annotations

import sys
from array import array
from typing import Any

from llmtop.protocol.events import LayerStats
from llmtop.protocol.frames import HEADER, ProtocolError, pack_map, unpack_map

# --- compact per-layer tables ------------------------------------------------------------------------
#
# A layer table is most of a step's bytes: four float arrays of ~150 values at 9 bytes each in
# msgpack, whose low bits are noise that no compressor removes. In the file (never on the socket)
# each array is stored as integer nanoseconds, self times as the difference to the total (0 for
# every leaf module), as 8-byte little-endian words whose bytes are then grouped by
# significance ("shuffled") so that the always-zero high bytes compress away. Marked by
# "enc": "ns2"; the reader turns them back into LayerStats with millisecond floats. Lossless for
# times measured in whole nanoseconds (perf_counter_ns / 1e6), within 0.5 ns otherwise.

_LAYER_ENC = "ns2"
_WORD = 8
_LIMIT = 1 << 62


def _shuffle(ints: list[int]) -> bytes:
    words = array("q", ints)  # times are >= 0; a rare negative self-difference costs a few 0xff bytes
    if sys.byteorder == "big":
        words.byteswap()
    raw = words.tobytes()
    return b"".join(raw[i::_WORD] for i in range(_WORD))


def _unshuffle(data: bytes) -> list[int]:
    if type(data) is not bytes or len(data) % _WORD:
        raise ValueError("a layer array is not a whole number of 8-byte words")
    n = len(data) // _WORD
    raw = bytearray(len(data))
    for i in range(_WORD):
        raw[i::_WORD] = data[i * n:(i + 1) * n]
    words = array("q", bytes(raw))
    if sys.byteorder == "big":
        words.byteswap()
    return words.tolist()


def compact_layers(event: LayerStats) -> bytes | None:
    """The file form of a layer table, or None to store the agent's frame as it is."""
    body = event.to_map()
    exact: dict[str, dict[int, float]] = {}
    try:
        fwd, bwd = [round(v * 1e6) for v in event.fwd_ms], [round(v * 1e6) for v in event.bwd_ms]
        fwd_self = [a - round(v * 1e6) for a, v in zip(fwd, event.fwd_self_ms, strict=True)]
        bwd_self = [a - round(v * 1e6) for a, v in zip(bwd, event.bwd_self_ms, strict=True)]
        arrays = (fwd, bwd, fwd_self, bwd_self)
        if any(abs(v) >= _LIMIT for a in arrays for v in a):
            return None
    except (TypeError, ValueError, OverflowError):
        return None  # not finite numbers, or ragged arrays
    decoded = _decode_ns(fwd, bwd, fwd_self, bwd_self)
    for name, values in zip(_LAYER_ARRAYS, arrays, strict=True):
        body[name] = _shuffle(values)
        # Values that are not whole nanoseconds (sums of floats, GPU event times) are kept as they
        # came, so the file form is lossless whatever the agent measured.
        wrong = {i: v for i, (v, d) in enumerate(zip(getattr(event, name), decoded[name], strict=True))
                 if v != d}
        if wrong:
            exact[name] = wrong
    body["enc"] = _LAYER_ENC
    if exact:
        body["exact"] = exact
    return pack_map(body)


_LAYER_ARRAYS = ("fwd_ms", "bwd_ms", "fwd_self_ms", "bwd_self_ms")


def _decode_ns(fwd: list[int], bwd: list[int], fwd_self: list[int], bwd_self: list[int]) -> dict[str, list[float]]:
    return {
        "fwd_ms": [a / 1e6 for a in fwd],
        "bwd_ms": [a / 1e6 for a in bwd],
        "fwd_self_ms": [(a - d) / 1e6 for a, d in zip(fwd, fwd_self, strict=False)],
        "bwd_self_ms": [(a - d) / 1e6 for a, d in zip(bwd, bwd_self, strict=False)],
    }


def expand_layers(body: dict[str, Any]) -> dict[str, Any]:
    """A layer table's map in the file form back to the wire form; ValueError if it is malformed
    (the decoder then checks the arrays against the LayerStats schema as for any frame)."""
    body.pop("enc", None)
    fwd, bwd, fwd_self, bwd_self = (_unshuffle(body.get(name)) for name in _LAYER_ARRAYS)
    if len(fwd) != len(fwd_self) or len(bwd) != len(bwd_self):
        raise ValueError("self and total times differ in length")
    decoded = _decode_ns(fwd, bwd, fwd_self, bwd_self)
    exact = body.pop("exact", None) or {}
    if type(exact) is not dict:
        raise ValueError("bad exact-value patch")
    for name, patch in exact.items():
        values = decoded.get(name) if type(name) is str else None
        if values is None or type(patch) is not dict:
            raise ValueError("bad exact-value patch")
        for i, v in patch.items():
            if type(i) is not int or not 0 <= i < len(values) or type(v) not in (float, int):
                raise ValueError("bad exact-value patch")
            values[i] = v
    body.update(decoded)
    return body



def peek_kind(frame: bytes) -> str | None:
    """The event kind of a wire frame without decoding the rest of it (the encoder writes "v" then
    "k" first); None if the frame does not look like that."""
    at = HEADER.size
    if len(frame) < at + 8:
        return None
    head = frame[at]
    if 0x80 <= head <= 0x8F:
        at += 1
    elif head == 0xDE:
        at += 3
    else:
        return None
    if frame[at:at + 2] != b"\xa1v" or frame[at + 2] > 0x7F or frame[at + 3:at + 5] != b"\xa1k":
        return None
    at += 5
    size = frame[at] - 0xA0 if 0xA0 <= frame[at] <= 0xBF else -1
    if size < 0:
        return None
    try:
        return frame[at + 1:at + 1 + size].decode("ascii")
    except UnicodeDecodeError:
        return None


def _compact_frame(frame: bytes) -> bytes:
    """A snapshot's layer table in the file form (as ``append`` stores them); others unchanged."""
    if peek_kind(frame) != LayerStats.KIND:
        return frame
    try:
        event = LayerStats.from_map(unpack_map(frame[HEADER.size:]))
    except ProtocolError:
        return frame
    return compact_layers(event) or frame  # type: ignore[arg-type]


def trim_snapshot(frames: list[bytes]) -> list[bytes]:
    """Drop all but the last ``_SHORT_HISTORY[kind]`` frames of the big per-step kinds."""
    kinds = [peek_kind(f) for f in frames]
    keep_from: dict[str, int] = {}
    for kind, limit in _SHORT_HISTORY.items():
        positions = [i for i, k in enumerate(kinds) if k == kind]
        if len(positions) > limit:
            keep_from[kind] = positions[-limit]
    if not keep_from:
        return frames
    return [f for i, (f, k) in enumerate(zip(frames, kinds, strict=True))
            if k not in keep_from or i >= keep_from[k]]



# Series whose history a late joiner needs only a little of (big frames, shown as "latest").
_SHORT_HISTORY = {"layers": 32, "ops": 2}
