"""A distributed job as the viewer holds it: one ``SessionModel`` per agent stream (one per rank).

Sources (local sockets, a remote host's ``llmtop bridge``) each feed the model of their stream,
keyed by a string unique in the viewer (``"host:pid"``); each model learns its rank from its Session
event. The views draw the selected rank's model, and the Ranks view all of them.
"""

from __future__ import annotations

import threading

from llmtop.tui.session.model import SessionModel


class JobModel:
    """Every stream of one job. ``model_for`` may be called from any source's thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards ``models`` only; each model has its own lock
        self.models: dict[str, SessionModel] = {}

    def model_for(self, key: str) -> SessionModel:
        """The model fed by stream ``key``, created on first use and kept after the stream ends
        (a reconnecting source feeds the same model again)."""
        with self.lock:
            model = self.models.get(key)
            if model is None:
                model = self.models[key] = SessionModel()
            return model
