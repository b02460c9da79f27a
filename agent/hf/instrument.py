"""Hugging Face transformers, understood without code changes: the coordinating instrument.

``TransformersInstrument`` activates only when the script itself imports transformers: it patches
each transformers module the moment that module finishes importing (a post-import hook on
``sys.meta_path``; modules already imported are patched at install). It never imports transformers
itself, so a plain torch script pays nothing.

One module per integration does the patching (every wrapper passes the call's arguments, result
and exception through unchanged; an error in the integration's own code disables that part and is
reported with ``ctx.warn``; see wrapping.py):

- loading.py: ``from_pretrained`` of models, tokenizers and configs (``model_loading`` spans).
- tokenizers.py: tokenizer ``__call__``/``encode`` (``text_preprocessing`` spans).
- pipelines.py: ``Pipeline.__call__`` with preprocess/forward/postprocess children.
- generate.py: ``GenerationMixin.generate`` (``Generation`` events, prefill/decode spans).
- trainer.py: ``LlmtopCallback`` added to every ``Trainer`` (``trainer/*`` metrics).
- precision.py: autocast state and model dtypes at root forward start (``core.BUS``).

This module watches imports, routes each watched module to its integration, and installs, polls
and uninstalls them together.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from llmtop.agent.hf.generate import Generate, generation_phase
from llmtop.agent.hf.loading import Loading
from llmtop.agent.hf.pipelines import Pipelines
from llmtop.agent.hf.precision import Precision
from llmtop.agent.hf.tokenizers import Tokenizers
from llmtop.agent.hf.trainer import Trainer
from llmtop.agent.hf.wrapping import Patcher
from llmtop.agent.runtime import core

__all__ = ["WATCHED", "TransformersInstrument", "current", "generation_phase"]

# transformers module → (integration, its method that patches the module once it has been imported).
WATCHED: dict[str, tuple[str, str]] = {
    "transformers.configuration_utils": ("loading", "patch_configs"),
    "transformers.modeling_utils": ("loading", "patch_models"),
    "transformers.tokenization_utils_base": ("tokenizers", "patch"),
    # The Auto classes resolve the config before loading: one span covers it all (the concrete
    # class's own from_pretrained inside is the same part, so it is not counted twice).
    "transformers.models.auto.configuration_auto": ("loading", "patch_auto_config"),
    "transformers.models.auto.auto_factory": ("loading", "patch_auto_models"),
    "transformers.models.auto.modeling_auto": ("loading", "patch_auto_model_classes"),
    "transformers.models.auto.tokenization_auto": ("loading", "patch_auto_tokenizer"),
    "transformers.generation.utils": ("generate", "patch"),
    "transformers.pipelines.base": ("pipelines", "patch"),
    "transformers.trainer": ("trainer", "patch"),
}

_CURRENT: TransformersInstrument | None = None  # the installed instrument (for LlmtopCallback)


def current() -> TransformersInstrument | None:
    """The installed instrument, if any."""
    return _CURRENT


def _on_fork_child() -> None:
    # A forked child (DataLoader worker) has no live agent: stop measuring there.
    if _CURRENT is not None:
        _CURRENT.patcher.off_all = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_on_fork_child)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs a callback right after a watched module executes (the wrapt post-import-hook pattern)."""

    def __init__(self, names: set[str], callback: Callable[[Any], None]) -> None:
        self.names = names
        self.callback = callback

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ChainedLoader(spec.loader, self.callback)
        return spec


class _ChainedLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, callback: Callable[[Any], None]) -> None:
        self.loader = loader
        self.callback = callback

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # Give the module its real loader back (inspect, pkgutil and reloads look at it).
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.callback(module)


class TransformersInstrument:
    """Zero-code insight into transformers' loading, tokenizing, pipelines, generation and Trainer."""

    name = "transformers"

    def __init__(self, options: core.Options | None = None) -> None:
        self.options = options or core.Options()
        self.ctx: Any = None
        self.active = False  # True once a transformers module was patched
        self.patcher = Patcher()
        self.loading = Loading(self.patcher)
        self.tokenizers = Tokenizers(self.patcher, self.loading)
        self.pipelines = Pipelines(self.patcher)
        self.generate = Generate(self.patcher)
        self.trainer = Trainer(self.patcher)
        self.precision = Precision(self.patcher)
        self._done: set[str] = set()  # watched modules already patched
        self._lock = threading.Lock()  # patching only (imports and poll), never the hot path
        self._finder: _PostImportFinder | None = None

    # -- contract ----------------------------------------------------------------------------

    def install(self, ctx: core.Context) -> None:
        global _CURRENT
        self.ctx = self.patcher.ctx = ctx
        _CURRENT = self
        self._finder = _PostImportFinder(set(WATCHED), self._on_import)
        sys.meta_path.insert(0, self._finder)
        self._scan()

    def poll(self, now: float) -> list[Any]:
        if self.patcher.off_all:
            return []
        self._scan()  # covers modules imported by a route the finder did not see
        return self.tokenizers.poll() + self.pipelines.poll() + self.precision.poll()

    def uninstall(self) -> None:
        global _CURRENT
        self.patcher.off_all = True
        if self._finder is not None:
            try:
                sys.meta_path.remove(self._finder)
            except ValueError:
                pass
            self._finder = None
        self.patcher.restore()
        self.generate.uninstall()
        self.precision.uninstall()
        if _CURRENT is self:
            _CURRENT = None

    # -- activation ----------------------------------------------------------------------------

    def _scan(self) -> None:
        if len(self._done) == len(WATCHED):
            return
        for name in WATCHED:
            module = sys.modules.get(name)
            if name in self._done or module is None or not hasattr(module, "__dict__"):
                continue
            # A module is in sys.modules while it still executes (on another thread, or higher up
            # this thread's stack): patch it only once it is complete; the finder's callback will.
            if getattr(getattr(module, "__spec__", None), "_initializing", False):
                continue
            self._on_import(module)

    def _on_import(self, module: Any) -> None:
        name = getattr(module, "__name__", "")
        with self._lock:  # the import callback (user thread) and poll's scan (agent thread)
            if name in self._done or name not in WATCHED or self.patcher.off_all:
                return
            self._done.add(name)
            try:
                integration, method = WATCHED[name]
                getattr(getattr(self, integration), method)(module)
                if not self.active:
                    self.active = True
                    self.generate.activate()
                    self.precision.activate()
            except Exception as exc:  # a transformers version we do not understand: fail open
                self.patcher.warn(name.removeprefix("transformers."), exc)
        if len(self._done) == len(WATCHED) and self._finder is not None:
            try:
                sys.meta_path.remove(self._finder)
            except ValueError:
                pass


def __getattr__(name: str) -> Any:
    if name == "LlmtopCallback":
        from llmtop.agent.hf.trainer import _callback_class

        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
