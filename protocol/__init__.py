"""llmtop's wire format: frames, the event schema, socket paths. Imports only stdlib and msgpack."""

from .events import REGISTRY, Event, EventDecoder, encode
from .frames import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_MAJOR,
    PROTOCOL_VERSION,
    FrameDecoder,
    ProtocolError,
    pack_map,
    read_frame,
    unpack_map,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "PROTOCOL_MAJOR",
    "PROTOCOL_VERSION",
    "REGISTRY",
    "Event",
    "EventDecoder",
    "FrameDecoder",
    "ProtocolError",
    "encode",
    "pack_map",
    "read_frame",
    "unpack_map",
]
