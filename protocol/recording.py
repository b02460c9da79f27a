"""The recording file: one format for agent-side recordings, ``llmtop record`` and the TUI's record key.

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

import bisect
import fcntl
import os
import struct
import sys
import threading
import time
import zlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from .events import End, Event, EventDecoder, LayerStats, Session, Span, Step, encode
from .frames import DEFAULT_MAX_FRAME, HEADER, ProtocolError, pack_map, unpack_map

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


# --- compact per-layer tables ------------------------------------------------------------------------
#
# A layer table is most of a step's bytes: four float arrays of ~150 values at 9 bytes each in
# msgpack, whose low bits are noise that no compressor removes. In the file (never on the socket)
# each array is stored as integer nanoseconds, self times as the difference to the total (0 for
# every leaf module), as 8-byte little-endian words whose bytes are then grouped by
# significance ("shuffled") so that the always-zero high bytes compress away. Marked by
# "enc": "ns2"; the reader turns them back into LayerStats with millisecond floats. Lossless for
# times measured in whole nanoseconds (perf_counter_ns / 1e6), within 0.5 ns otherwise.

_LAYER_ENC = "ns2"  # "ns1" (zigzag-coded words) was written by early builds; still read
_WORD = 8
_LIMIT = 1 << 62


def _shuffle(ints: list[int]) -> bytes:
    words = array("q", ints)  # times are >= 0; a rare negative self-difference costs a few 0xff bytes
    if sys.byteorder == "big":
        words.byteswap()
    raw = words.tobytes()
    return b"".join(raw[i::_WORD] for i in range(_WORD))


def _unshuffle(data: bytes, zigzag: bool = False) -> list[int]:
    n = len(data) // _WORD
    raw = bytearray(len(data))
    for i in range(_WORD):
        raw[i::_WORD] = data[i * n:(i + 1) * n]
    words = array("Q" if zigzag else "q", bytes(raw))
    if sys.byteorder == "big":
        words.byteswap()
    if zigzag:
        return [(w >> 1) ^ -(w & 1) for w in words]
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
    zigzag = body.pop("enc", None) == "ns1"
    decoded = _decode_ns(*(_unshuffle(body[name], zigzag) for name in _LAYER_ARRAYS))
    for name, patch in (body.pop("exact", None) or {}).items():
        values = decoded[name]
        for i, v in patch.items():
            values[int(i)] = v
    body.update(decoded)
    return body


# --- writing -----------------------------------------------------------------------------------------


class RecordingWriter:
    """Append-only writer. Thread-safe; no call blocks for longer than one small ``write``.

    ``append(frame, event)`` takes a wire frame and the event it encodes (for the index: step
    number, time). Frames are grouped into a block that is compressed and written once its oldest
    frame is ``flush_s`` old (or it grows large); ``flush()`` writes what is pending now.
    ``wants_keyframe(now)`` says when the owner should pass a full snapshot to ``keyframe()``.
    ``close(end)`` appends the final ``End`` event (if given) and the index.
    """

    def __init__(self, path: str, session: Session, *, flush_s: float = DEFAULT_FLUSH_S,
                 keyframe_s: float = DEFAULT_KEYFRAME_S, level: int = 6,
                 block_bytes: int = 1024 * 1024) -> None:
        self.path = str(path)
        self.session = session
        self.flush_s = flush_s
        self.keyframe_s = keyframe_s
        self.level = level
        self.block_bytes = block_bytes
        self.blocks: list[BlockInfo] = []
        self.closed = False
        self.bytes_written = 0
        self.events_written = 0
        self.steps_written = 0
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._pending_since = 0.0  # monotonic time of the oldest pending frame
        self._n = 0
        self._steps = 0
        self._first_step = NO_STEP
        self._last_step = NO_STEP
        self._first_t = 0.0
        self._clock = float(session.started or time.time())  # running max of event times
        self._last_keyframe = time.monotonic()
        self._keyframe_size = 0
        self._data_since_keyframe = 0
        # Blocks are compressed alone (seekable), which loses what consecutive steps share (keys,
        # module ids, the high bytes of layer times). The first block holding a step becomes a
        # preset dictionary for every later block: most of that comes back, with no chain.
        self._zdict: bytes | None = None
        created = time.time()
        frame = encode(session)
        head = FILE_HEADER.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0, created, len(frame)) + frame
        head += CRC.pack(zlib.crc32(head))
        self._fd = self._open_exclusive()
        self._write(head)
        self._offset = len(head)

    def _open_exclusive(self) -> int:
        """Open (and empty) ``path`` under an exclusive lock. Every process of a launcher such as
        torchrun may inherit the same ``LLMTOP_RECORD``: a process that finds the file locked by a
        live writer records to ``<stem>.<pid><suffix>`` beside it instead (``self.path`` says so)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            stem, suffix = os.path.splitext(self.path)
            self.path = f"{stem}.{os.getpid()}{suffix or SUFFIX}"
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # our own pid's file: nobody else should hold it
        os.ftruncate(fd, 0)
        return fd

    @property
    def steps(self) -> int:
        """Step events appended so far (written or pending)."""
        return self.steps_written + self._steps

    # -- data

    def append(self, frame: bytes, event: Event) -> None:
        with self._lock:
            if self.closed:
                return
            now = time.monotonic()
            t = event_time(event)
            if t is not None and t > self._clock:
                self._clock = t
            if not self._pending:
                self._pending_since = now
                self._first_t = self._clock
            if isinstance(event, Step):
                self._steps += 1
                if self._first_step == NO_STEP or event.step < self._first_step:
                    self._first_step = event.step
                if event.step > self._last_step:
                    self._last_step = event.step
            if isinstance(event, LayerStats):
                frame = compact_layers(event) or frame
            elif isinstance(event, Session):
                self.session = event  # versions learnt later: the index carries the latest
            self._pending += frame
            self._n += 1
            if now - self._pending_since >= self.flush_s or len(self._pending) >= self.block_bytes:
                self._write_pending()

    def flush(self) -> None:
        """Write pending frames as a block now."""
        with self._lock:
            if not self.closed:
                self._write_pending()

    def maybe_flush(self, now: float | None = None) -> None:
        """Write pending frames if the oldest is ``flush_s`` old (for owners with a periodic tick)."""
        with self._lock:
            if self.closed or not self._pending:
                return
            if (now if now is not None else time.monotonic()) - self._pending_since >= self.flush_s:
                self._write_pending()

    # -- keyframes

    def wants_keyframe(self, now: float) -> bool:
        """True when a snapshot is due. ``now`` is ``time.monotonic()``."""
        if self.closed or now - self._last_keyframe < self.keyframe_s:
            return False
        return self._data_since_keyframe >= KEYFRAME_RATIO * self._keyframe_size and self._data_since_keyframe > 0

    def keyframe(self, frames: list[bytes], now: float | None = None) -> None:
        """Write a full snapshot (wire frames) as a seek point after everything appended so far.
        ``now`` (``time.monotonic()`` by default) starts the wait for the next one.

        Of the big per-step tables (layers, ops) only the most recent few are kept: a seek decodes
        the keyframe, and hundreds of layer tables would make it slow and the file big."""
        frames = [_compact_frame(f) for f in trim_snapshot(frames)]
        with self._lock:
            if self.closed:
                return
            self._write_pending()
            payload = b"".join(frames)
            size = self._write_block(KEYFRAME, payload, len(frames), 0, self._last_written_step(),
                                     self._last_written_step(), self._clock, self._clock)
            self._last_keyframe = time.monotonic() if now is None else now
            self._keyframe_size = size
            self._data_since_keyframe = 0

    def close(self, end: Event | None = None) -> None:
        """Append ``end`` (the final ``End`` event), the pending block and the index; idempotent."""
        if end is not None and not self.closed:
            self.append(encode(end), end)
        with self._lock:
            if self.closed:
                return
            try:
                self._write_pending()
                index_at = self._offset
                self._write_block(INDEX, _index_payload(self.blocks, self.session), 0, 0, NO_STEP,
                                  NO_STEP, self._clock, self._clock, record=False)
                self._write(_footer(index_at))
            finally:
                self.closed = True
                os.close(self._fd)

    # -- internals (lock held)

    def _last_written_step(self) -> int:
        for b in reversed(self.blocks):
            if b.last_step != NO_STEP:
                return b.last_step
        return NO_STEP

    def _write_pending(self) -> None:
        if not self._pending:
            return
        raw = bytes(self._pending)
        flags = ZLIB
        if self._zdict is None and self._steps:
            self._zdict = raw[-DICT_BYTES:]
            flags |= DICT_SOURCE
        size = self._write_block(DATA, raw, self._n, self._steps, self._first_step,
                                 self._last_step, self._first_t, self._clock, flags=flags)
        self.events_written += self._n
        self.steps_written += self._steps
        self._data_since_keyframe += size
        self._pending.clear()
        self._n = self._steps = 0
        self._first_step = self._last_step = NO_STEP

    def _write_block(self, kind: int, raw: bytes, n_events: int, n_steps: int, first_step: int,
                     last_step: int, first_t: float, last_t: float, record: bool = True,
                     flags: int = ZLIB) -> int:
        if self._zdict is not None and not flags & DICT_SOURCE and kind != INDEX:
            flags |= USES_DICT
            co = zlib.compressobj(self.level, zdict=self._zdict)
            payload = co.compress(raw) + co.flush()
        else:
            payload = zlib.compress(raw, self.level)
        head = _pack_block_header(kind, flags, n_events, n_steps, len(raw), payload, first_step, last_step,
                             first_t, last_t)
        if record:
            self.blocks.append(BlockInfo(self._offset, kind, n_events, n_steps, len(payload), len(raw),
                                         first_step, last_step, first_t, last_t, flags))
        self._write(head + payload)
        self._offset += len(head) + len(payload)
        return len(head) + len(payload)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.bytes_written += len(data)


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


