"""The recording file: one format for agent-side recordings, ``llmtop record`` and the TUI's record key.

This module holds the layout (constants, block descriptors, the small binary pieces); ``writer``,
``reader`` and ``codec`` (the file form of layer tables) use it.

Layout (all integers big-endian)::

    header   magic "LLMTOPRC", format major u16, minor u16, flags u32, created f64, session-frame
             length u32, the Session event as a wire frame, crc32 u32 of all of the above
    block*   64-byte block header + payload; the payload is zlib-compressed wire frames
             (4-byte length + msgpack map each, exactly as on the socket)
    index    (on close) a block of kind INDEX listing every block, then a 20-byte footer

Blocks are self-delimiting and carry checksums of their header and payload, so a file whose
writer died (``kill -9``) is read by a forward scan over block headers; a short last block is a
truncated tail, reported in ``RecordingReader.warning``. A data block is written at least once a
second while events arrive, so at most a second of data is lost.

The script's exit status is known only to the process that waited for it (``llmtop attach``),
not to the agent that wrote the file. ``append_exit`` adds it afterwards, append-only: a data block
flagged FINAL_END holding one ``End`` (the exit code or signal, with the agent's traceback), then a
fresh index and footer. The old index and footer stay behind as dead bytes that the forward scan
steps over. Readers drop the agent's own ``End`` when such a block exists. It works on a ``kill -9``
file too: its truncated tail (no block anyone can read) is cut off first.

The header's ``Session`` is written before the script imports torch; the agent sends a fresh
``Session`` once it learns the versions. The index carries the latest one, and
``RecordingReader.session`` is that (for a file without an index, the latest one in its last
blocks).

A keyframe block holds a full snapshot (the frames a late joiner receives) so that seeking
applies the nearest keyframe and then only the data after it. Block headers carry the first and
last step number and time of their events: the index alone answers "where is step N / time T".
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
from llmtop.protocol.events import Event, Session, Span, encode
from llmtop.protocol.frames import ProtocolError

MAGIC = b"LLMTOPRC"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0
SUFFIX = ".lrec"

# magic, major, minor, flags, created, session frame length
FILE_HEADER = struct.Struct(">8sHHIdI")
CRC = struct.Struct(">I")
# tag, kind, flags, reserved, n_events, n_steps, raw_len, comp_len,
# first_step, last_step, first_t, last_t, header crc, payload crc
BLOCK = struct.Struct(">4sBBHIIIIqqddII")
BLOCK_TAG = b"LTBK"
FOOTER = struct.Struct(">QI8s")  # index block offset, crc32 of the offset, tag
FOOTER_TAG = b"LTIDXEND"

DATA, KEYFRAME, INDEX = 0, 1, 2
ZLIB = 1  # block flag: payload is zlib-compressed
DICT_SOURCE = 2  # block flag: this block's raw frames are the preset dictionary of later blocks
USES_DICT = 4  # block flag: compressed with that preset dictionary
FINAL_END = 8  # block flag: the End added by ``append_exit``; readers prefer it to the agent's
KNOWN_FLAGS = ZLIB | DICT_SOURCE | USES_DICT | FINAL_END
DICT_BYTES = 32 * 1024  # zlib's window: only the last 32 KiB of a dictionary can be used
NO_STEP = -1
MAX_BLOCK = 256 * 1024 * 1024  # a block length above this is corruption, not data

DEFAULT_FLUSH_S = 1.0
DEFAULT_KEYFRAME_S = 60.0
# A keyframe is written only once the data written since the last one is this many times the
# size of that keyframe, so snapshots cost at most ~1/(1+ratio) of the file whatever their size.
KEYFRAME_RATIO = 8.0


class RecordingError(ProtocolError):
    """A recording that cannot be read; the message is one line meant for people."""


def event_time(event: Event) -> float | None:
    """Wall-clock time an event describes (its end), or None for untimed events (trees, layer tables)."""
    if isinstance(event, Span):
        return event.start + event.dur_ms / 1000.0
    t = getattr(event, "t", None)
    return float(t) if isinstance(t, (int, float)) else None


@dataclass
class BlockInfo:
    """One block as the index knows it. Times are running maxima, so they never go backwards."""

    offset: int
    kind: int
    n_events: int
    n_steps: int
    comp_len: int
    raw_len: int
    first_step: int
    last_step: int
    first_t: float
    last_t: float
    flags: int = ZLIB

    def row(self) -> list[Any]:
        return [self.offset, self.kind, self.n_events, self.n_steps, self.comp_len, self.raw_len,
                self.first_step, self.last_step, self.first_t, self.last_t, self.flags]



def _pack_block_header(kind: int, flags: int, n_events: int, n_steps: int, raw_len: int, payload: bytes,
                  first_step: int, last_step: int, first_t: float, last_t: float) -> bytes:
    head = BLOCK.pack(BLOCK_TAG, kind, flags, 0, n_events, n_steps, raw_len, len(payload),
                      first_step, last_step, first_t, last_t, 0, 0)[: -2 * CRC.size]
    return head + CRC.pack(zlib.crc32(head)) + CRC.pack(zlib.crc32(payload))


def _index_payload(blocks: list[BlockInfo], session: Session) -> bytes:
    return msgpack.packb({"blocks": [b.row() for b in blocks], "session": encode(session)},
                         use_bin_type=True)


def _footer(index_at: int) -> bytes:
    return FOOTER.pack(index_at, zlib.crc32(struct.pack(">Q", index_at)), FOOTER_TAG)


def _is_footer(data: bytes) -> bool:
    if len(data) != FOOTER.size:
        return False
    at, crc, tag = FOOTER.unpack(data)
    return tag == FOOTER_TAG and zlib.crc32(struct.pack(">Q", at)) == crc

