"""Pure formulas that the agent and the viewer both apply, kept here so that each exists once
(the agent never imports the viewer, nor the viewer the agent; both import the protocol)."""

from __future__ import annotations

import math
from collections.abc import Iterable

# A layer this many times slower than both roofline limits is bound by neither: launch overhead,
# Python, synchronisation.
OVERHEAD_FACTOR = 10.0


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of unsorted values; None for no values."""
    data = sorted(values)
    if not data:
        return None
    rank = max(0, min(len(data) - 1, math.ceil(q / 100.0 * len(data)) - 1))
    return data[rank]


def bound(flops: float, nbytes: float, seconds: float | None, peak_flops: float, peak_bw: float) -> str:
    """"compute", "memory" or "overhead" for work of ``flops`` and ``nbytes`` that took ``seconds``.

    Without a measured time (None or 0) the verdict is the static one: which roof is lower.
    """
    t_compute = flops / peak_flops if peak_flops > 0 else 0.0
    t_memory = nbytes / peak_bw if peak_bw > 0 else 0.0
    roof = max(t_compute, t_memory)
    if seconds and seconds > 0 and (roof <= 0 or seconds > OVERHEAD_FACTOR * roof):
        return "overhead"
    return "compute" if t_compute >= t_memory and t_compute > 0 else "memory"