LOCK_WAIT_S = 2.0  # forked workers of the script may hold the writer's lock a moment after it ends


def append_exit(path: str | os.PathLike[str], exit_code: int | None = None,
                signal: int | None = None, t: float | None = None) -> End:
    """Complete a finished recording with the script's real exit status (append-only).

    For the process that waited for the script (``llmtop attach``): writes one ``End`` with
    ``exit_code`` (or ``signal``, the number that killed it), keeping the traceback and time of the
    agent's own ``End`` if the file has one, in a FINAL_END block followed by a new index and footer.
    Returns the ``End`` written; raises ``RecordingError`` (one line) if the file cannot be read or
    is still being written by a live process.
    """
    path = str(path)
    name = os.path.basename(path)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise RecordingError(f"cannot open recording {path}: {exc.strerror or exc}") from None
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise RecordingError(f"{name} is still being written by another process") from None
                time.sleep(0.05)
        with RecordingReader(path) as reader:
            blocks = list(reader.blocks)
            session = reader.session
            agent_end = reader.last_end()
            end_t = reader.end_t
            # Past the last complete block: a truncated tail (kill -9 mid-write) is cut off below.
            valid = max((b.offset + BLOCK.size + b.comp_len for b in blocks), default=reader._data_start)
            truncated = reader.warning is not None
        if signal:
            reason = "signal"
        elif agent_end is not None and agent_end.reason == "exception":
            reason = "exception"
        else:
            reason = "exit"
        end = End(t=t if t is not None else (agent_end.t if agent_end is not None else time.time()),
                  exit_code=None if signal else exit_code, signal=signal or None,
                  traceback=agent_end.traceback if agent_end is not None else None, reason=reason)
        size = os.fstat(fd).st_size
        if truncated and valid < size:
            os.ftruncate(fd, valid)
            size = valid
        raw = encode(end)
        payload = zlib.compress(raw)
        clock = max(end_t, end.t)
        last_step = next((b.last_step for b in reversed(blocks) if b.last_step != NO_STEP), NO_STEP)
        info = BlockInfo(size, DATA, 1, 0, len(payload), len(raw), last_step, last_step, clock, clock,
                         ZLIB | FINAL_END)
        data = _pack_block_header(DATA, info.flags, 1, 0, len(raw), payload, last_step, last_step,
                                  clock, clock) + payload
        index_at = size + len(data)
        rows = _index_payload([*blocks, info], session)
        index = zlib.compress(rows)
        data += _pack_block_header(INDEX, ZLIB, 0, 0, len(rows), index, NO_STEP, NO_STEP, clock,
                                   clock) + index
        data += _footer(index_at)
        os.lseek(fd, size, os.SEEK_SET)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return end
    finally:
        os.close(fd)


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


