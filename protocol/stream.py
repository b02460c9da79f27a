"""A client connection to an agent: connect, handshake, then a blocking iterator of events."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

from .events import Event, EventDecoder, Hello, check_hello, encode
from .frames import DEFAULT_MAX_FRAME, FrameDecoder, ProtocolError


class Connection:
    """One viewer's or recorder's connection to an agent's Unix socket.

    ``events()`` yields decoded events until the agent closes the socket; unknown kinds are skipped
    and counted in ``decoder.unknown``. Protocol errors raise ``ProtocolError``; a vanished socket
    ends the iteration (``closed_by_peer`` tells which).
    """

    def __init__(self, path: str | os.PathLike[str], role: str = "viewer", timeout: float = 5.0,
                 max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.path = Path(path)
        self.role = role
        self.frames = FrameDecoder(max_frame)
        self.decoder = EventDecoder()
        self.peer: Hello | None = None
        self.closed_by_peer = False
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(self.path))
        except OSError as exc:
            raise ConnectionError(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        self.sock.sendall(encode(Hello(role=role, pid=os.getpid())))
        self._handshake()
        self.sock.settimeout(None)

    def _handshake(self) -> None:
        while self.peer is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ProtocolError("handshake failed: the agent closed the connection")
            for body in self.frames.feed(chunk):
                self.peer = check_hello(self.decoder.decode(body))
                # Only the hello here: the frames after it stay buffered for events(), so that a
                # bad one among them fails the stream after the good ones were delivered.
                break

    def events(self) -> Iterator[Event]:
        for body in self.frames.feed(b""):  # what arrived with the hello
            event = self.decoder.decode(body)
            if event is not None:
                yield event
        while True:
            try:
                chunk = self.sock.recv(262144)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed_by_peer = True
                return
            for body in self.frames.feed(chunk):
                event = self.decoder.decode(body)
                if event is not None:
                    yield event

    def interrupt(self) -> None:
        """Wake a thread blocked in ``events()`` (from any thread); that iteration then ends."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
