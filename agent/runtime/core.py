"""The contract between the agent runtime (thread, server, recorder) and its instruments (hooks).

An ``Instrument`` installs hooks on the user's hot path that only take timestamps into
preallocated accumulators. Once per tick the agent thread calls ``poll()``, which swaps those
accumulators by reference and turns them into protocol events. Instruments never do I/O and
never encode; the runtime does both, on its own thread.

Fail open: an instrument whose hook raises must catch the error itself, disable that hook and
call ``ctx.warn(...)``. The runtime also guards ``install``/``poll``/``uninstall`` and disables an
instrument that raises from any of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from llmtop.protocol.events import Event


@dataclass
class Options:
    """Agent settings: every one a field here. The runtime reads those with an ``LLMTOP_*`` variable
    from the environment (agent/runtime/options.py, ``ENV``); keyword arguments of
    ``llmtop.agent.start()`` override them."""

    tick_s: float = 0.5  # LLMTOP_TICK: how often the agent thread polls instruments and samples the host
    budget_pct: float = 2.0  # LLMTOP_BUDGET: overhead budget; above it per-layer timing is sampled
    layer_every: int = 0  # LLMTOP_LAYER_EVERY: 0 automatic (budget-driven); N: every Nth step
    ops_every: int = 50  # LLMTOP_OPS_EVERY: profile aten ops one step in N (0 disables)
    flops: bool = True  # LLMTOP_FLOPS: compute FLOPs once per input-shape signature
    history: int = 600  # LLMTOP_HISTORY: recent steps/samples kept for late joiners' snapshot
    client_buffer: int = 4 * 1024 * 1024  # LLMTOP_CLIENT_BUFFER: bytes queued per viewer, then dropped
    record: str | None = None  # LLMTOP_RECORD: path of a recording written by the agent itself
    socket: str | None = None  # LLMTOP_SOCKET: the socket to claim (see resolve_socket); else per pid
    stall_s: float = 30.0  # LLMTOP_STALL_S: a viewer whose buffer stays full this long is dropped
    # Socket server limits (SECURITY.md): connections in all, connections still in the handshake,
    # and seconds a new connection has to say hello; beyond them connections are refused.
    max_clients: int = 64  # LLMTOP_MAX_CLIENTS
    max_pending: int = 16  # LLMTOP_MAX_PENDING
    handshake_s: float = 5.0  # LLMTOP_HANDSHAKE_S
    ops_top_k: int = 0  # aten ops kept per profiled step (0: the ops instrument's default)
    # What the layer hooks cost, in ns (0: measured at install). Set by tests and benchmarks, which
    # want no calibration run or a known cost.
    layer_call_ns: float = 0.0  # one module call on a sampled step
    root_call_ns: float = 0.0  # one root call on an unsampled step
    hook_call_ns: float = 0.0  # torch calling one Python hook
    hang_s: float = 5.0  # LLMTOP_HANG_S: a collective blocked this long is reported (CollectiveWait)


YIELD_EVERY = 32  # items an agent-thread loop handles between two hand-overs of the GIL


def let_script_run() -> None:
    """Hand the GIL to the script's threads for a moment (agent thread, inside long loops).

    A thread that wants the GIL waits up to ``sys.getswitchinterval()`` (5 ms) before the holder is
    made to let go; a tick that encodes a few hundred events in one go stalled the script's steps
    by up to that much. ``time.sleep(0)`` releases the GIL at once.
    """
    time.sleep(0)


class Context(Protocol):
    """What the runtime offers instruments. All methods are safe from any thread and never block."""

    options: Options

    def emit(self, event: Event) -> None:
        """Queue an event for every viewer and the recording (encoded later, on the agent thread)."""

    def warn(self, source: str, message: str) -> None:
        """Report a contained failure as an ``AgentWarning`` event."""

    # The step tracker instrument owns step numbering: it writes ``current_step`` and registers the
    # callable behind the public ``llmtop.agent.step()`` with ``set_manual_step``.
    current_step: int
    # True once the agent is shutting down: instruments should not start expensive work.
    stopping: bool

    def set_manual_step(self, fn: Any) -> None:
        """Route ``llmtop.agent.step()`` to ``fn()``."""


class Instrument(Protocol):
    name: str

    def install(self, ctx: Context) -> None:
        """Register hooks. Called once, on the thread that starts the agent."""

    def poll(self, now: float) -> list[Event]:
        """Agent thread, every tick: swap accumulators and return events ready to send."""

    def uninstall(self) -> None:
        """Remove hooks (agent stopping, or this instrument disabled after an error)."""


@dataclass
class StepCosts:
    """What the step tracker and the layers instrument tell each other about a step's cost.

    Plain attributes, read and written on the hot path (one attribute access each, no call).
    """

    # the step tracker's own cost in the step now ending: the tracker writes it just before the
    # step-end listeners run; the layers instrument takes it (and zeroes it) for its budget
    tracker_ns: int = 0
    # per-layer timing runs every Nth step: written by the layers instrument when its rate changes,
    # read by the tracker into the ending step's record
    every: int = 1
    # torch calling one of our hooks or wrappers (the layers instrument calibrates it)
    hook_ns: int = 1500
    # agent thread: the layers instrument's share of step ``step``'s cost; None while none runs
    of_step: Callable[[int], int] | None = None


def no_generation() -> str | None:
    return None


class HotBus:
    """Synchronous callbacks between instruments on the hot path (no allocation, no I/O).

    The layers instrument owns the global module hooks and announces root-module forward calls;
    the step tracker announces step ends. Listeners must be cheap and must not raise (guard them).
    """

    def __init__(self) -> None:
        # fn(module, t_start_ns, t_end_ns, args, kwargs): a root module's forward returned.
        self.root_forward: list[Any] = []
        # fn(module, t_start_ns, args, kwargs): a root module's forward is about to run.
        self.root_forward_start: list[Any] = []
        # fn(step, t_end_ns): step ``step`` just ended (called on the thread that ended it).
        self.step_end: list[Any] = []
        # True while the step in progress is a detailed one (the layers instrument samples it):
        # listeners do optional per-call work (input signatures, autocast state) only then, since
        # every Python line in a hook costs more right after torch has run (cold caches).
        self.detail = True
        self.costs = StepCosts()
        # "prefill" / "decode" while a transformers ``generate`` call runs on this thread, else None:
        # set by the Hugging Face integration while installed (the step tracker makes one step per call)
        self.generation_phase: Callable[[], str | None] = no_generation
        # fn(t_end_ns): the outermost generate() call returned on this thread (the HF integration)
        self.generate_end: list[Any] = []
        # fn(step, t_end_ns): an evaluation between training steps just ended (the step tracker);
        # what was accumulated since the last step end is no training step's (``step`` is the next's)
        self.eval_end: list[Any] = []
        # agent thread: fn(step, mode, merged) -> (ms, calls, bytes) in torch.distributed collectives
        # during that step, or None (not measured); set by the collectives instrument while installed
        self.comm_of: Callable[[int, str, int], tuple[float, int, int] | None] | None = None


BUS = HotBus()


def warn_safely(ctx: Any, source: str, message: str) -> None:
    """``ctx.warn`` from an instrument's failure path: never raises, whatever the context."""
    try:
        if ctx is not None:
            ctx.warn(source, message)
    except Exception:
        pass


def wall() -> float:
    return time.time()


# The running agent in this process, if any. Set by the runtime; read by the public API in
# ``llmtop.agent`` so that span()/step()/metric() cost next to nothing when no agent runs.
ACTIVE: Any = None