# --- a frame-level snapshot for recorders that are not the agent -------------------------------------

# Kinds that describe state (the latest per key wins); everything else is a series kept as history.
_STATE_KEYS: dict[str, str | None] = {"session": None, "model": "model", "flops": "signature",
                                     "stats": None, "end": None}
# Series whose history a late joiner needs only a little of (big frames, shown as "latest").
_SHORT_HISTORY = {"layers": 32, "ops": 2}


class KeyframeBuilder:
    """Keeps what a late joiner needs, at the frame level: the latest state frames (session, model
    trees, FLOPs per signature) and the recent history of each series, in arrival order.

    Used by ``llmtop record`` and the TUI's record key, which see events but not the agent's own
    snapshot. The agent runtime passes its real snapshot to ``RecordingWriter.keyframe`` instead.
    """

    def __init__(self, history: int = 600) -> None:
        self.history = history
        self._state: dict[tuple[str, Any], bytes] = {}
        self._series: dict[str, deque[tuple[int, bytes]]] = {}
        self._seq = 0

    def add(self, frame: bytes, event: Event) -> None:
        kind = event.KIND
        if kind in _STATE_KEYS:
            attr = _STATE_KEYS[kind]
            self._state[(kind, getattr(event, attr) if attr else None)] = frame
        elif kind not in ("hello", "snapshot_done"):
            ring = self._series.get(kind)
            if ring is None:
                ring = self._series[kind] = deque(maxlen=min(self.history, _SHORT_HISTORY.get(kind, self.history)))
            self._seq += 1
            ring.append((self._seq, frame))

    def frames(self) -> list[bytes]:
        series = sorted(item for ring in self._series.values() for item in ring)
        return list(self._state.values()) + [frame for _, frame in series]


