"""Hostile frames from a fake agent on a real Unix socket: the viewer's reader thread never raises.

A fake agent accepts the viewer's connection, answers its hello and sends a run's events with
something hostile among them (an oversized length, bytes that are not msgpack, a wrong version, a
map nested past msgpack's limit, a field of the wrong type, ragged arrays, a megabyte of text in a
version string). ``SocketSource.run`` must return normally, with the reason in the model's status
note as one bounded line; no exception may leave the reader thread.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmtop.protocol.events import Hello, decode_one, encode
from llmtop.protocol.frames import HEADER, ProtocolError
from llmtop.tui.session.model import ENDED, LOST, SessionModel
from llmtop.tui.session.source import NOTE_MAX, SocketSource

from tests.test_fuzz_recordings import SESSION, VALUES, run_events


def _frame(body: Any) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


GOOD = [encode(SESSION)] + [encode(e) for e in run_events(6)]


class FakeAgent:
    """Listens on ``path`` (before the viewer starts), answers one viewer's hello with ``hello`` and
    then sends ``frames``; closes when done or when the viewer hangs up."""

    def __init__(self, path: Path, frames: list[bytes], hello: bytes | None = None) -> None:
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.hello = hello if hello is not None else encode(Hello(role="agent", pid=1))
        self.frames = frames
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        try:
            conn.recv(65536)  # the viewer's hello
            conn.sendall(self.hello + b"".join(self.frames))
        except OSError:
            pass  # the viewer hung up on a bad frame: expected
        finally:
            conn.close()
            self.srv.close()


def read_from(path: Path, frames: list[bytes], hello: bytes | None = None) -> SessionModel:
    """Run a real ``SocketSource`` against the fake agent until it gives up; fail if anything escapes
    its thread or it does not end."""
    agent = FakeAgent(path, frames, hello)
    model = SessionModel()
    source = SocketSource(path, retry_s=0.01, first_retry_s=0.01, give_up=lambda: True)
    escaped: list[BaseException] = []

    def run() -> None:
        try:
            source.run(model)
        except BaseException as exc:  # noqa: BLE001 - what the test is about
            escaped.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(60)  # a hang guard, not a speed check
    source.stop()
    assert not t.is_alive(), "the reader thread did not end"
    assert escaped == []
    agent.thread.join(10)
    note = model.connection_note
    assert "\n" not in note and len(note) <= NOTE_MAX
    return model


HOSTILE = {
    "oversized length": (HEADER.pack(0xFFFFFFFF) + b"x" * 64, "exceeds"),
    "not msgpack": (HEADER.pack(6) + b"\xc1\xc1\xc1\xc1\xc1\xc1", "malformed frame"),
    "not a map": (_frame([1, 2, 3]), "expected a map"),
    "newer major version": (_frame({"v": 2, "k": "step"}), "protocol version 2"),
    "no kind": (_frame({"v": 1}), "no event kind"),
    "nested past msgpack's limit": (HEADER.pack(20001) + b"\x91" * 20000 + b"\xc0", "malformed frame"),
    "wrong field type": (_frame({"v": 1, "k": "step", "step": "7", "t": 1.0, "dur_ms": 1.0}), "field 'step'"),
    "map where a list belongs": (_frame({"v": 1, "k": "layers", "step": 1, "ids": {"a": 1}, "fwd_ms": [],
                                         "fwd_self_ms": [], "calls": []}), "field 'ids'"),
    "ragged arrays": (_frame({"v": 1, "k": "layers", "step": 1, "ids": [0, 1], "fwd_ms": [1.0],
                              "fwd_self_ms": [1.0, 1.0], "calls": [1, 1]}), "fwd_ms has 1 values for 2 ids"),
    "deep free-form value": (_frame({"v": 1, "k": "span", "name": "x", "category": "c", "start": 1.0,
                                     "dur_ms": 1.0, "attrs": {"a": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]}}),
                             "field 'attrs'"),
    "missing required field": (_frame({"v": 1, "k": "host", "t": 1.0}), "malformed 'host' event"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_frame_is_one_status_line(short_tmp: Path, case: str) -> None:
    frame, expected = HOSTILE[case]
    model = read_from(short_tmp / "h.sock", [*GOOD[:5], frame, *GOOD[5:]])
    assert model.connection == LOST
    assert expected in model.connection_note
    assert model.session is not None  # what came before the bad frame was applied


def test_a_hostile_hello_is_one_status_line(short_tmp: Path) -> None:
    huge = encode(Hello(role="agent", version="9." + "x\n" * 500_000))
    model = read_from(short_tmp / "h.sock", GOOD, hello=huge)
    assert model.connection == LOST and "not supported" in model.connection_note
    not_hello = encode(SESSION)
    model = read_from(short_tmp / "n.sock", GOOD, hello=not_hello)
    assert model.connection == LOST and "did not start with hello" in model.connection_note


def test_the_good_stream_reads_cleanly(short_tmp: Path) -> None:
    model = read_from(short_tmp / "g.sock", GOOD)
    assert model.connection in (LOST, ENDED) and model.connection_note == "connection lost"
    assert model.session is not None and model.session.argv == SESSION.argv


@st.composite
def mutated_stream(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """The good stream with one event's value, key or kind changed (re-encoded as a valid frame);
    and whether that event still decodes."""
    i = draw(st.integers(1, len(GOOD) - 1))
    body = msgpack.unpackb(GOOD[i][HEADER.size:], raw=False, strict_map_key=False)
    keys = sorted(body, key=str)
    key = draw(st.sampled_from(keys))
    how = draw(st.sampled_from(["value", "drop", "kind"]))
    if how == "value":
        body[key] = draw(VALUES)
    elif how == "drop":
        del body[key]
    else:
        body["k"] = draw(st.sampled_from(["step", "layers", "model", "host", "span", "ops", "flops", "end"]))
    decodes = isinstance(body.get("k"), str) and body.get("v") == 1
    if decodes:
        try:
            decode_one(body)
        except ProtocolError:
            decodes = False
    frames = list(GOOD)
    frames[i] = _frame(body)
    return frames, decodes


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutated_stream())
def test_mutated_events_never_raise_out_of_the_reader(short_tmp: Path, case: tuple[list[bytes], bool]) -> None:
    frames, decodes = case
    path = short_tmp / "m.sock"
    path.unlink(missing_ok=True)
    model = read_from(path, frames)
    if not decodes:
        assert model.connection == LOST and model.connection_note.startswith(("malformed", "protocol version"))
    # an event that decodes is one the model must take: the reader's last-resort net stays unused
    assert not model.connection_note.startswith("bad event")
