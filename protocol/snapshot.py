"""What a late joiner needs, kept as encoded frames: the agent's snapshot for a viewer that connects
mid-run, and a recording's keyframes written by recorders that are not the agent.

One class for both: the latest frame of each state kind (per key: model trees per model, FLOPs per
input signature) and bounded rings of the recent history of every series, replayed in publication
order. The two users differ only in their limits and in what they keep of per-connection kinds.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .events import Event

# Kinds that describe state (the latest per key wins), with the attribute that keys them.
STATE_KEYS: dict[str, str | None] = {"session": None, "model": "model", "flops": "signature"}
# Per-connection kinds: never history.
PER_CONNECTION = frozenset(("hello", "snapshot_done", "stats"))


class Snapshot:
    """Bounded rings of encoded frames in publication order, plus the latest state frames.

    ``frames()`` is the session first, then the model trees, then every other kept frame in the
    order it was added. ``limits`` caps a kind's ring below ``size``; ``state`` adds kinds kept as
    latest-only (keyed by the attribute named, or None for one per kind); ``skip`` kinds are dropped.
    """

    def __init__(self, size: int = 600, *, limits: dict[str, int] | None = None,
                 state: dict[str, str | None] | None = None,
                 skip: frozenset[str] = PER_CONNECTION) -> None:
        self.size = size
        self.limits = dict(limits or {})
        self.state_keys = {**STATE_KEYS, **(state or {})}
        self.skip = skip
        self.seq = 0
        self.session: bytes | None = None
        self.trees: dict[Any, tuple[int, bytes]] = {}
        self.state: dict[tuple[str, Any], tuple[int, bytes]] = {}
        self.rings: dict[str, deque[tuple[int, bytes]]] = {}

    def add_event(self, event: Event, frame: bytes) -> None:
        kind = event.KIND
        if kind in self.skip:
            return
        self.seq += 1
        if kind == "session":
            self.session = frame
        elif kind == "model":
            self.trees[event.model] = (self.seq, frame)  # type: ignore[attr-defined]
        elif kind in self.state_keys:
            attr = self.state_keys[kind]
            self.state[(kind, getattr(event, attr) if attr else None)] = (self.seq, frame)
        else:
            ring = self.rings.get(kind)
            if ring is None:
                ring = self.rings[kind] = deque(maxlen=min(self.size, self.limits.get(kind, self.size)))
            ring.append((self.seq, frame))

    def frames(self) -> list[bytes]:
        out = [self.session] if self.session is not None else []
        out += [f for _, f in sorted(self.trees.values(), key=lambda x: x[0])]
        rest = list(self.state.values())
        for ring in self.rings.values():
            rest.extend(ring)
        rest.sort(key=lambda x: x[0])
        out += [f for _, f in rest]
        return out


# Series whose history a recording's keyframe needs only a little of (big frames, shown as "latest").
KEYFRAME_LIMITS = {"layers": 32, "ops": 2}


class KeyframeBuilder(Snapshot):
    """The snapshot ``llmtop record`` and the TUI's record key write as keyframes: they see events but
    not the agent's own snapshot. Unlike the agent's, it keeps the latest ``stats`` and ``end`` (a seek
    shows the transport health and the exit as they were). The agent passes its real snapshot to
    ``RecordingWriter.keyframe`` instead."""

    def __init__(self, history: int = 600) -> None:
        super().__init__(history, limits=KEYFRAME_LIMITS, state={"stats": None, "end": None},
                         skip=frozenset(("hello", "snapshot_done")))
        self.history = history

    def add(self, frame: bytes, event: Event) -> None:
        self.add_event(event, frame)
