"""The event schema, written down in one place (see SCHEMA.md for the prose).

Events are aggregates per tick or per step, never raw calls. Per-module data travels as parallel
arrays indexed by module id; a model tree is sent once and later events refer to its ids.

Forward compatibility: a newer peer may add fields (ignored here) and kinds (skipped and counted
by ``EventDecoder``). Never rename or repurpose a field within a major version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .checks import checker, fast_decoder
from .frames import PROTOCOL_MAJOR, PROTOCOL_VERSION, ProtocolError, pack_map

REGISTRY: dict[str, type[Event]] = {}


@dataclass
class Event:
    KIND: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.KIND:
            REGISTRY[cls.KIND] = cls

    def to_map(self) -> dict[str, Any]:
        body: dict[str, Any] = {"v": PROTOCOL_MAJOR, "k": self.KIND}
        cls = type(self)
        order = _ORDER.get(cls)
        if order is None:  # field order once per class: the agent encodes one Step per step
            order = _ORDER[cls] = tuple(f.name for f in dataclasses.fields(cls))
        fields = self.__dict__
        if len(fields) == len(order):  # exactly the fields, as __init__ set them: one C-level copy
            body.update(fields)
        else:
            for name in order:
                body[name] = getattr(self, name)
        return body

    @classmethod
    def from_map(cls, body: dict[str, Any]) -> Event:
        return _decoder(cls)(body)

    @classmethod
    def _from_map_checked(cls, body: dict[str, Any]) -> Event:
        """The reference path: what ``from_map``'s generated decoder hands every body it does not
        accept outright, so that this path alone words every error."""
        names = _field_names(cls)
        try:
            event = cls(**{k: v for k, v in body.items() if k in names})
        except TypeError as exc:
            raise ProtocolError(f"malformed {cls.KIND!r} event: {exc}") from None
        check = _CHECKS.get(cls)
        if check is None:  # compiled once per class, on first use (every class is defined by then)
            check = _CHECKS[cls] = checker(cls)
        check(event)  # untrusted input: a wrong type is a decoding error here, not a crash in a view
        return event


_FIELDS: dict[type, frozenset[str]] = {}
_CHECKS: dict[type, Callable[[Event], None]] = {}
_DECODERS: dict[type, Callable[[dict[str, Any]], Event]] = {}
_ORDER: dict[type, tuple[str, ...]] = {}


def _decoder(cls: type[Event]) -> Callable[[dict[str, Any]], Event]:
    decode = _DECODERS.get(cls)
    if decode is None:  # generated once per class, on first use (every class is defined by then)
        decode = _DECODERS[cls] = fast_decoder(cls, cls._from_map_checked)
    return decode


def _field_names(cls: type) -> frozenset[str]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    return names


def encode(event: Event) -> bytes:
    """One event as one frame, length prefix included."""
    return pack_map(event.to_map())


class EventDecoder:
    """Turns frame maps into events; unknown kinds are skipped and counted, not errors."""

    def __init__(self) -> None:
        self.unknown: dict[str, int] = {}
        self._by_kind: dict[str, Callable[[dict[str, Any]], Event]] = {}  # kind -> generated decoder

    def decode(self, body: dict[str, Any]) -> Event | None:
        kind = body["k"]
        decode = self._by_kind.get(kind)
        if decode is None:
            cls = REGISTRY.get(kind)
            if cls is None:
                self.unknown[kind] = self.unknown.get(kind, 0) + 1
                return None
            decode = self._by_kind[kind] = _decoder(cls)
        return decode(body)

    @property
    def skipped(self) -> int:
        return sum(self.unknown.values())


# --- handshake -------------------------------------------------------------------------------


@dataclass
class Hello(Event):
    """First frame each way. ``role`` is agent, viewer or recorder."""

    KIND: ClassVar[str] = "hello"
    role: str
    version: str = PROTOCOL_VERSION
    pid: int = 0
    software: str = "llmtop"


def check_hello(event: Event | None) -> Hello:
    """Validate the peer's first event; a wrong major version was already refused by the frame layer."""
    if not isinstance(event, Hello):
        raise ProtocolError("handshake failed: the peer did not start with hello")
    major = str(event.version).split(".", 1)[0]
    if major != str(PROTOCOL_MAJOR):
        shown = " ".join(str(event.version).split())  # the peer's text: one short line
        shown = shown if len(shown) <= 24 else shown[:23] + "…"
        raise ProtocolError(f"protocol version {shown} is not supported (this llmtop speaks {PROTOCOL_VERSION})")
    return event


