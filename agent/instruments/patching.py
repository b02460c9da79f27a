"""Replacing functions on classes and modules, and putting them back.

One marker for every patched function: ``__llmtop_wrapped__`` holds the function it replaced, so any
instrument (or a test) can tell one of ours from the user's and reach the original.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MARK = "__llmtop_wrapped__"
INHERITED = object()  # marks a patched attribute that the class inherited rather than defined


def mark(wrapper: Any, orig: Any) -> Any:
    """Tag ``wrapper`` as ours, wrapping ``orig``; returns ``wrapper``."""
    try:
        setattr(wrapper, MARK, orig)
    except (AttributeError, TypeError):
        pass  # a builtin or slotted object: it stays unmarked
    return wrapper


def wrapped(fn: Any) -> Any:
    """The function ``fn`` replaced, or None when ``fn`` is not one of ours."""
    return getattr(fn, MARK, None)


class Patches:
    """The replacements one instrument made, undone in reverse order."""

    def __init__(self) -> None:
        self._done: list[tuple[Any, str, Any, Any]] = []

    def __len__(self) -> int:
        return len(self._done)

    def patch(self, owner: Any, attr: str, wrapper_factory: Callable[[Any], Any]) -> Any:
        """Replace ``owner.attr`` with ``wrapper_factory(original)``; returns the wrapper."""
        own = attr in owner.__dict__
        orig = owner.__dict__[attr] if own else getattr(owner, attr)
        new = mark(wrapper_factory(orig), orig)
        setattr(owner, attr, new)
        # an inherited attribute (Tensor.to lives on TensorBase) is restored by deleting ours
        self._done.append((owner, attr, orig if own else INHERITED, new))
        return new

    def patch_same(self, mod_a: Any, mod_b: Any, attr: str, wrapper_factory: Callable[[Any], Any]) -> None:
        """Patch a function exported by two modules (``torch.nn.utils`` and its submodule) once."""
        orig = getattr(mod_b, attr)
        new = mark(wrapper_factory(orig), orig)
        for mod in (mod_a, mod_b):
            if getattr(mod, attr, None) is orig:
                setattr(mod, attr, new)
                self._done.append((mod, attr, orig, new))

    def undo(self) -> None:
        """Put the originals back. A replacement someone wrapped since is left in the chain (ours
        must then pass straight through: the caller turns itself off). Never raises."""
        for owner, attr, orig, new in reversed(self._done):
            try:
                if owner.__dict__.get(attr) is not new:
                    continue
                if orig is INHERITED:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, orig)
            except Exception:
                pass
        self._done.clear()
