"""Per-layer state of the viewer's session: ``Layer`` (one module of a model tree, with its latest
measurements and its own FLOP/s join: one timed step's FLOPs over that step's forward time, and the
roofline verdict from them) and ``LayerTables``, the mixin of ``SessionModel`` that builds the model
trees, folds layer tables into them, tells their age and walks them. Its state (``layers``, ``roots``,
``models``, ``columns``, ``layers_step``…) is declared in ``SessionModel.reset`` and guarded by the
model's lock like the rest. No Textual here.

A ``Layer`` holds its place in the tree; its measurements live in ``Columns``, one list per figure
indexed by slot, because a 64-rank job's viewer folds thousands of 200-module tables a second: a table
of every module is folded a list at a time, and per-layer points are read out of whole tables only when
a view asks (``tests/test_model.py`` checks every figure against a module-by-module reference).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from operator import attrgetter

from llmtop.protocol.events import LayerStats, ModelTree
from llmtop.protocol.formulas import bound

EMA_ALPHA = 0.2  # weight of the newest step in per-layer and step-time means
LAYER_HISTORY = 256  # per-layer (step, fwd, bwd, act) points kept for the detail screen
TIMED_KEPT = 32  # per layer: (step, fwd ms, calls) of recent timed steps, to join per-step FLOPs
LAYOUTS_KEPT = 4  # distinct ids lists of layer tables whose slots are remembered (LayerStats, StepFlops…)
STALE_STEPS = 3  # a layer table older than this many steps is shown with its age


class Columns:
    """Every module's measurements as parallel lists indexed by slot (``Layer._s``): a layer table
    covering the tree in slot order (the usual case) replaces or folds whole lists in one pass instead
    of updating objects one attribute at a time. Lists are replaced, never shared with an event.

    Per-layer points (``history``, ``timed``) are not copied out per module: such a table is kept whole
    in ``ring`` (the newest ``LAYER_HISTORY``: every module has an entry in each, so an older one is
    never among any module's newest points), other tables' entries go to the module's own ``extra``
    deque, and a module's points are the two merged by table number when a view reads them."""

    __slots__ = ("step", "fwd_ms", "fwd_self_ms", "bwd_ms", "bwd_self_ms", "calls", "act_bytes", "fwd_ema",
                 "bwd_ema", "act_ema", "flops", "bytes", "peak_flops", "peak_bw", "step_flops", "step_bytes",
                 "step_flops_step", "step_flops_note", "ids", "layouts", "seq", "timed_from", "ring", "extra",
                 "hist", "hist_seq")

    def __init__(self) -> None:
        self.ids: list[int] = []  # module id of each slot
        for name in VALUE_COLUMNS:
            setattr(self, name, [])
        self.step_flops_note: list[str] = []
        # (ids, their slots, whether that is every slot in order) of recent tables' layouts
        self.layouts: list[tuple[list[int], list[int | None], bool]] = []
        self.seq = 0  # layer tables folded so far: numbers their entries
        self.timed_from = 0  # entries of tables numbered below are of an earlier step numbering
        self.ring: deque[Table] = deque(maxlen=LAYER_HISTORY)
        self.extra: list[deque[Entry] | None] = []
        self.hist: list[deque[tuple[int, float, float | None, int | None]] | None] = []  # read so far
        self.hist_seq: list[int] = []  # the table number ``hist`` is complete to

    def extend(self, ids: list[int]) -> int:
        """Fresh slots for modules ``ids`` (nothing measured yet); returns the first one."""
        first, k = len(self.ids), len(ids)
        self.ids.extend(ids)
        for name in VALUE_COLUMNS:  # new lists: ``ring`` may hold the old ones
            setattr(self, name, getattr(self, name) + [None] * k)
        self.step_flops_note.extend([""] * k)
        self.extra.extend([None] * k)
        self.hist.extend([None] * k)
        self.hist_seq.extend([0] * k)
        self.layouts = []
        return first

    def taken(self, slots: list[int]) -> Columns:
        """The columns of ``slots`` only, in that order (the tree changed: slots are packed again). The
        whole tables kept are spread into the modules' own entries first (their slots change)."""
        for s in slots:
            entries = list(self.newest_first(s, 0, LAYER_HISTORY))
            entries.reverse()
            self.extra[s] = deque(entries, maxlen=LAYER_HISTORY)
        out = Columns()
        out.ids = [self.ids[s] for s in slots]
        for name in (*VALUE_COLUMNS, "step_flops_note", "extra", "hist", "hist_seq"):
            col = getattr(self, name)
            setattr(out, name, [col[s] for s in slots])
        out.seq, out.timed_from = self.seq, self.timed_from
        return out

    def slots_of(self, ids: list[int], where: dict[int, Layer]) -> tuple[list[int | None], bool]:
        """Slots of a table's ids (None: a module of no tree), and whether they are exactly every slot
        in order; worked out once per layout (the agent sends the same ids step after step)."""
        for known in self.layouts:
            if known[0] == ids:
                return known[1], known[2]
        pos = [la._s if (la := where.get(mid)) is not None else None for mid in ids]
        every = pos == list(range(len(self.ids)))
        self.layouts = [(list(ids), pos, every), *self.layouts[:LAYOUTS_KEPT - 1]]
        return pos, every

    def newest_first(self, s: int, since: int, most: int) -> Iterator[Entry]:
        """Slot ``s``'s entries of tables numbered ``since`` or later, newest first, at most ``most``."""
        ring = reversed(self.ring)
        extra = self.extra[s]
        more = reversed(extra) if extra else iter(())
        r, x = next(ring, None), next(more, None)
        while most > 0:
            if r is not None and (x is None or r[0] > x[0]):
                seq, step, fwd, bwd, act, calls = r
                if seq < since:
                    return
                if s < len(fwd):  # a slot made after that table has no entry in it
                    yield (seq, step, fwd[s], bwd[s] if bwd is not None else None,
                           act[s] if act is not None else None, calls[s])
                    most -= 1
                r = next(ring, None)
            elif x is not None:
                if x[0] < since:
                    return
                yield x
                most -= 1
                x = next(more, None)
            else:
                return

    def history_of(self, s: int) -> deque[tuple[int, float, float | None, int | None]]:
        """Slot ``s``'s newest ``LAYER_HISTORY`` (step, fwd, bwd, act) points, oldest first; kept and
        brought up to date on each read, so a view reading every frame copies only what is new."""
        hist = self.hist[s]
        if hist is None:
            hist = self.hist[s] = deque(maxlen=LAYER_HISTORY)
        since = self.hist_seq[s] + 1
        if self.extra[s] is None:  # whole tables only (the usual case): one pass over the new ones
            new = []
            for table in reversed(self.ring):
                if table[0] < since:
                    break
                new.append(table)
            new.reverse()
            hist.extend([(step, fwd[s], bwd[s] if bwd is not None else None, act[s] if act is not None else None)
                         for _, step, fwd, bwd, act, _ in new if s < len(fwd)])
        else:
            entries = list(self.newest_first(s, since, LAYER_HISTORY))
            entries.reverse()
            hist.extend([(e[1], e[2], e[3], e[4]) for e in entries])
        self.hist_seq[s] = self.seq
        return hist

    def timed_of(self, s: int) -> list[tuple[int, float, int]]:
        """(step, fwd ms, calls) of slot ``s``'s newest ``TIMED_KEPT`` tables of this step numbering."""
        out = [(e[1], e[2], e[5]) for e in self.newest_first(s, self.timed_from, TIMED_KEPT)]
        out.reverse()
        return out

    def timed_at(self, s: int, step: int) -> tuple[int, float, int] | None:
        """(step, forward ms, calls) of timed step ``step``, if it is among ``timed_of(s)``."""
        if self.extra[s] is None:  # whole tables only: no merge
            most, since = TIMED_KEPT, self.timed_from
            for seq, at, fwd, _, _, calls in reversed(self.ring):
                if seq < since or at < step:
                    return None
                if s < len(fwd):
                    if at == step:
                        return (at, fwd[s], calls[s])
                    most -= 1
                    if not most:
                        return None
            return None
        for e in self.newest_first(s, self.timed_from, TIMED_KEPT):
            if e[1] == step:
                return (e[1], e[2], e[5])
            if e[1] < step:
                break
        return None


# (table number, step, fwd, bwd, act, calls): a layer table covering every slot, lists indexed by slot
Table = tuple[int, int, list[float], "list[float] | None", "list[int] | None", list[int]]
# (table number, step, fwd, bwd, act, calls): one module's entry of any other table
Entry = tuple[int, int, float, "float | None", "int | None", int]

# the latest table's values, replaced whole by a table of every slot (and then held by ``ring`` too)
LATEST_COLUMNS = ("step", "fwd_ms", "fwd_self_ms", "bwd_ms", "bwd_self_ms", "calls", "act_bytes")
# plain value columns (None until measured)
VALUE_COLUMNS = ("step", "fwd_ms", "fwd_self_ms", "bwd_ms", "bwd_self_ms", "calls", "act_bytes", "fwd_ema",
                 "bwd_ema", "act_ema", "flops", "bytes", "peak_flops", "peak_bw", "step_flops", "step_bytes",
                 "step_flops_step")


def _column(name: str, doc: str = "") -> property:
    get = attrgetter(name)
    return property(lambda self: get(self._c)[self._s], doc=doc or None)


class Layer:
    """One module of a model tree: its place in the tree here, its measurements read from the
    session's ``Columns`` at slot ``_s``."""

    __slots__ = ("id", "model", "path", "cls", "params", "parent", "depth", "dtype", "trainable", "compiled",
                 "children", "total_params", "_c", "_s")

    def __init__(self, id: int, model: int, path: str, cls: str, params: int, parent: int, dtype: str,
                 trainable: bool, compiled: bool, columns: Columns, slot: int) -> None:
        self.id = id
        self.model = model
        self.path = path
        self.cls = cls
        self.params = params  # owned directly
        self.parent = parent
        self.depth = 0
        self.dtype = dtype
        self.trainable = trainable
        self.compiled = compiled
        self.children: list[int] = []
        self.total_params = 0  # this module and everything under it
        self._c = columns
        self._s = slot

    def __repr__(self) -> str:
        return f"Layer(id={self.id}, path={self.path!r}, cls={self.cls!r})"

    # latest step with layer timing, and exponential means over steps
    step = _column("step")
    fwd_ms = _column("fwd_ms")
    fwd_self_ms = _column("fwd_self_ms")
    bwd_ms = _column("bwd_ms")
    bwd_self_ms = _column("bwd_self_ms")
    calls = _column("calls")
    act_bytes = _column("act_bytes")
    fwd_ema = _column("fwd_ema")
    bwd_ema = _column("bwd_ema")
    act_ema = _column("act_ema")

    @property
    def history(self) -> deque[tuple[int, float, float | None, int | None]]:
        """Per-layer (step, fwd, bwd, act) points kept for the detail screen, oldest first."""
        return self._c.history_of(self._s)

    # from LayerFlops: per forward call
    flops = _column("flops")
    bytes = _column("bytes")
    peak_flops = _column("peak_flops")
    peak_bw = _column("peak_bw")
    # from StepFlops: the forward FLOPs/bytes of exactly the calls one timed step ran
    step_flops = _column("step_flops")
    step_bytes = _column("step_bytes")
    step_flops_step = _column("step_flops_step", "the step those figures are for")
    step_flops_note = _column("step_flops_note", "why there is no figure for that step")

    @property
    def timed(self) -> list[tuple[int, float, int]]:
        """(step, fwd ms, calls) of recent timed steps, to join per-step FLOPs."""
        return self._c.timed_of(self._s)

    @property
    def name(self) -> str:
        """The last path component; the root is shown by its class."""
        return self.path.rsplit(".", 1)[-1] if self.path else self.cls

    @property
    def time_ms(self) -> float | None:
        """Recent forward + backward time (EMA), None if never measured."""
        c, s = self._c, self._s
        fwd = c.fwd_ema[s]
        if fwd is None:
            return None
        return fwd + (c.bwd_ema[s] or 0.0)

    def _timed_at(self, step: int | None) -> tuple[int, float, int] | None:
        """(step, forward ms, calls) of timed step ``step``, if it is recent enough to be kept."""
        if step is None:
            return None
        return self._c.timed_at(self._s, step)

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
        c, s = self._c, self._s
        note = c.step_flops_note[s]
        if note:
            return None, note
        step_flops = c.step_flops[s]
        if not step_flops:
            return None, ""
        step = c.step_flops_step[s]
        timed = self._timed_at(step)
        if timed is None or timed[1] <= 0:
            return None, f"no forward time for step {step}"
        value = step_flops / (timed[1] / 1000.0)
        peak = c.peak_flops[s]
        if peak and value > peak:
            return None, (f"{value / 1e9:.1f} GFLOP/s > device peak {peak / 1e9:.1f}: "
                          "count and time disagree")
        return value, ""

    @property
    def intensity(self) -> float | None:
        c, s = self._c, self._s
        flops, nbytes = c.flops[s], c.bytes[s]
        if flops is None or not nbytes:
            return None
        return flops / nbytes

    @property
    def bound(self) -> str | None:
        """compute / memory / overhead, from the roofline of one timed step's own FLOPs, bytes and
        forward time; None without peaks, or without that step's figures."""
        c, s = self._c, self._s
        timed = self._timed_at(c.step_flops_step[s])
        if timed is None or self.achieved_note:  # an impossible figure gets no verdict either
            return None
        return roofline_bound(c.step_flops[s], c.step_bytes[s], c.peak_flops[s], c.peak_bw[s], timed[1], 1)


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
        if old is not None and old == e:
            self.models[e.model] = e  # the same tree again: its index and measurements stay
            return
        layers = self.layers
        cols = self.columns
        if old is not None:
            gone = set(old.ids)
            for mid in old.ids:
                layers.pop(mid, None)
            self.roots = [r for r in self.roots if r not in gone]
            # pack the slots of the modules that stay, so tables keep their one-pass path
            cols = self.columns = cols.taken([la._s for la in layers.values()])
            for slot, la in enumerate(layers.values()):
                la._c, la._s = cols, slot
        self.models[e.model] = e
        n = len(e.ids)
        dtypes = e.dtypes if len(e.dtypes) == n else [""] * n
        trainable = e.trainable if len(e.trainable) == n else [True] * n
        compiled = e.compiled if len(e.compiled) == n else [False] * n
        first = cols.extend(e.ids)
        model, paths, classes, params, parents = e.model, e.paths, e.classes, e.params, e.parents
        for i, mid in enumerate(e.ids):
            layers[mid] = Layer(mid, model, paths[i], classes[i], params[i], parents[i], dtypes[i],
                                trainable[i], compiled[i], cols, first + i)
        for mid in e.ids:
            layer = layers[mid]
            parent = layers.get(layer.parent)
            if parent is None:
                self.roots.append(mid)
            else:
                parent.children.append(mid)
        for root in e.ids:
            if layers[root].parent not in layers:
                _fill_totals(layers, root)
        self.tree_version += 1

    def _layers(self, e: LayerStats) -> None:
        if self.layers_step is not None and e.step <= self.layers_step:
            self.numbering_restarts()  # steps count from 0 again (tui/session/flops.py)
        cols = self.columns
        n = len(e.ids)
        bwd = e.bwd_ms if len(e.bwd_ms) == n else None
        bwd_self = e.bwd_self_ms if len(e.bwd_self_ms) == n else None
        act = e.act_bytes if len(e.act_bytes) == n else None
        pos, every = cols.slots_of(e.ids, self.layers)
        cols.seq += 1
        if every and len(e.fwd_ms) == n and len(e.fwd_self_ms) == n and len(e.calls) == n:
            _fold_table(cols, e.step, e.fwd_ms, e.fwd_self_ms, e.calls, bwd, bwd_self, act)
        else:  # some modules only, or unknown ones: module by module
            step, seq = e.step, cols.seq
            for name in LATEST_COLUMNS:  # copies: ``ring`` may hold these very lists
                setattr(cols, name, list(getattr(cols, name)))
            for i, slot in enumerate(pos):
                if slot is None:
                    continue
                f = e.fwd_ms[i]
                b = bwd[i] if bwd is not None else None
                a = act[i] if act is not None else None
                cols.step[slot] = step
                cols.fwd_ms[slot] = f
                cols.fwd_self_ms[slot] = e.fwd_self_ms[i]
                cols.calls[slot] = e.calls[i]
                cols.bwd_ms[slot] = b
                cols.bwd_self_ms[slot] = bwd_self[i] if bwd_self is not None else None
                cols.act_bytes[slot] = a
                o = cols.fwd_ema[slot]
                cols.fwd_ema[slot] = f if o is None else o + EMA_ALPHA * (f - o)
                if b is not None:
                    o = cols.bwd_ema[slot]
                    cols.bwd_ema[slot] = b if o is None else o + EMA_ALPHA * (b - o)
                if a is not None:
                    o = cols.act_ema[slot]
                    cols.act_ema[slot] = a if o is None else o + EMA_ALPHA * (a - o)
                extra = cols.extra[slot]
                if extra is None:
                    extra = cols.extra[slot] = deque(maxlen=LAYER_HISTORY)
                extra.append((seq, step, f, b, a, e.calls[i]))
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


def _ema(old: list, new: list) -> list:
    """The exponential mean of every slot after one more value (``None``: not measured, keeps the mean)."""
    if None in new:
        return [o if x is None else (x if o is None else o + EMA_ALPHA * (x - o)) for o, x in zip(old, new, strict=True)]
    if None in old:
        return [x if o is None else o + EMA_ALPHA * (x - o) for o, x in zip(old, new, strict=True)]
    return [o + EMA_ALPHA * (x - o) for o, x in zip(old, new, strict=True)]  # every slot measured before


def _fold_table(cols: Columns, step: int, fwd: list, fwd_self: list, calls: list, bwd: list | None,
                bwd_self: list | None, act: list | None) -> None:
    """A layer table covering every slot in order, folded list by list (the same arithmetic, in the same
    order, as module by module). The lists it sets are kept in ``ring`` as they are: never written after."""
    n = len(fwd)
    cols.step = [step] * n
    cols.fwd_ms = list(fwd)
    cols.fwd_self_ms = list(fwd_self)
    cols.calls = list(calls)
    cols.bwd_ms = list(bwd) if bwd is not None else [None] * n
    cols.bwd_self_ms = list(bwd_self) if bwd_self is not None else [None] * n
    cols.act_bytes = list(act) if act is not None else [None] * n
    cols.fwd_ema = _ema(cols.fwd_ema, fwd)
    if bwd is not None:
        cols.bwd_ema = _ema(cols.bwd_ema, bwd)
    if act is not None:
        cols.act_ema = _ema(cols.act_ema, act)
    cols.ring.append((cols.seq, step, cols.fwd_ms, cols.bwd_ms if bwd is not None else None,
                      cols.act_bytes if act is not None else None, cols.calls))


def _fill_totals(layers: dict[int, Layer], root: int) -> None:
    """Subtree parameter counts and depths, iteratively (deep trees must not hit the recursion limit)."""
    order: list[Layer] = []
    stack = [(root, 0)]
    while stack:
        mid, depth = stack.pop()
        layer = layers[mid]
        layer.depth = depth
        order.append(layer)
        if layer.children:
            stack.extend((c, depth + 1) for c in layer.children)
    for layer in reversed(order):
        total = layer.params
        for c in layer.children:
            total += layers[c].total_params
        layer.total_params = total