# --- session and structure ---------------------------------------------------------------------


@dataclass
class Session(Event):
    """Who is being measured. Sent first after hello, and in every snapshot."""

    KIND: ClassVar[str] = "session"
    pid: int
    argv: list[str]
    cwd: str = ""
    started: float = 0.0  # wall-clock seconds (time.time())
    hostname: str = ""
    python: str = ""
    torch: str = ""
    transformers: str = ""
    devices: list[str] = field(default_factory=list)  # device names, e.g. "cpu", "NVIDIA H100 80GB HBM3"
    options: dict[str, Any] = field(default_factory=dict)  # agent settings in force
    # Distributed jobs (all empty/None for a single process). ``job`` identifies the job on every
    # host (torchelastic run id, Slurm job id, or master address:port and start time); ``launcher``
    # says where these came from (torchrun, spawn, accelerate, deepspeed, slurm, mpi, dist: learned
    # from torch.distributed once initialised). Sent again when they become known late (spawn).
    job: str = ""
    launcher: str = ""
    rank: int | None = None
    local_rank: int | None = None
    world_size: int | None = None
    node_rank: int | None = None
    restart: int | None = None  # torchelastic restart count of this rank's process (0: first attempt)


@dataclass
class ModelTree(Event):
    """One model's module tree. Module ids are unique across all models of a session.

    ``parents[i]`` is the id of ``ids[i]``'s parent, -1 for the root.
    """

    KIND: ClassVar[str] = "model"
    model: int
    name: str  # class name of the root module
    ids: list[int]
    paths: list[str]  # "" for the root, then "transformer.h.0.attn" …
    classes: list[str]
    params: list[int]  # parameters owned directly by the module (not by its children)
    parents: list[int]
    trainable: list[bool] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)  # dominant parameter dtype per module, "" if none
    compiled: list[bool] = field(default_factory=list)  # torch.compile'd node (shown as one row)


# --- per-step and per-tick measurements ------------------------------------------------------------

PHASES = ("data", "h2d", "forward", "backward", "optimizer", "other")


@dataclass
class Step(Event):
    """One step (an optimizer step in training, a root forward or generate call in inference).

    Times are milliseconds. ``phases`` maps each name of PHASES to ms; they sum to ``dur_ms``.
    Optional measurements are None when not measured (absent, not zero).
    """

    KIND: ClassVar[str] = "step"
    step: int
    t: float  # wall-clock end time
    dur_ms: float
    # train | infer | eval: an evaluation between training steps (no-grad or eval-mode forwards), numbered
    # as the training step it precedes; not a step (never counted, charged, nor diagnosed as one)
    mode: str = "train"
    phases: dict[str, float] = field(default_factory=dict)
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    samples: int | None = None
    tokens: int | None = None
    overhead_us: float = 0.0  # the agent's own cost in this step
    layer_every: int = 1  # per-layer timing is taken every Nth step
    cuda_allocated: int | None = None  # bytes
    cuda_reserved: int | None = None
    cuda_peak: int | None = None
    gpu_ms: float | None = None  # device time from CUDA events, resolved later
    # consecutive steps this record stands for: >1 when the agent folded them while its thread was
    # behind (times, samples and tokens are their sums, ``step`` the last one's, no loss)
    merged: int = 1
    # backward() losses summed into ``loss`` (gradient accumulation's micro-batches); 0: none seen
    losses: int = 0
    # torch.distributed collectives during the step (not a phase: they overlap forward/backward):
    # wall time the script's threads spent blocked in them, how many, and the bytes they carried
    comm_ms: float | None = None
    comm_calls: int = 0
    comm_bytes: int = 0
    # a generate() call's step: tokens its prefill forward(s) ran (the prompts) and its decode forwards
    # ran (one per sequence per forward); they sum to ``tokens``. None outside generate()
    prefill_tokens: int | None = None
    decode_tokens: int | None = None


