"""The agent's history for late joiners: the shared ``Snapshot`` with the agent's ring limits."""

from __future__ import annotations

from llmtop.protocol.events import Event
from llmtop.protocol.snapshot import Snapshot


class History(Snapshot):
    """Bounded rings of encoded frames for a late joiner's snapshot, in publication order."""

    SMALL = {"ops": 20, "warning": 100, "anomaly": 200}

    def __init__(self, size: int) -> None:
        super().__init__(size, limits=self.SMALL)

    def add(self, event: Event, frame: bytes) -> None:
        self.add_event(event, frame)

    def snapshot(self) -> list[bytes]:
        return self.frames()
