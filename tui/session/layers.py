"""Per-layer state of the viewer's session: ``Layer`` (one module of a model tree, with its latest
measurements and its own FLOP/s join: one timed step's FLOPs over that step's forward time, and the
roofline verdict from them) and ``LayerTables``, the mixin of ``SessionModel`` that builds the model
trees, folds layer tables into them, tells their age and walks them. Its state (``layers``, ``roots``,
``models``, ``layers_step``…) is declared in ``SessionModel.reset`` and guarded by the model's lock like
the rest. No Textual here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from llmtop.protocol.events import LayerStats, ModelTree
from llmtop.protocol.formulas import bound

EMA_ALPHA = 0.2  # weight of the newest step in per-layer and step-time means
LAYER_HISTORY = 256  # per-layer (step, fwd, bwd, act) points kept for the detail screen
TIMED_KEPT = 32  # per layer: (step, fwd ms, calls) of recent timed steps, to join per-step FLOPs
STALE_STEPS = 3  # a layer table older than this many steps is shown with its age


@dataclass
class Layer:
    """One module of a model tree, with its latest measurements."""

    id: int
    model: int
    path: str
    cls: str
    params: int  # owned directly
    parent: int
    depth: int = 0
    dtype: str = ""
    trainable: bool = True
    compiled: bool = False
    children: list[int] = field(default_factory=list)
    total_params: int = 0  # this module and everything under it
    # latest step with layer timing, and exponential means over steps
    step: int | None = None
    fwd_ms: float | None = None
    fwd_self_ms: float | None = None
    bwd_ms: float | None = None
    bwd_self_ms: float | None = None
    calls: int | None = None
    act_bytes: int | None = None
    fwd_ema: float | None = None
    bwd_ema: float | None = None
    act_ema: float | None = None
    history: deque[tuple[int, float, float | None, int | None]] = field(
        default_factory=lambda: deque(maxlen=LAYER_HISTORY)
    )
    # from LayerFlops: per forward call
    flops: float | None = None
    bytes: float | None = None
    peak_flops: float | None = None
    peak_bw: float | None = None
    # from StepFlops: the forward FLOPs/bytes of exactly the calls one timed step ran
    step_flops: float | None = None
    step_bytes: float | None = None
    step_flops_step: int | None = None  # the step those figures are for
    step_flops_note: str = ""  # why there is no figure for that step
    timed: deque[tuple[int, float, int]] = field(default_factory=lambda: deque(maxlen=TIMED_KEPT))

    @property
    def name(self) -> str:
        """The last path component; the root is shown by its class."""
        return self.path.rsplit(".", 1)[-1] if self.path else self.cls

    @property
    def time_ms(self) -> float | None:
        """Recent forward + backward time (EMA), None if never measured."""
        if self.fwd_ema is None:
            return None
        return self.fwd_ema + (self.bwd_ema or 0.0)

    def _timed_at(self, step: int | None) -> tuple[int, float, int] | None:
        """(step, forward ms, calls) of timed step ``step``, if it is recent enough to be kept."""
        if step is None:
            return None
        for entry in reversed(self.timed):
            if entry[0] == step:
                return entry
            if entry[0] < step:
                break
        return None

    @property
    def achieved_flops(self) -> float | None:
        """FLOP/s reached in forward: the FLOPs of one timed step's calls / that step's forward time
        (never FLOPs of some calls over the time of others). None when unknown or above the peak."""
        return self._achieved()[0]

    @property
    def achieved_note(self) -> str:
        """Why ``achieved_flops`` is None ("" when it is a number, or nothing is known yet)."""
        return self._achieved()[1]

    def _achieved(self) -> tuple[float | None, str]:
        if self.step_flops_note:
            return None, self.step_flops_note
        if not self.step_flops:
            return None, ""
        timed = self._timed_at(self.step_flops_step)
        if timed is None or timed[1] <= 0:
            return None, f"no forward time for step {self.step_flops_step}"
        value = self.step_flops / (timed[1] / 1000.0)
        if self.peak_flops and value > self.peak_flops:
            return None, (f"{value / 1e9:.1f} GFLOP/s > device peak {self.peak_flops / 1e9:.1f}: "
                          "count and time disagree")
        return value, ""

    @property
    def intensity(self) -> float | None:
        if self.flops is None or not self.bytes:
            return None
        return self.flops / self.bytes

    @property
    def bound(self) -> str | None:
        """compute / memory / overhead, from the roofline of one timed step's own FLOPs, bytes and
        forward time; None without peaks, or without that step's figures."""
        timed = self._timed_at(self.step_flops_step)
        if timed is None or self.achieved_note:  # an impossible figure gets no verdict either
            return None
        return roofline_bound(self.step_flops, self.step_bytes, self.peak_flops, self.peak_bw, timed[1], 1)


def roofline_bound(flops: float | None, nbytes: float | None, peak_flops: float | None,
                   peak_bw: float | None, fwd_ms: float | None, calls: int | None) -> str | None:
    """Which limit a layer sits against: ``compute``, ``memory`` or ``overhead``.

    The arithmetic intensity (FLOPs per byte) against the ridge point (peak FLOP/s ÷ bandwidth)
    decides compute versus memory; a measured time far above both roofline limits means neither is
    the limit (launch overhead, Python, synchronisation): ``overhead``.
    """
    if not flops or not nbytes or not peak_flops or not peak_bw:
        return None
    per_call_s = fwd_ms / 1000.0 / calls if fwd_ms and calls else None
    return bound(flops, nbytes, per_call_s, peak_flops, peak_bw)