@dataclass
class LayerStats(Event):
    """Per-module times for one step, as parallel arrays indexed like ``ids``.

    ``*_self_ms`` excludes time spent in child modules. Backward arrays are empty when the step
    had no backward. ``act_bytes`` is memory each module added in forward (empty off CUDA).
    """

    KIND: ClassVar[str] = "layers"
    step: int
    ids: list[int]
    fwd_ms: list[float]
    fwd_self_ms: list[float]
    calls: list[int]
    bwd_ms: list[float] = field(default_factory=list)
    bwd_self_ms: list[float] = field(default_factory=list)
    act_bytes: list[int] = field(default_factory=list)


@dataclass
class HostSample(Event):
    """Process and system sample taken by the agent thread every tick."""

    KIND: ClassVar[str] = "host"
    t: float
    cpu_pct: float  # of one core, like top (can exceed 100)
    rss: int  # bytes
    sys_used: int
    sys_total: int
    threads: int = 0
    # % of the time since the previous sample that the main thread (the one running the script) was
    # ready to run but waited for a CPU (Linux schedstat run-queue delay; None where not told)
    runq_pct: float | None = None


@dataclass
class DeviceSample(Event):
    """One GPU's NVML sample. A field the driver cannot give is None ("n/a"), never zero."""

    KIND: ClassVar[str] = "device"
    t: float
    index: int
    name: str
    util_pct: float | None = None
    mem_used: int | None = None
    mem_total: int | None = None
    power_w: float | None = None
    temp_c: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None


@dataclass
class Span(Event):
    """A user or integration span (``llmtop.agent.span``), sent when it closes."""

    KIND: ClassVar[str] = "span"
    name: str
    category: str
    start: float  # wall-clock seconds
    dur_ms: float
    depth: int = 0
    step: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Metric(Event):
    """A custom series point from ``llmtop.agent.metric(name, value)``."""

    KIND: ClassVar[str] = "metric"
    name: str
    value: float
    t: float
    step: int | None = None


@dataclass
class LogLine(Event):
    """A line the script wrote. ``stream`` is stdout or stderr; ``replace`` marks a \\r update."""

    KIND: ClassVar[str] = "log"
    t: float
    text: str
    stream: str = "stdout"
    replace: bool = False


@dataclass
class Anomaly(Event):
    """Something a person should look at (non-finite loss, spike, memory creep, slow step)."""

    KIND: ClassVar[str] = "anomaly"
    t: float
    what: str  # nan_loss | loss_spike | grad_spike | memory_creep | slow_step | oom
    message: str
    step: int | None = None
    severity: str = "warning"  # info | warning | error


@dataclass
class AgentWarning(Event):
    """An instrument failed and was disabled; the script was not affected."""

    KIND: ClassVar[str] = "warning"
    t: float
    source: str
    message: str


@dataclass
class Ops(Event):
    """Hot aten ops from a profiler window of one step, parallel arrays."""

    KIND: ClassVar[str] = "ops"
    step: int
    names: list[str]
    self_ms: list[float]
    calls: list[int]
    flops: list[float] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)
    coverage: float | None = None  # share of op time that has a FLOP formula
    # self time of every aten op of the profiled step (the rows are its top K): the base of their shares
    total_ms: float | None = None
    rows: int = 0  # op/shape rows in the profile before the top K were kept


