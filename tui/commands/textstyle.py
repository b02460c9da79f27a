"""Colour for the text commands, only where it helps and is wanted: on a terminal, unless
``NO_COLOR`` is set (https://no-color.org) or the terminal is ``dumb``. Piped output stays plain."""

from __future__ import annotations

import os
from typing import TextIO

BOLD, RED, YELLOW, DIM = "1", "31", "33", "2"


def wanted(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def paint(text: str, *sgr: str, on: bool = True) -> str:
    """``text`` in the given SGR styles, or unchanged when colour is off."""
    return f"\x1b[{';'.join(sgr)}m{text}\x1b[0m" if on and sgr else text
