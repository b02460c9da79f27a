"""Reading recordings: ``RecordingReader`` opens a file by its index (or a forward scan) and decodes
blocks on demand, with seeking by step and time. Every byte is untrusted: a defect is a one-line
``RecordingError``, never another exception."""

from __future__ import annotations

import bisect
import math
import os
import stat
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
from llmtop.protocol.events import End, Event, EventDecoder, LayerStats, Session, Step
from llmtop.protocol.frames import DEFAULT_MAX_FRAME, HEADER, ProtocolError, unpack_map

from .codec import _LAYER_ENC, expand_layers
from .layout import (
    BLOCK,
    BLOCK_TAG,
    CRC,
    DATA,
    DICT_BYTES,
    DICT_SOURCE,
    FILE_HEADER,
    FINAL_END,
    FOOTER,
    FOOTER_TAG,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    INDEX,
    KEYFRAME,
    KNOWN_FLAGS,
    MAGIC,
    MAX_BLOCK,
    USES_DICT,
    ZLIB,
    BlockInfo,
    RecordingError,
    _is_footer,
    event_time,
)


def _open_regular(path: str) -> Any:
    """``path`` opened for reading if it is a regular file. A FIFO would block the open (and every
    read) forever and a device never ends, so anything else is refused before it is opened."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise RecordingError(f"{path} is {what}; a recording is a file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even if swapped for a FIFO
    except OSError as exc:
        raise RecordingError(f"cannot open recording {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the two looks
        os.close(fd)
        raise RecordingError(f"{path} is not a regular file; a recording is a file")
    return os.fdopen(fd, "rb")


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
        self._f = _open_regular(self.path)
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
        if not math.isfinite(created):
            raise RecordingError(f"{name} is corrupt: the header's creation time is not a number")
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
            # The index is a shortcut, not a second source of truth: every row must be the block
            # header found at its offset (checksummed), in file order, before the index itself.
            at_least = self._data_start
            for b in blocks:
                if type(b.offset) is not int or b.offset < at_least or b.kind == INDEX:
                    return None
                if self._block_header(b.offset, at) != b:
                    return None
                at_least = b.offset + BLOCK.size + b.comp_len
            if at_least > at:
                return None
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
        if comp_len > MAX_BLOCK or raw_len > MAX_BLOCK or kind > INDEX or flags & ~KNOWN_FLAGS:
            return None
        if not (math.isfinite(first_t) and math.isfinite(last_t)):
            return None
        if not flags & ZLIB and raw_len != comp_len:
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
                do = zlib.decompressobj(zdict=self._dictionary()) if info.flags & USES_DICT else zlib.decompressobj()
                # Bounded by the declared size: a block that inflates past it is corrupt, and is
                # never inflated further (a few MB can claim gigabytes).
                data = do.decompress(data, info.raw_len + 1)
                if len(data) <= info.raw_len and not do.unconsumed_tail:
                    data += do.flush(info.raw_len + 1 - len(data))
            except (zlib.error, ValueError) as exc:
                raise RecordingError(f"{name} is corrupt: block at byte {info.offset}: {exc}") from None
            if len(data) != info.raw_len or do.unconsumed_tail or not do.eof:
                raise RecordingError(f"{name} is corrupt: the block at byte {info.offset} does not inflate "
                                     f"to its declared {info.raw_len} bytes")
        return data

    def _dictionary(self) -> bytes:
        if self._zdict is None:
            if self._zdict_block is None:
                raise RecordingError(f"{os.path.basename(self.path)} is corrupt: a block needs the "
                                     "compression dictionary and no block holds it")
            source = self.blocks[self._zdict_block]
            if source.flags & USES_DICT:  # it would need itself
                raise RecordingError(f"{os.path.basename(self.path)} is corrupt: the compression "
                                     "dictionary's block is compressed with a dictionary")
            self._zdict = self._payload(source)[-DICT_BYTES:]
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
                if layers is not None and body["k"] == LayerStats.KIND:
                    step = body.get("step", 0)
                    if type(step) is not int:
                        raise ProtocolError("malformed 'layers' event: field 'step' has a bad value")
                    if not layers(step):
                        continue
                if body["k"] == LayerStats.KIND and body.get("enc") == _LAYER_ENC:
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