class LayerTables:
    """``SessionModel``'s per-layer ingest and queries (model trees, layer tables, their age, walks)."""

    def _model(self, e: ModelTree) -> None:
        old = self.models.get(e.model)
        if old is not None:
            for mid in old.ids:
                self.layers.pop(mid, None)
            self.roots = [r for r in self.roots if r not in old.ids]
        self.models[e.model] = e
        n = len(e.ids)
        dtypes = e.dtypes if len(e.dtypes) == n else [""] * n
        trainable = e.trainable if len(e.trainable) == n else [True] * n
        compiled = e.compiled if len(e.compiled) == n else [False] * n
        for i, mid in enumerate(e.ids):
            self.layers[mid] = Layer(id=mid, model=e.model, path=e.paths[i], cls=e.classes[i],
                                     params=e.params[i], parent=e.parents[i], dtype=dtypes[i],
                                     trainable=trainable[i], compiled=compiled[i])
        for mid in e.ids:
            layer = self.layers[mid]
            parent = self.layers.get(layer.parent)
            if parent is None:
                self.roots.append(mid)
            else:
                parent.children.append(mid)
        for root in e.ids:
            if self.layers[root].parent not in self.layers:
                _fill_totals(self.layers, root)
        self.tree_version += 1

    def _layers(self, e: LayerStats) -> None:
        if self.layers_step is not None and e.step <= self.layers_step:
            self.numbering_restarts()  # steps count from 0 again (tui/session/flops.py)
        layers = self.layers
        n = len(e.ids)
        bwd = e.bwd_ms if len(e.bwd_ms) == n else None
        bwd_self = e.bwd_self_ms if len(e.bwd_self_ms) == n else None
        act = e.act_bytes if len(e.act_bytes) == n else None
        for i, mid in enumerate(e.ids):
            layer = layers.get(mid)
            if layer is None:
                continue
            f = e.fwd_ms[i]
            b = bwd[i] if bwd is not None else None
            a = act[i] if act is not None else None
            layer.step = e.step
            layer.fwd_ms = f
            layer.fwd_self_ms = e.fwd_self_ms[i]
            layer.calls = e.calls[i]
            layer.bwd_ms = b
            layer.bwd_self_ms = bwd_self[i] if bwd_self is not None else None
            layer.act_bytes = a
            layer.fwd_ema = f if layer.fwd_ema is None else layer.fwd_ema + EMA_ALPHA * (f - layer.fwd_ema)
            if b is not None:
                layer.bwd_ema = b if layer.bwd_ema is None else layer.bwd_ema + EMA_ALPHA * (b - layer.bwd_ema)
            if a is not None:
                layer.act_ema = a if layer.act_ema is None else layer.act_ema + EMA_ALPHA * (a - layer.act_ema)
            layer.history.append((e.step, f, b, a))
            layer.timed.append((e.step, f, e.calls[i]))
        if self.layers_step is None or e.step >= self.layers_step:
            self.layers_step = e.step

    @property
    def layers_age_steps(self) -> int | None:
        """Steps since the newest layer table (0: the latest step was timed); None without one."""
        if self.layers_step is None or self.last_step is None:
            return None
        return max(0, self.last_step.step - self.layers_step)

    @property
    def layers_age_s(self) -> float | None:
        """Seconds of the run between the newest layer table's step and the latest step."""
        if self.layers_step is None or self.last_step is None:
            return None
        for s in reversed(self.steps):
            if s.step <= self.layers_step:
                return max(0.0, self.last_step.t - s.t)
        return None

    @property
    def layers_stale(self) -> str:
        """"" while the layer table is fresh; else its age as people read it ("table of step 12,
        40 steps / 9 s ago"), for every view that draws layer figures."""
        age = self.layers_age_steps
        if age is None or age <= STALE_STEPS:
            return ""
        secs = self.layers_age_s
        when = f"{age} steps" + (f" / {secs:.0f} s" if secs is not None else "")
        return f"layer table of step {self.layers_step}, {when} old"

    def layer_share(self, layer: Layer) -> float | None:
        """Share of the step (0..1) spent in this module, forward + backward, from the means."""
        t = layer.time_ms
        if t is None or not self.step_ema_ms:
            return None
        return t / self.step_ema_ms

    def walk(self, root: int | None = None) -> Iterator[Layer]:
        """Modules depth-first in tree order."""
        stack = list(reversed(self.roots if root is None else [root]))
        while stack:
            layer = self.layers.get(stack.pop())
            if layer is None:
                continue
            yield layer
            stack.extend(reversed(layer.children))

    def hottest_layers(self, n: int = 5, leaves_only: bool = True) -> list[Layer]:
        """Modules with the most recent time; leaves by default so parents don't hide their children."""
        pool = [la for la in self.layers.values() if la.time_ms is not None
                and (not leaves_only or not la.children)]
        pool.sort(key=lambda la: la.time_ms or 0.0, reverse=True)
        return pool[:n]


def _fill_totals(layers: dict[int, Layer], root: int) -> None:
    """Subtree parameter counts and depths, iteratively (deep trees must not hit the recursion limit)."""
    order: list[int] = []
    stack = [(root, 0)]
    while stack:
        mid, depth = stack.pop()
        layer = layers[mid]
        layer.depth = depth
        order.append(mid)
        stack.extend((c, depth + 1) for c in layer.children)
    for mid in reversed(order):
        layer = layers[mid]
        layer.total_params = layer.params + sum(layers[c].total_params for c in layer.children)