@dataclass
class LayerFlops(Event):
    """FLOPs and bytes per module for one input-shape signature (computed once per signature)."""

    KIND: ClassVar[str] = "flops"
    signature: str
    ids: list[int]
    flops: list[float]  # forward FLOPs per call
    bytes: list[float]  # bytes moved per call (weights + activations read and written)
    peak_flops: float | None = None  # device dense peak FLOP/s for the dtype in use
    peak_bw: float | None = None  # device memory bandwidth, bytes/s
    device: str = ""
    peak_source: str = ""  # where the peaks come from: measured / env / cpu-features / datasheet
    method: str = "meta"  # meta: a meta-device copy was run | sampled-forward: one real call was counted


@dataclass
class StepFlops(Event):
    """FLOPs of exactly the root calls of one sampled step (the calls its ``LayerStats`` timed).

    Per module: the sum over the step's root calls of the counted FLOPs/bytes of each call's own
    input signature (decode calls with their own KV-cache length). Step figures count backward as
    2x forward when the step's calls ran with grad on in training mode. A figure that is unknown or
    impossible (above the device peak) is None and ``note`` says why.
    """

    KIND: ClassVar[str] = "step_flops"
    step: int
    ids: list[int] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)  # forward FLOPs of the step, per module
    bytes: list[float] = field(default_factory=list)  # forward bytes of the step, per module
    roots: list[int] = field(default_factory=list)  # root module ids ...
    root_calls: list[int] = field(default_factory=list)  # ... and how many of their calls are summed
    fwd_flops: float | None = None  # forward FLOPs of the whole step
    flops_total: float | None = None  # forward + backward (3x forward when training)
    dur_ms: float | None = None  # wall time of the step (previous step end to this one)
    achieved_flops: float | None = None  # flops_total / dur_ms, None above the peak
    mfu: float | None = None  # achieved_flops / peak_flops
    peak_flops: float | None = None
    method: str = "meta"  # how the calls were counted (meta / sampled-forward / mixed)
    note: str = ""  # why a figure is missing


@dataclass
class Generation(Event):
    """One ``generate`` call (transformers) or a decode loop the agent recognised."""

    KIND: ClassVar[str] = "generation"
    t: float
    batch: int
    prompt_tokens: int
    new_tokens: int
    ttft_ms: float
    decode_ms: list[float] = field(default_factory=list)  # per-token latency after the first
    kv_bytes: int | None = None
    total_ms: float = 0.0


@dataclass
class CollectiveWait(Event):
    """A torch.distributed collective this rank has been blocked in for a while (a possible hang).

    Sent at each tick while the call lasts longer than the agent's hang threshold, and once with
    ``done`` when it returns, so a viewer can say which ranks wait, in what, since when, and (by
    elimination against the world size) which ranks never arrived."""

    KIND: ClassVar[str] = "collective_wait"
    t: float  # wall-clock time of this report
    op: str  # all_reduce, barrier, ddp_all_reduce …
    since: float  # wall-clock time the call began
    seq: int = 0  # this rank's count of collectives so far (the same call has the same seq on every rank)
    step: int = 0
    done: bool = False


@dataclass
class Stats(Event):
    """Transport health for one viewer: frames dropped because it was slow, agent cost."""

    KIND: ClassVar[str] = "stats"
    t: float
    dropped: int = 0
    clients: int = 0
    agent_cpu_pct: float | None = None


@dataclass
class SnapshotDone(Event):
    """Marks the end of the snapshot a late joiner receives; live events follow."""

    KIND: ClassVar[str] = "snapshot_done"
    events: int = 0


@dataclass
class End(Event):
    """The script ended. Fields unknown to the sender are None."""

    KIND: ClassVar[str] = "end"
    t: float
    exit_code: int | None = None
    signal: int | None = None
    traceback: str | None = None
    reason: str = ""  # exit | exception | signal | detached


def decode_one(body: dict[str, Any]) -> Event | None:
    """Decode with a throwaway decoder (tests, one-off tools)."""
    return EventDecoder().decode(body)