def _running_max(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.append(v if not out or v > out[-1] else out[-1])
    return out


# --- reading -----------------------------------------------------------------------------------------


@dataclass
class Position:
    """Where the next event to apply lies: data block number (into ``RecordingReader.blocks``) and
    event number inside it."""

    block: int
    event: int


class RecordingReader:
    """Opens a recording by its index (trailer, else a forward scan of block headers).

    ``events()`` yields every recorded event in order (keyframes skipped). ``seek_step(n)`` and
    ``seek_time(t)`` return the events that rebuild the state at that point: the nearest keyframe
    at or before it, then the data events up to it. Times given to ``seek_time`` are seconds from
    ``start``. A truncated tail is not an error: it is described in ``warning``.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_frame: int = DEFAULT_MAX_FRAME,
                 cache_blocks: int = 64) -> None:
        self.path = str(path)
        self.max_frame = max_frame
        self.warning: str | None = None
        self.decoder = EventDecoder()
        self._cache: OrderedDict[int, tuple[list[Event], list[float]]] = OrderedDict()
        self._cache_blocks = cache_blocks
        name = os.path.basename(self.path)
        try:
            self._f = open(self.path, "rb")  # noqa: SIM115 - kept open for seeks, closed in close()
        except OSError as exc:
            raise RecordingError(f"cannot open recording {self.path}: {exc.strerror or exc}") from None
        self._index_session: bytes | None = None
        try:
            self.size = os.fstat(self._f.fileno()).st_size
            self._read_header(name)
            self.blocks = self._read_index(name)
        except BaseException:
            self._f.close()
            raise
        self._zdict: bytes | None = None
        self._zdict_block = next((i for i, b in enumerate(self.blocks) if b.flags & DICT_SOURCE), None)
        self.data = [i for i, b in enumerate(self.blocks) if b.kind == DATA]
        # The End that append_exit added, if any: the agent's own End events are then dropped.
        self._final_end = next((i for i in reversed(self.data) if self.blocks[i].flags & FINAL_END), None)
        self.session = self._latest_session()
        self.keyframes = [i for i, b in enumerate(self.blocks) if b.kind == KEYFRAME]
        # Running maxima, so that bisect finds the first block that reaches past a step or time.
        self._data_last_t = _running_max([self.blocks[i].last_t for i in self.data])
        self._data_last_step = _running_max([self.blocks[i].last_step for i in self.data])
        timed = [self.blocks[i].first_t for i in self.data if self.blocks[i].n_events]
        self.start = timed[0] if timed else self.session_started()
        self.end_t = max((b.last_t for b in self.blocks), default=self.start)
        self.steps = sum(self.blocks[i].n_steps for i in self.data)
        steps = [self.blocks[i] for i in self.data if self.blocks[i].n_steps]
        self.first_step = steps[0].first_step if steps else None
        self.last_step = max(b.last_step for b in steps) if steps else None

    def _latest_session(self) -> Session:
        """The header's Session, or the latest one the agent sent (with the versions it learnt)."""
        if self._index_session is not None:
            try:
                event = self.decoder.decode(unpack_map(self._index_session[HEADER.size:]))
                if isinstance(event, Session):
                    return event
            except (ProtocolError, ValueError, TypeError):
                pass
            return self.session
        # No index (the writer was killed): look through the last blocks, back to a keyframe.
        for i in reversed(range(len(self.blocks))):
            if self.blocks[i].kind == INDEX:
                continue
            try:
                events = self._events_of(i)[0]
            except RecordingError:
                break
            found = next((e for e in reversed(events) if isinstance(e, Session)), None)
            if found is not None:
                return found
            if self.blocks[i].kind == KEYFRAME:
                break
        return self.session

    def last_end(self) -> End | None:
        """The recording's final ``End`` (the exit status if ``append_exit`` added one), or None."""
        for i in reversed(self.data):
            events = self._events_of(i)[0]
            found = next((e for e in reversed(events) if isinstance(e, End)), None)
            if found is not None:
                return found
            if self.blocks[i].n_events:
                return None  # an End is the last event written: a later block without one means none
        return None

    def session_started(self) -> float:
        return float(self.session.started or self.created)

    @property
    def duration(self) -> float:
        """Seconds from the first to the last recorded event."""
        return max(0.0, self.end_t - self.start)

    @property
    def n_events(self) -> int:
        return sum(self.blocks[i].n_events for i in self.data)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening

    def _read_header(self, name: str) -> None:
        if self.size == 0:
            raise RecordingError(f"{name} is empty: no recording was written to it")
        head = self._f.read(FILE_HEADER.size)
        if not head.startswith(MAGIC[: len(head)]) or len(head) < len(MAGIC):
            if len(head) < len(MAGIC) and MAGIC.startswith(head):
                raise RecordingError(f"{name} is truncated: it ends inside the recording header")
            raise RecordingError(f"{name} is not an llmtop recording (wrong magic bytes)")
        if len(head) < FILE_HEADER.size:
            raise RecordingError(f"{name} is truncated: it ends inside the recording header")
        _, major, minor, _flags, created, frame_len = FILE_HEADER.unpack(head)
        if major > FORMAT_MAJOR:
            raise RecordingError(
                f"{name} uses recording format {major}.{minor}, newer than this llmtop reads "
                f"({FORMAT_MAJOR}.{FORMAT_MINOR}); upgrade llmtop to open it")
        if frame_len > self.max_frame or frame_len < HEADER.size:
            raise RecordingError(f"{name} is corrupt: bad session header length {frame_len}")
        rest = self._f.read(frame_len + CRC.size)
        if len(rest) < frame_len + CRC.size:
            raise RecordingError(f"{name} is truncated: it ends inside the recording header")
        frame, (crc,) = rest[:frame_len], CRC.unpack(rest[frame_len:])
        if zlib.crc32(head + frame) != crc:
            raise RecordingError(f"{name} is corrupt: the recording header fails its checksum")
        try:
            session = self.decoder.decode(unpack_map(frame[HEADER.size:]))
        except ProtocolError as exc:
            raise RecordingError(f"{name}: session header: {exc}") from None
        if not isinstance(session, Session):
            raise RecordingError(f"{name} is corrupt: the header holds no session")
        self.session = session
        self.created = created
        self.format = (major, minor)
        self._data_start = FILE_HEADER.size + frame_len + CRC.size

    def _read_index(self, name: str) -> list[BlockInfo]:
        blocks = self._read_trailer()
        if blocks is not None:
            return blocks
        return self._scan(name)

    def _read_trailer(self) -> list[BlockInfo] | None:
        if self.size < self._data_start + BLOCK.size + FOOTER.size:
            return None
        self._f.seek(self.size - FOOTER.size)
        at, crc, tag = FOOTER.unpack(self._f.read(FOOTER.size))
        if tag != FOOTER_TAG or zlib.crc32(struct.pack(">Q", at)) != crc:
            return None
        try:
            info = self._block_header(at, self.size - FOOTER.size)
            if info is None or info.kind != INDEX:
                return None
            raw = self._payload(info)
            index = msgpack.unpackb(raw, raw=False)
            rows = index["blocks"]
            blocks = [BlockInfo(*row[:11]) for row in rows]
            session = index.get("session")
            self._index_session = session if isinstance(session, bytes) else None
            return blocks
        except (RecordingError, ValueError, KeyError, TypeError, msgpack.UnpackException):
            return None  # a damaged trailer: the forward scan still finds every block

    def _scan(self, name: str) -> list[BlockInfo]:
        blocks: list[BlockInfo] = []
        at = self._data_start
        while at < self.size:
            left = self.size - at
            if left >= FOOTER.size:
                self._f.seek(at)
                if _is_footer(self._f.read(FOOTER.size)):
                    at += FOOTER.size  # a footer (an earlier one, if append_exit wrote after it)
                    continue
            if left < BLOCK.size:
                self._truncated(at, left)
                break
            info = self._block_header(at, self.size)
            if info is None:
                self._f.seek(at)
                rest = self._f.read(min(left, 1 << 20))
                if not rest.strip(b"\0") and left <= 1 << 20:
                    self._truncated(at, left)  # zero-filled tail: the file system lost the last write
                    break
                raise RecordingError(f"{name} is corrupt: no valid block at byte {at}")
            end = at + BLOCK.size + info.comp_len
            if end > self.size:
                self._truncated(at, left)
                break
            if info.kind != INDEX:
                blocks.append(info)
            at = end
        return blocks

    def _truncated(self, at: int, left: int) -> None:
        self.warning = (f"{os.path.basename(self.path)}: truncated tail ({left} bytes after byte {at} "
                        "ignored); the recording ends at its last complete block")

    def _block_header(self, at: int, limit: int) -> BlockInfo | None:
        """The block header at ``at``, or None if there is none (bad tag or checksum)."""
        self._f.seek(at)
        head = self._f.read(BLOCK.size)
        if len(head) < BLOCK.size:
            return None
        (tag, kind, flags, _r, n_events, n_steps, raw_len, comp_len, first_step, last_step, first_t,
         last_t, hcrc, _pcrc) = BLOCK.unpack(head)
        if tag != BLOCK_TAG or zlib.crc32(head[: -2 * CRC.size]) != hcrc:
            return None
        if comp_len > MAX_BLOCK or raw_len > MAX_BLOCK or kind > INDEX:
            return None
        return BlockInfo(at, kind, n_events, n_steps, comp_len, raw_len, first_step, last_step,
                         first_t, last_t, flags)

    def _payload(self, info: BlockInfo) -> bytes:
        name = os.path.basename(self.path)
        self._f.seek(info.offset + BLOCK.size - CRC.size)
        (pcrc,) = CRC.unpack(self._f.read(CRC.size))
        data = self._f.read(info.comp_len)
        if len(data) < info.comp_len:
            raise RecordingError(f"{name} is truncated inside the block at byte {info.offset}")
        if zlib.crc32(data) != pcrc:
            raise RecordingError(f"{name} is corrupt: the block at byte {info.offset} fails its checksum")
        if info.flags & ZLIB:
            try:
                if info.flags & USES_DICT:
                    do = zlib.decompressobj(zdict=self._dictionary())
                    data = do.decompress(data) + do.flush()
                else:
                    data = zlib.decompress(data)
            except zlib.error as exc:
                raise RecordingError(f"{name} is corrupt: block at byte {info.offset}: {exc}") from None
        return data

    def _dictionary(self) -> bytes:
        if self._zdict is None:
            if self._zdict_block is None:
                raise RecordingError(f"{os.path.basename(self.path)} is corrupt: a block needs the "
                                     "compression dictionary and no block holds it")
            self._zdict = self._payload(self.blocks[self._zdict_block])[-DICT_BYTES:]
        return self._zdict

    # -- decoding

    def _events_of(self, index: int, layers: Callable[[int], bool] | None = None
                   ) -> tuple[list[Event], list[float]]:
        """Decoded events of block ``index`` and each one's time (running max, never backwards).
        ``layers(step)`` False skips that layer table undecoded (such partial blocks are not cached)."""
        hit = self._cache.get(index)
        if hit is not None:
            self._cache.move_to_end(index)
            return hit
        info = self.blocks[index]
        raw = self._payload(info)
        events: list[Event] = []
        times: list[float] = []
        clock = info.first_t
        view = memoryview(raw)
        at = 0
        name = os.path.basename(self.path)
        try:
            while at < len(raw):
                (length,) = HEADER.unpack_from(raw, at)
                if length > self.max_frame or at + HEADER.size + length > len(raw):
                    raise ProtocolError(f"bad frame length {length}")
                body = unpack_map(view[at + HEADER.size: at + HEADER.size + length])
                at += HEADER.size + length
                if layers is not None and body["k"] == LayerStats.KIND and not layers(body.get("step", 0)):
                    continue
                if body.get("enc") in (_LAYER_ENC, "ns1") and body["k"] == LayerStats.KIND:
                    try:
                        body = expand_layers(body)
                    except (KeyError, TypeError, ValueError) as exc:
                        raise ProtocolError(f"malformed layer table: {exc}") from None
                event = self.decoder.decode(body)
                if event is None or (isinstance(event, End) and self._final_end not in (None, index)):
                    continue
                t = event_time(event)
                if t is not None and t > clock:
                    clock = t
                events.append(event)
                times.append(clock)
        except (ProtocolError, struct.error) as exc:
            raise RecordingError(f"{name}: block at byte {info.offset}: {exc}") from None
        if layers is not None:
            return events, times
        self._cache[index] = (events, times)
        if len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return events, times

    def events(self, layers: Callable[[int], bool] | None = None) -> Iterator[Event]:
        """Every recorded event in order (the session first), keyframes skipped. ``layers(step)``
        returning False skips that step's layer tables without decoding them (long-run summaries)."""
        yield self.session
        for i in self.data:
            yield from self._events_of(i, layers)[0]

    def timed_events(self, start: Position | None = None) -> Iterator[tuple[Position, Event, float]]:
        """Events from ``start`` on, with their position and time in seconds from ``start``."""
        pos = start or Position(0, 0)
        for d in range(pos.block, len(self.data)):
            events, times = self._events_of(self.data[d])
            first = pos.event if d == pos.block else 0
            for e in range(first, len(events)):
                yield Position(d, e), events[e], times[e] - self.start

    def keyframe_events(self, index: int) -> list[Event]:
        return list(self._events_of(index)[0])

    # -- seeking

    def position_of_step(self, n: int) -> Position:
        """Just past step ``n``: before the first Step event numbered above ``n`` (or the end)."""
        d = bisect.bisect_right(self._data_last_step, n)
        if d >= len(self.data):
            return self.end_position()
        events, _ = self._events_of(self.data[d])
        for e, event in enumerate(events):
            if isinstance(event, Step) and event.step > n:
                return Position(d, e)
        return Position(d + 1, 0)

    def position_of_time(self, t: float) -> Position:
        """Just past time ``t`` (seconds from ``start``): before the first event later than it."""
        target = self.start + t
        d = bisect.bisect_right(self._data_last_t, target)
        if d >= len(self.data):
            return self.end_position()
        _, times = self._events_of(self.data[d])
        e = bisect.bisect_right(times, target)
        return Position(d, e) if e < len(times) else Position(d + 1, 0)

    def end_position(self) -> Position:
        return Position(len(self.data), 0)

    def time_at(self, pos: Position) -> float:
        """Seconds from ``start`` of the last event before ``pos``."""
        d, e = pos.block, pos.event
        if e == 0:
            d -= 1
            if d < 0:
                return 0.0
            return self.blocks[self.data[d]].last_t - self.start
        _, times = self._events_of(self.data[d])
        return times[e - 1] - self.start

    def rebuild(self, pos: Position) -> list[Event]:
        """The events that rebuild the state just before ``pos``: session, the nearest keyframe at or
        before it, then the data events from there up to ``pos``."""
        block = self.data[pos.block] if pos.block < len(self.data) else len(self.blocks)
        k = bisect.bisect_left(self.keyframes, block) - 1
        out: list[Event] = [self.session]
        if k >= 0:
            kf = self.keyframes[k]
            out += self._events_of(kf)[0]
            first = bisect.bisect_right(self.data, kf)
        else:
            first = 0
        for d in range(first, min(pos.block + 1, len(self.data))):
            events = self._events_of(self.data[d])[0]
            out += events[: pos.event] if d == pos.block else events
        return out

    def seek_step(self, n: int) -> list[Event]:
        return self.rebuild(self.position_of_step(n))

    def seek_time(self, t: float) -> list[Event]:
        return self.rebuild(self.position_of_time(t))

    def seek_end(self) -> list[Event]:
        return self.rebuild(self.end_position())
