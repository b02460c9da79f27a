"""Length-prefixed msgpack frames: a 4-byte big-endian length, then a msgpack map.

Every map carries the protocol major version under ``"v"`` and the event kind under ``"k"``.
The size limit is checked on the length prefix, before any buffer for the body is allocated.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import msgpack

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0
PROTOCOL_VERSION = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame or handshake that cannot be accepted; the message is one line meant for people."""


def pack_map(body: dict[str, Any]) -> bytes:
    """Encode one map as a frame (length prefix included)."""
    payload = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def unpack_map(payload: bytes) -> dict[str, Any]:
    """Decode one frame body (without its length prefix) into a map with a valid version."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"malformed frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"malformed frame: expected a map, got {type(body).__name__}")
    version = body.get("v")
    if not isinstance(version, int):
        raise ProtocolError("malformed frame: no protocol version")
    if version != PROTOCOL_MAJOR:
        raise ProtocolError(
            f"protocol version {version} is not supported (this llmtop speaks {PROTOCOL_MAJOR}); "
            "use the same llmtop version on both ends"
        )
    if not isinstance(body.get("k"), str):
        raise ProtocolError("malformed frame: no event kind")
    return body


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, iterate complete frame maps.

    After a ProtocolError the stream is out of step and the decoder must not be fed again.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # start of the first frame not yet yielded

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        # Frames are read at an offset and the consumed bytes dropped once per feed, not once per
        # frame (each prefix ``del`` may copy what is left); ``_pos`` moves before each yield, so
        # a consumer that stops early, or feeds again meanwhile, loses and repeats nothing.
        buf = self._buf
        buf += data
        while True:
            start = self._pos
            if len(buf) - start < HEADER.size:
                break
            (length,) = HEADER.unpack_from(buf, start)
            if length > self.max_frame:
                raise ProtocolError(f"frame of {length} bytes exceeds the {self.max_frame}-byte limit")
            end = start + HEADER.size + length
            if len(buf) < end:
                break
            payload = buf[start + HEADER.size : end]  # one copy; msgpack reads any buffer
            self._pos = end
            yield unpack_map(payload)
        del buf[: self._pos]
        self._pos = 0

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a whole frame (a truncated tail if the stream ended)."""
        return len(self._buf) - self._pos


def read_frame(stream: Any, max_frame: int = DEFAULT_MAX_FRAME) -> dict[str, Any] | None:
    """Read one frame from a binary file-like object; None at a clean end of stream."""
    head = stream.read(HEADER.size)
    if not head:
        return None
    if len(head) < HEADER.size:
        raise ProtocolError("truncated frame header")
    (length,) = HEADER.unpack(head)
    if length > max_frame:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_frame}-byte limit")
    payload = stream.read(length)
    if len(payload) < length:
        raise ProtocolError(f"truncated frame: expected {length} bytes, got {len(payload)}")
    return unpack_map(payload)
