"""The envelope of ``llmtop bridge``: several agents' streams multiplexed on one byte stream (the
bridge's stdout, carried by the user's own ssh to ``llmtop watch ssh://HOST``).

The stream starts with ``MAGIC`` (so a login banner or ``llmtop: command not found`` is recognised as
"not a bridge" rather than as a bogus length), then envelopes framed like the agent's frames: a
4-byte big-endian length and a msgpack map with its kind under ``"k"``:

- ``bridge``: first, once: ``b`` the bridge protocol major version, ``minor``, ``host`` (the remote
  hostname), ``pid`` (the bridge's), ``llmtop`` (its version), ``protocol`` (the agent wire version
  it speaks), ``target`` (what it relays: ``all``, a PID or a job id);
- ``open``: a stream starts: ``s`` its number in this bridge, ``pid`` the agent's process, ``socket``,
  ``info`` (the agent's info file: job, rank, world size…, as ``llmtop ls --json`` shows it);
- ``data``: ``s`` and ``d``: whole agent frames (length prefixes included), exactly as the agent sent
  them after its hello (the agent's snapshot first, then live frames);
- ``close``: ``s`` and ``why``: the stream ended (the agent closed it, or refused the bridge);
- ``listed``: after the bridge's first look for agents: every matching agent has its ``open`` by now;
- ``note``: ``why``: a bridge-level remark (no agent matches the target yet);
- ``tick``: ``t``: a heartbeat every few seconds, so a silent connection is noticed.

Unknown kinds are skipped (a newer bridge with an older viewer); a bad envelope is a
``ProtocolError`` with a one-line message: the byte stream is out of step and the viewer reconnects.
The agent frames inside ``data`` are decoded (and checked) by the viewer exactly as from a socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack

from .frames import DEFAULT_MAX_FRAME, HEADER, ProtocolError

MAGIC = b"llmtop-bridge\n"
BRIDGE_MAJOR = 1
BRIDGE_MINOR = 0
DATA_CHUNK = 1 << 20  # agent frames per data envelope, in bytes (one bigger frame goes alone)
MAX_ENVELOPE = DEFAULT_MAX_FRAME + DATA_CHUNK + 4096  # one largest frame plus a chunk of others
TICK_S = 2.0  # the bridge's heartbeat period

# kind -> {field: type} every envelope of that kind must carry
FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "bridge": {"b": int, "host": str},
    "open": {"s": int, "pid": int},
    "data": {"s": int, "d": bytes},
    "close": {"s": int, "why": str},
    "listed": {},
    "note": {"why": str},
    "tick": {"t": (int, float)},
}


def pack(kind: str, **fields: Any) -> bytes:
    """One envelope, length prefix included."""
    payload = msgpack.packb({"k": kind, **fields}, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def hello(host: str, pid: int, target: str, llmtop: str, protocol: str) -> bytes:
    """The bridge's opening: the magic and its ``bridge`` envelope."""
    return MAGIC + pack("bridge", b=BRIDGE_MAJOR, minor=BRIDGE_MINOR, host=host, pid=pid, target=target,
                        llmtop=llmtop, protocol=protocol)


def preview(data: bytes, limit: int = 40) -> str:
    """The first line of some bytes as printable text, for a one-line message."""
    line = data.split(b"\n", 1)[0]
    text = line[:limit].decode("utf-8", "replace")
    text = "".join(c if c.isprintable() and c != "\ufffd" else " " for c in text)
    text = " ".join(text.split())
    return text + ("…" if len(line) > limit else "")


def check_envelope(body: Any) -> dict[str, Any] | None:
    """The envelope map if it is well formed, None for an unknown kind (skipped); raises
    ``ProtocolError`` for a malformed one."""
    if not isinstance(body, dict):
        raise ProtocolError(f"bad bridge envelope: expected a map, got {type(body).__name__}")
    kind = body.get("k")
    if not isinstance(kind, str):
        raise ProtocolError("bad bridge envelope: no kind")
    fields = FIELDS.get(kind)
    if fields is None:
        return None
    for name, typ in fields.items():
        value = body.get(name)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ProtocolError(f"bad bridge envelope: {kind!r} without a valid {name!r}")
    return body


class BridgeRefused(ProtocolError):
    """A bridge of another major version: retrying soon will not help."""


def check_hello(env: dict[str, Any] | None) -> dict[str, Any]:
    """The bridge's first envelope, or a one-line refusal (another kind, or another major version)."""
    if env is None or env.get("k") != "bridge":
        raise ProtocolError("handshake failed: the bridge did not start with its hello")
    if env["b"] != BRIDGE_MAJOR:
        version = env.get("llmtop")
        shown = f" (llmtop {preview(version.encode(), 24)})" if isinstance(version, str) else ""
        raise BridgeRefused(f"llmtop bridge on {preview(env['host'].encode(), 64)} speaks bridge protocol "
                            f"{env['b']}{shown}, this llmtop speaks {BRIDGE_MAJOR}: "
                            "install the same llmtop version on both ends")
    return env


class EnvelopeDecoder:
    """Incremental: feed the bytes read from the bridge, iterate well-formed envelopes (unknown kinds
    skipped and counted). The first envelope is the checked hello. After a ``ProtocolError`` the stream
    is out of step and must not be fed again."""

    def __init__(self, max_envelope: int = MAX_ENVELOPE) -> None:
        self.max_envelope = max_envelope
        self._buf = bytearray()
        self.magic_seen = False
        self.hello: dict[str, Any] | None = None
        self.skipped = 0
        self.received = 0  # bytes fed

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        self._buf += data
        self.received += len(data)
        if not self.magic_seen:
            if not MAGIC.startswith(bytes(self._buf[: len(MAGIC)])):
                raise ProtocolError(f"not an llmtop bridge: its output began with {preview(bytes(self._buf))!r} "
                                    "(does a login script print to stdout?)")
            if len(self._buf) < len(MAGIC):
                return
            del self._buf[: len(MAGIC)]
            self.magic_seen = True
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_envelope:
                raise ProtocolError(f"bad bridge envelope: {length} bytes exceeds the {self.max_envelope}-byte limit")
            end = HEADER.size + length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[HEADER.size:end])
            del self._buf[:end]
            try:
                body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            except Exception as exc:  # msgpack raises several unrelated types for bad input
                raise ProtocolError(f"bad bridge envelope: {type(exc).__name__}" + (f": {exc}" if str(exc) else "")) from None
            env = check_envelope(body)
            if self.hello is None:
                self.hello = check_hello(env)
                continue
            if env is None:
                self.skipped += 1
                continue
            if env["k"] == "bridge":
                raise ProtocolError("bad bridge envelope: a second hello")
            yield env

    @property
    def pending(self) -> int:
        return len(self._buf)


def split_frames(buf: bytearray, max_frame: int = DEFAULT_MAX_FRAME) -> list[bytes]:
    """Take the whole agent frames (length prefix included) off the front of ``buf``, undecoded;
    a length over ``max_frame`` raises ``ProtocolError`` (checked before anything is buffered for it)."""
    out: list[bytes] = []
    start = 0
    while len(buf) - start >= HEADER.size:
        (length,) = HEADER.unpack_from(buf, start)
        if length > max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds the {max_frame}-byte limit")
        end = start + HEADER.size + length
        if len(buf) < end:
            break
        out.append(bytes(buf[start:end]))
        start = end
    del buf[:start]
    return out
