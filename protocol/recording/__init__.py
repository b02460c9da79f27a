"""The recording file: one format for agent-side recordings, ``llmtop record`` and the TUI's record key.

``layout`` describes the file (see its docstring), ``writer`` writes it, ``reader`` reads it and
``codec`` holds the file form of layer tables. The names below are the package's interface.
"""

from llmtop.protocol.snapshot import KeyframeBuilder

from .codec import compact_layers, expand_layers, peek_kind, trim_snapshot
from .layout import (
    BLOCK,
    CRC,
    DEFAULT_FLUSH_S,
    DEFAULT_KEYFRAME_S,
    FILE_HEADER,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    MAGIC,
    SUFFIX,
    BlockInfo,
    RecordingError,
    event_time,
)
from .reader import Position, RecordingReader
from .writer import LOCK_WAIT_S, RecordingWriter, append_exit

__all__ = [
    "BLOCK", "CRC", "FILE_HEADER",
    "DEFAULT_FLUSH_S", "DEFAULT_KEYFRAME_S", "FORMAT_MAJOR", "FORMAT_MINOR", "LOCK_WAIT_S", "MAGIC", "SUFFIX",
    "BlockInfo", "KeyframeBuilder", "Position", "RecordingError", "RecordingReader", "RecordingWriter",
    "append_exit", "compact_layers", "event_time", "expand_layers", "peek_kind", "trim_snapshot",
]
