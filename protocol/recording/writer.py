"""Writing recordings: the append-only ``RecordingWriter`` and ``append_exit`` (the exit status added
afterwards by the process that waited for the script)."""

from __future__ import annotations

import fcntl
import os
import threading
import time
import zlib

from llmtop.protocol.events import End, Event, LayerStats, Session, Step, encode

from .codec import _compact_frame, compact_layers, trim_snapshot
from .layout import (
    BLOCK,
    CRC,
    DATA,
    DEFAULT_FLUSH_S,
    DEFAULT_KEYFRAME_S,
    DICT_BYTES,
    DICT_SOURCE,
    FILE_HEADER,
    FINAL_END,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    INDEX,
    KEYFRAME,
    KEYFRAME_RATIO,
    MAGIC,
    NO_STEP,
    SUFFIX,
    USES_DICT,
    ZLIB,
    BlockInfo,
    RecordingError,
    _footer,
    _index_payload,
    _pack_block_header,
    event_time,
)
from .reader import RecordingReader

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

