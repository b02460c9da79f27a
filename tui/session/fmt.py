"""Number formatting shared by the views and the diagnoses. Absent values print as DASH, never 0."""

from __future__ import annotations

DASH = "—"


def ms(value: float | None, digits: int = 1) -> str:
    if value is None:
        return DASH
    if value >= 10_000:
        return f"{value / 1000:.1f}s"
    if value >= 100:
        return f"{value:.0f}"
    if value < 0.1 and value > 0:
        return f"{value:.3f}"
    return f"{value:.{digits}f}"


def nbytes(value: float | None) -> str:
    if value is None:
        return DASH
    v = float(value)
    sign = "-" if v < 0 else ""
    v = abs(v)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{sign}{v:.0f} {unit}" if unit == "B" else f"{sign}{v:.1f} {unit}"
        v /= 1024
    return DASH  # unreachable


def count(value: float | None) -> str:
    """Compact counts: 124.4M, 3.2k."""
    if value is None:
        return DASH
    v = float(value)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.1f}{suffix}"
    return f"{v:.0f}" if v == int(v) else f"{v:.1f}"


def flops(value: float | None) -> str:
    return DASH if value is None else count(value)


def rate(value: float | None, unit: str = "/s") -> str:
    if value is None:
        return DASH
    return f"{count(value) if value >= 1000 else f'{value:.1f}'}{unit}"


def pct(value: float | None, digits: int = 1) -> str:
    """``value`` is a fraction (0..1)."""
    return DASH if value is None else f"{value * 100:.{digits}f}%"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    s = max(0, int(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def value(v: float | None) -> str:
    """A loss, a learning rate: short but faithful."""
    if v is None:
        return DASH
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return count(v)
    if abs(v) < 0.001:
        return f"{v:.2e}"
    return f"{v:.4g}"
