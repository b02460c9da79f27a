"""Hugging Face transformers, understood without code changes.

``TransformersInstrument`` activates only when the script itself imports transformers: it patches
each transformers module the moment that module finishes importing (a post-import hook on
``sys.meta_path``; modules already imported are patched at install). It never imports transformers
itself, so a plain torch script pays nothing.

What it wraps (every wrapper passes the call's arguments, result and exception through unchanged;
an error in the instrument's own code disables that part and is reported with ``ctx.warn``):

- ``from_pretrained`` of models, tokenizers and configs: a ``model_loading`` span with parameter
  count, dtype, device map and memory added.
- tokenizer ``__call__``/``encode``: ``text_preprocessing`` spans with texts, tokens, padding share,
  tokens/s and truncations (the first few per tick one by one, the rest summed into one span).
- ``Pipeline.__call__``: one span per call with preprocess/forward/postprocess children.
- ``GenerationMixin.generate``: a ``Generation`` event (prefill = time to first token, one decode
  latency per later forward, KV-cache bytes) and ``generate``/``prefill``/``decode`` spans.
- ``Trainer``: ``LlmtopCallback`` is added to every Trainer; it turns Trainer's logs into
  ``trainer/*`` metrics and marks evaluation with an ``evaluate`` span.
- autocast state and each model's dtype, sampled at root forward start (``core.BUS``).

``LlmtopCallback`` is built on first access so that importing this module never imports
transformers.
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from llmtop.agent.runtime import api, core
from llmtop.protocol.events import Generation, Metric, Span
from llmtop.protocol.formulas import percentile

# transformers module → the instrument method that patches it once it has been imported.
WATCHED: dict[str, str] = {
    "transformers.configuration_utils": "_patch_configs",
    "transformers.modeling_utils": "_patch_models",
    "transformers.tokenization_utils_base": "_patch_tokenizers",
    # The Auto classes resolve the config before loading: one span covers it all (the concrete
    # class's own from_pretrained inside is the same part, so it is not counted twice).
    "transformers.models.auto.configuration_auto": "_patch_auto_config",
    "transformers.models.auto.auto_factory": "_patch_auto_models",
    "transformers.models.auto.modeling_auto": "_patch_auto_model_classes",
    "transformers.models.auto.tokenization_auto": "_patch_auto_tokenizer",
    "transformers.generation.utils": "_patch_generation",
    "transformers.pipelines.base": "_patch_pipelines",
    "transformers.trainer": "_patch_trainer",
}

SPANS_PER_TICK = 32  # tokenizer calls sent one by one per tick; the rest are summed into one span

class _PerThread(threading.local):
    """Busy parts, generate stack, pipeline stack of one thread. The attributes exist from the
    start: a missing one costs ``getattr`` an exception, and the step tracker asks for ``gen`` on
    every root forward."""

    def __init__(self) -> None:
        self.busy: dict | None = None
        self.gen: list | None = None
        self.pipe: list | None = None


_tl = _PerThread()
_CURRENT: TransformersInstrument | None = None  # the installed instrument (for LlmtopCallback)


def _on_fork_child() -> None:
    # A forked child (DataLoader worker) has no live agent: stop measuring there.
    if _CURRENT is not None:
        _CURRENT._off_all = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_on_fork_child)


# --- small pure helpers --------------------------------------------------------------------------


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "element_size") and hasattr(x, "numel")


def cache_nbytes(cache: Any) -> int | None:
    """Bytes held by a KV cache: a transformers ``Cache`` (any layout) or legacy nested tuples.

    Reads tensor metadata only (numel × element size): no copy, no device synchronisation.
    """
    if cache is None:
        return None
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> int:
        if obj is None or depth > 4 or id(obj) in seen:
            return 0
        seen.add(id(obj))
        if _is_tensor(obj):
            return int(obj.numel()) * int(obj.element_size())
        if isinstance(obj, (list, tuple)):
            return sum(walk(x, depth + 1) for x in obj)
        if isinstance(obj, dict):
            return sum(walk(x, depth + 1) for x in obj.values())
        name = type(obj).__name__
        if ("Cache" in name or "Layer" in name) and hasattr(obj, "__dict__"):
            return sum(walk(x, depth + 1) for x in vars(obj).values())
        return 0

    total = walk(cache, 0)
    return total if total or isinstance(cache, (list, tuple)) or hasattr(cache, "__dict__") else None


def token_counts(ids: Any, mask: Any) -> tuple[int, int, int | None]:
    """(sequences, token positions, pad positions) of a tokenizer's ``input_ids``/``attention_mask``.

    Works on lists, nested lists, torch tensors and numpy arrays; pads are None without a mask.
    """
    if _is_tensor(ids) or hasattr(ids, "ndim"):
        ndim = ids.dim() if hasattr(ids, "dim") else ids.ndim
        rows = int(ids.shape[0]) if ndim >= 2 else 1
        total = int(ids.numel()) if hasattr(ids, "numel") and callable(ids.numel) else int(ids.size)
        pads = None if mask is None else total - int(mask.sum())
        return rows, total, pads
    if isinstance(ids, (list, tuple)):
        if ids and isinstance(ids[0], (list, tuple)):
            total = sum(map(len, ids))
            pads = None if mask is None else total - sum(map(sum, mask))
            return len(ids), total, pads
        pads = None if mask is None else len(ids) - sum(mask)
        return 1, len(ids), pads
    return 0, 0, None


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else ""


def _device_map_summary(model: Any) -> str:
    dmap = getattr(model, "hf_device_map", None)
    if isinstance(dmap, dict) and dmap:
        counts: dict[str, int] = {}
        for dev in dmap.values():
            counts[str(dev)] = counts.get(str(dev), 0) + 1
        return ", ".join(f"{d}:{n}" for d, n in sorted(counts.items()))
    try:
        return str(model.device)
    except Exception:
        return ""


def _config_dtype(config: Any) -> str:
    # ``config.torch_dtype`` warns in transformers 5; read the stored attribute without the property.
    d = getattr(config, "__dict__", {})
    value = d.get("dtype", d.get("torch_dtype"))
    return _dtype_name(value) if value is not None else ""


_PROC: Any = None


def _rss() -> int | None:
    global _PROC
    try:
        if _PROC is None:
            import psutil

            _PROC = psutil.Process()
        return int(_PROC.memory_info().rss)
    except Exception:
        return None


def _cuda_allocated() -> int | None:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return int(torch.cuda.memory_allocated())  # a counter read: no synchronisation
    except Exception:
        pass
    return None


def _delta(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


# --- per-thread state -----------------------------------------------------------------------------


def _busy() -> dict[str, int]:
    b = getattr(_tl, "busy", None)
    if b is None:
        b = _tl.busy = {}
    return b


def _enter_depth() -> int:
    """Share span nesting depth with ``llmtop.agent.span`` so user and integration spans nest."""
    d = getattr(api._depth, "n", 0)
    api._depth.n = d + 1
    return d


def _exit_depth() -> None:
    api._depth.n = max(0, getattr(api._depth, "n", 1) - 1)


class _GenState:
    __slots__ = ("model", "t0", "starts", "ends", "cache", "prefill_cache")

    def __init__(self, model: Any, t0: int) -> None:
        self.model = model
        self.t0 = t0
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.cache: Any = None
        self.prefill_cache: int | None = None


def generation_phase() -> str | None:
    """``"prefill"`` or ``"decode"`` while a ``generate`` call runs on this thread, else None.

    For other instruments (the step tracker, the layers table) that want to tell decode steps apart.
    """
    stack = getattr(_tl, "gen", None)
    if not stack:
        return None
    return "decode" if stack[-1].ends else "prefill"


class _PipeAcc:
    """Summed phase times of one pipeline call (or of a lazily consumed pipeline over one tick)."""

    __slots__ = ("pipe", "wall0", "t0", "phases", "items")

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.wall0 = time.time()
        self.t0 = time.perf_counter_ns()
        # phase → [calls, total ns, wall-clock start of the first call]
        self.phases: dict[str, list[Any]] = {}
        self.items = 0

    def add(self, phase: str, wall0: float, dur_ns: int) -> None:
        acc = self.phases.get(phase)
        if acc is None:
            self.phases[phase] = [1, dur_ns, wall0]
        else:
            acc[0] += 1
            acc[1] += dur_ns
        if phase == "postprocess":
            self.items += 1


PHASE_CATEGORY = {"preprocess": "text_preprocessing", "forward": "model_inference",
                  "postprocess": "model_inference"}


# --- the instrument ----------------------------------------------------------------------------


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
        self._off_all = False
        self._off: set[str] = set()  # parts disabled after an error
        self._patched: list[tuple[Any, str, Any, Any]] = []  # (owner, attr, original, wrapper)
        self._done: set[str] = set()  # watched modules already patched
        self._lock = threading.Lock()  # patching only (imports and poll), never the hot path
        self._finder: _PostImportFinder | None = None
        # model → [generate calls running, hook handles…] (generation timing, only during generate)
        self._hooked: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
        self._gen_hooks: tuple[Callable[..., None], Callable[..., None]] | None = None
        self._pipe_classes: set[type] = set()
        self._tok_agg: list[Any] | None = None
        self._tok_spans = 0
        self._pipe_stream: dict[int, _PipeAcc] = {}
        self._pending: list[Any] = []  # events made on the hot path, sent at the next poll
        self._amp_last: Any = None
        self._models_seen: weakref.WeakSet[Any] = weakref.WeakSet()
        self._bus_fn: Any = None
        self._is_compiling: Callable[[], bool] = lambda: False

    # -- contract ----------------------------------------------------------------------------

    def install(self, ctx: core.Context) -> None:
        global _CURRENT
        self.ctx = ctx
        _CURRENT = self
        self._finder = _PostImportFinder(set(WATCHED), self._on_import)
        sys.meta_path.insert(0, self._finder)
        self._scan()

    def poll(self, now: float) -> list[Any]:
        if self._off_all:
            return []
        self._scan()  # covers modules imported by a route the finder did not see
        events: list[Any] = []
        self._tok_spans = 0
        agg, self._tok_agg = self._tok_agg, None
        if agg is not None:
            events.append(self._tokenize_span(agg))
        if self._pipe_stream:
            stream, self._pipe_stream = self._pipe_stream, {}
            for acc in stream.values():
                events.extend(self._pipeline_spans(acc, 0, streamed=True))
        if self._pending:
            pending, self._pending = self._pending, []
            events.extend(pending)
        return events

    def uninstall(self) -> None:
        global _CURRENT
        self._off_all = True
        if self._finder is not None:
            try:
                sys.meta_path.remove(self._finder)
            except ValueError:
                pass
            self._finder = None
        for owner, attr, original, wrapper in reversed(self._patched):
            # Leave a later patch by someone else in place; ours passes through once off.
            if owner.__dict__.get(attr) is wrapper:
                setattr(owner, attr, original)
        self._patched.clear()
        for entry in list(self._hooked.values()):
            for h in entry[1:]:
                h.remove()
        self._hooked = weakref.WeakKeyDictionary()
        if self._bus_fn is not None:
            try:
                core.BUS.root_forward_start.remove(self._bus_fn)
            except ValueError:
                pass
            self._bus_fn = None
            core.BUS.generation_phase = core.no_generation
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
            if name in self._done or name not in WATCHED or self._off_all:
                return
            self._done.add(name)
            try:
                getattr(self, WATCHED[name])(module)
                if not self.active:
                    self.active = True
                    self._activate_common()
            except Exception as exc:  # a transformers version we do not understand: fail open
                self._warn(name.removeprefix("transformers."), exc)
        if len(self._done) == len(WATCHED) and self._finder is not None:
            try:
                sys.meta_path.remove(self._finder)
            except ValueError:
                pass

    def _activate_common(self) -> None:
        torch = sys.modules.get("torch")  # transformers' modeling code imported it already
        compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
        if compiling is not None:
            self._is_compiling = compiling
        self._bus_fn = self._on_root_forward_start
        core.BUS.root_forward_start.append(self._bus_fn)
        core.BUS.generation_phase = generation_phase

    def _warn(self, part: str, exc: BaseException) -> None:
        try:
            self.ctx.warn(f"transformers.{part}", f"{type(exc).__name__}: {exc}")
        except Exception:
            pass

    def _fail(self, part: str, exc: BaseException) -> None:
        self._off.add(part)
        self._warn(part, exc)

    def _step(self) -> int | None:
        return getattr(self.ctx, "current_step", None)

    def _emit(self, event: Any) -> None:
        self.ctx.emit(event)

    def _span(self, name: str, category: str, wall0: float, dur_ns: int, depth: int,
              attrs: dict[str, Any]) -> Span:
        return Span(name=name, category=category, start=wall0, dur_ms=dur_ns / 1e6, depth=depth,
                    step=self._step(), attrs=attrs)

    # -- patching helpers -------------------------------------------------------------------

    def _replace(self, owner: Any, attr: str, wrapper: Any) -> None:
        original = owner.__dict__[attr]
        setattr(owner, attr, wrapper)
        self._patched.append((owner, attr, original, wrapper))

    def _wrap(self, part: str, fn: Callable[..., Any],
              before: Callable[[tuple, dict], Any],
              after: Callable[[Any, Any, BaseException | None, float, int, int], None],
              reentrant: bool = False) -> Callable[..., Any]:
        """A guarded wrapper: ``before(args, kwargs)`` → state (None: skip this call), then the call,
        then ``after(state, result, error, wall0, dur_ns, depth)``. Our errors disable ``part``."""
        instr = self

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if instr._off_all or part in instr._off:
                return fn(*args, **kwargs)
            busy = _busy()
            if not reentrant and busy.get(part):
                return fn(*args, **kwargs)
            try:
                state = before(args, kwargs)
            except Exception as exc:
                instr._fail(part, exc)
                return fn(*args, **kwargs)
            if state is None:
                return fn(*args, **kwargs)
            busy[part] = busy.get(part, 0) + 1
            depth = _enter_depth()
            wall0 = time.time()
            t0 = time.perf_counter_ns()
            try:
                result = fn(*args, **kwargs)
            except BaseException as err:
                dur = time.perf_counter_ns() - t0
                _exit_depth()
                busy[part] -= 1
                try:
                    after(state, None, err, wall0, dur, depth)
                except Exception as exc:
                    instr._fail(part, exc)
                raise
            dur = time.perf_counter_ns() - t0
            _exit_depth()
            busy[part] -= 1
            try:
                after(state, result, None, wall0, dur, depth)
            except Exception as exc:
                instr._fail(part, exc)
            return result

        wrapper.__llmtop_wrapped__ = fn  # type: ignore[attr-defined]
        wrapper.__llmtop_owner__ = self  # type: ignore[attr-defined]
        return wrapper

    def _wrap_classmethod(self, owner: Any, attr: str, part: str, before: Any, after: Any) -> None:
        raw = owner.__dict__.get(attr)
        if not isinstance(raw, classmethod):
            return
        self._replace(owner, attr, classmethod(self._wrap(part, raw.__func__, before, after)))

    def _wrap_method(self, owner: Any, attr: str, part: str, before: Any, after: Any,
                     reentrant: bool = False) -> None:
        raw = owner.__dict__.get(attr)
        if raw is None or not callable(raw):
            return
        self._replace(owner, attr, self._wrap(part, raw, before, after, reentrant))

    # -- loading -------------------------------------------------------------------------------

    def _patch_configs(self, module: Any) -> None:
        cls = getattr(module, "PreTrainedConfig", None) or getattr(module, "PretrainedConfig", None)
        if cls is not None:
            self._wrap_loading(cls, "config")

    def _patch_models(self, module: Any) -> None:
        self._wrap_loading(module.PreTrainedModel, "model")

    def _patch_auto_config(self, module: Any) -> None:
        self._wrap_loading(module.AutoConfig, "config")

    def _patch_auto_models(self, module: Any) -> None:
        self._wrap_loading(module._BaseAutoModelClass, "model")

    def _patch_auto_model_classes(self, module: Any) -> None:
        # Each AutoModelFor* class holds its own copy of the base from_pretrained (transformers'
        # ``copy_func``), made when this module ran: wrap the copies that predate our patch.
        base = module._BaseAutoModelClass
        for klass in list(vars(module).values()):
            if isinstance(klass, type) and issubclass(klass, base) and klass is not base:
                raw = klass.__dict__.get("from_pretrained")
                # A copy of our own wrapper (this module ran after our patch) needs no second one;
                # a copy made under an earlier, stopped agent does.
                if isinstance(raw, classmethod) and getattr(raw.__func__, "__llmtop_owner__", None) is not self:
                    self._wrap_loading(klass, "model")

    def _patch_auto_tokenizer(self, module: Any) -> None:
        self._wrap_loading(module.AutoTokenizer, "tokenizer")

    def _wrap_loading(self, cls: Any, what: str) -> None:
        def before(args: tuple, kwargs: dict) -> Any:
            name = args[1] if len(args) > 1 else kwargs.get("pretrained_model_name_or_path")
            requested = kwargs.get("dtype", kwargs.get("torch_dtype"))
            return (args[0], name, requested, _rss(), _cuda_allocated())

        def after(state: Any, result: Any, err: Any, wall0: float, dur: int, depth: int) -> None:
            klass, name, requested, rss0, cuda0 = state
            loaded = result[0] if isinstance(result, tuple) else result  # output_loading_info=True
            called = getattr(klass, "__name__", str(klass))
            attrs: dict[str, Any] = {"what": what, "name": str(name), "load_ms": dur / 1e6,
                                     "class": type(loaded).__name__ if loaded is not None else called}
            if err is not None:
                attrs["error"] = type(err).__name__
            if requested is not None:
                attrs["requested_dtype"] = _dtype_name(requested)
            if what == "model" and loaded is not None:
                model = loaded
                attrs["params"] = sum(p.numel() for p in model.parameters())
                attrs["dtype"] = _dtype_name(getattr(model, "dtype", None))
                attrs["config_dtype"] = _config_dtype(getattr(model, "config", None))
                attrs["device_map"] = _device_map_summary(model)
            elif what == "config" and loaded is not None:
                config = loaded
                attrs["model_type"] = str(getattr(config, "model_type", ""))
                attrs["config_dtype"] = _config_dtype(config)
            elif what == "tokenizer" and loaded is not None:
                attrs["vocab"] = len(loaded) if hasattr(loaded, "__len__") else None
                attrs["fast"] = bool(getattr(loaded, "is_fast", False))
            rss_added = _delta(_rss(), rss0)
            if rss_added is not None:
                attrs["rss_added"] = rss_added
            cuda_added = _delta(_cuda_allocated(), cuda0)
            if cuda_added is not None:
                attrs["cuda_added"] = cuda_added
            label = f"{called}.from_pretrained"
            self._emit(self._span(label, "model_loading", wall0, dur, depth, attrs))

        self._wrap_classmethod(cls, "from_pretrained", f"load_{what}", before, after)

    # -- tokenization ---------------------------------------------------------------------------

    def _patch_tokenizers(self, module: Any) -> None:
        cls = module.PreTrainedTokenizerBase
        self._wrap_loading(cls, "tokenizer")

        def before(args: tuple, kwargs: dict) -> Any:
            trunc = kwargs.get("truncation")
            return trunc is not None and trunc is not False and str(trunc) != "do_not_truncate"

        def after(truncating: bool, result: Any, err: Any, wall0: float, dur: int, depth: int) -> None:
            if err is not None or result is None:
                return
            if isinstance(result, (list, tuple)) or _is_tensor(result):
                ids, mask, encs = result, None, None  # encode(): ids only
            else:
                ids = result.get("input_ids") if hasattr(result, "get") else None
                if ids is None:
                    return
                mask = result.get("attention_mask")
                encs = getattr(result, "_encodings", None)
            texts, tokens, pads = token_counts(ids, mask)
            truncated = None
            if truncating:
                if encs:
                    truncated = sum(1 for e in encs if e.overflowing)
                elif hasattr(result, "get") and result.get("num_truncated_tokens") is not None:
                    nt = result["num_truncated_tokens"]
                    truncated = sum(1 for n in (nt if isinstance(nt, list) else [nt]) if n > 0)
            self._record_tokenize(wall0, dur, depth, texts, tokens, pads, truncated)

        for attr in ("__call__", "encode", "encode_plus", "batch_encode_plus"):
            self._wrap_method(cls, attr, "tokenize", before, after)

    def _record_tokenize(self, wall0: float, dur: int, depth: int, texts: int, tokens: int,
                         pads: int | None, truncated: int | None) -> None:
        if self._tok_spans < SPANS_PER_TICK:
            self._tok_spans += 1
            attrs = self._tokenize_attrs(1, texts, tokens, pads, truncated, dur)
            self._emit(self._span("tokenize", "text_preprocessing", wall0, dur, depth, attrs))
            return
        agg = self._tok_agg
        if agg is None:
            self._tok_agg = [1, texts, tokens, pads, truncated, dur, wall0]
            return
        agg[0] += 1
        agg[1] += texts
        agg[2] += tokens
        agg[3] = None if agg[3] is None or pads is None else agg[3] + pads
        agg[4] = None if agg[4] is None or truncated is None else agg[4] + truncated
        agg[5] += dur

    @staticmethod
    def _tokenize_attrs(calls: int, texts: int, tokens: int, pads: int | None,
                        truncated: int | None, dur: int) -> dict[str, Any]:
        attrs: dict[str, Any] = {"calls": calls, "texts": texts, "tokens": tokens}
        if pads is not None:
            attrs["pad_tokens"] = pads
            attrs["padding_share"] = pads / tokens if tokens else 0.0
        if truncated is not None:
            attrs["truncated"] = truncated
        if dur > 0:
            attrs["tokens_per_s"] = tokens / (dur / 1e9)
        return attrs

    def _tokenize_span(self, agg: list[Any]) -> Span:
        calls, texts, tokens, pads, truncated, dur, wall0 = agg
        attrs = self._tokenize_attrs(calls, texts, tokens, pads, truncated, dur)
        attrs["summed"] = True  # many calls in one tick: dur_ms is their total time
        return self._span("tokenize", "text_preprocessing", wall0, dur, 0, attrs)

    # -- pipelines -----------------------------------------------------------------------------

    def _patch_pipelines(self, module: Any) -> None:
        cls = module.Pipeline

        def before_call(args: tuple, kwargs: dict) -> Any:
            pipe = args[0]
            self._patch_pipeline_class(type(pipe), cls)
            acc = _PipeAcc(pipe)
            stack = getattr(_tl, "pipe", None)
            if stack is None:
                stack = _tl.pipe = []
            stack.append(acc)
            inputs = args[1] if len(args) > 1 else kwargs.get("inputs", kwargs.get("text_inputs"))
            batch = kwargs.get("batch_size") or getattr(pipe, "_batch_size", None) or 1
            return acc, inputs, batch

        def after_call(state: Any, result: Any, err: Any, wall0: float, dur: int, depth: int) -> None:
            acc, inputs, batch = state
            stack = _tl.pipe
            if stack and stack[-1] is acc:
                stack.pop()
            if err is not None:
                return
            if not acc.phases:  # a lazy iterator: its phases run later and are summed per tick
                return
            items = acc.items or (len(inputs) if isinstance(inputs, (list, tuple)) else 1)
            for ev in self._pipeline_spans(acc, depth, wall0=wall0, dur=dur, items=items, batch=batch):
                self._emit(ev)

        self._wrap_method(cls, "__call__", "pipeline", before_call, after_call, reentrant=True)
        self._wrap_phase(cls, "forward")

    def _patch_pipeline_class(self, klass: type, base: type) -> None:
        # Concrete pipelines define their own preprocess/postprocess: patch the defining class once.
        if klass in self._pipe_classes:
            return
        self._pipe_classes.add(klass)
        for phase in ("preprocess", "postprocess"):
            for owner in klass.__mro__:
                if phase in owner.__dict__:
                    if owner is not base and getattr(owner.__dict__[phase], "__llmtop_owner__", None) is not self:
                        self._wrap_phase(owner, phase)
                    break

    def _wrap_phase(self, owner: type, phase: str) -> None:
        def before(args: tuple, kwargs: dict) -> Any:
            return args[0] if args else None

        def after(pipe: Any, result: Any, err: Any, wall0: float, dur: int, depth: int) -> None:
            stack = getattr(_tl, "pipe", None)
            for acc in reversed(stack or ()):
                if acc.pipe is pipe:
                    acc.add(phase, wall0, dur)
                    return
            # Outside a call: a pipeline over a dataset or generator, consumed lazily.
            acc = self._pipe_stream.get(id(pipe))
            if acc is None:
                acc = self._pipe_stream[id(pipe)] = _PipeAcc(pipe)
            acc.add(phase, wall0, dur)

        self._wrap_method(owner, phase, f"pipeline_{phase}", before, after)

    def _pipeline_spans(self, acc: _PipeAcc, depth: int, wall0: float | None = None,
                        dur: int | None = None, items: int | None = None, batch: int | None = None,
                        streamed: bool = False) -> list[Span]:
        pipe = acc.pipe
        if dur is None:
            dur = sum(p[1] for p in acc.phases.values())
        if wall0 is None:
            wall0 = min(p[2] for p in acc.phases.values())
        items = acc.items if items is None else items
        attrs: dict[str, Any] = {"task": str(getattr(pipe, "task", "") or ""),
                                 "class": type(pipe).__name__, "items": items,
                                 "batch_size": batch or getattr(pipe, "_batch_size", None) or 1}
        if dur > 0:
            attrs["items_per_s"] = items / (dur / 1e9)
        if streamed:
            attrs["summed"] = True
        events: list[Span] = []
        for phase in ("preprocess", "forward", "postprocess"):
            p = acc.phases.get(phase)
            if p is None:
                continue
            attrs[f"{phase}_ms"] = p[1] / 1e6
            events.append(self._span(phase, PHASE_CATEGORY[phase], p[2], p[1], depth + 1,
                                     {"phase": phase, "calls": p[0]}))
        attrs["forward_calls"] = acc.phases.get("forward", [0])[0]
        name = f"pipeline {attrs['task'] or attrs['class']}"
        events.append(self._span(name, "model_inference", wall0, dur, depth, attrs))
        return events

    # -- generation ----------------------------------------------------------------------------

    def _patch_generation(self, module: Any) -> None:
        cls = module.GenerationMixin

        def before(args: tuple, kwargs: dict) -> Any:
            model = args[0]
            stack = getattr(_tl, "gen", None)
            if stack is None:
                stack = _tl.gen = []
            if stack and stack[-1].model is model:
                return None  # a subclass's generate calling ours: measured by the outer call
            self._hook_model(model)
            st = _GenState(model, time.perf_counter_ns())
            stack.append(st)
            return st, args, kwargs

        def after(state: Any, result: Any, err: Any, wall0: float, dur: int, depth: int) -> None:
            st, args, kwargs = state
            self._unhook_model(st.model)  # first: the model must be left as we found it
            t_end = st.t0 + dur
            stack = _tl.gen
            if stack and stack[-1] is st:
                stack.pop()
            if not stack:
                for fn in core.BUS.generate_end:  # the step tracker ends the call's step now
                    try:
                        fn(t_end)
                    except Exception:
                        pass
            if err is not None:
                return
            self._emit_generation(st, args, kwargs, result, wall0, t_end, depth)

        self._wrap_method(cls, "generate", "generate", before, after, reentrant=True)

    def _hook_model(self, model: Any) -> None:
        """Time the model's forwards while its ``generate`` runs.

        The hooks live on the model only for the duration of the call (counted, for nested or
        concurrent calls): left behind, they would make the user's model unpicklable
        (``torch.save(model)``, ``copy.deepcopy``). The two hook functions are made once per
        instrument, so re-adding them leaves compiled code's guards unchanged.
        """
        with self._lock:
            entry = self._hooked.get(model)
            if entry is not None:
                entry[0] += 1
                return
            if self._gen_hooks is None:
                self._gen_hooks = self._make_gen_hooks()
            pre, post = self._gen_hooks
            self._hooked[model] = [1, model.register_forward_pre_hook(pre),
                                   model.register_forward_hook(post)]

    def _unhook_model(self, model: Any) -> None:
        with self._lock:
            entry = self._hooked.get(model)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] > 0:
                return
            del self._hooked[model]
        for handle in entry[1:]:
            handle.remove()

    def _make_gen_hooks(self) -> tuple[Callable[..., None], Callable[..., None]]:
        instr = self

        def pre(module: Any, args: Any) -> None:
            stack = getattr(_tl, "gen", None)
            if stack and stack[-1].model is module and not instr._is_compiling():
                stack[-1].starts.append(time.perf_counter_ns())

        def post(module: Any, args: Any, output: Any) -> None:
            stack = getattr(_tl, "gen", None)
            if stack and stack[-1].model is module and not instr._is_compiling():
                st = stack[-1]
                st.ends.append(time.perf_counter_ns())
                if isinstance(output, dict):
                    # dict.get: ModelOutput's own accessors warn about the deprecated name.
                    cache = dict.get(output, "cache")
                    if cache is None:
                        cache = dict.get(output, "past_key_values")
                    st.cache = cache
                    if len(st.ends) == 1 and cache is not None:
                        st.prefill_cache = cache_nbytes(cache)

        return pre, post

    def _emit_generation(self, st: _GenState, args: tuple, kwargs: dict, result: Any, wall0: float,
                         t_end: int, depth: int) -> None:
        model = st.model
        inputs = kwargs.get("input_ids", kwargs.get("inputs"))
        if inputs is None and len(args) > 1 and _is_tensor(args[1]):
            inputs = args[1]
        embeds = kwargs.get("inputs_embeds")
        seqs = dict.get(result, "sequences") if isinstance(result, dict) else result
        if not _is_tensor(seqs) or seqs.dim() != 2:
            return
        batch, out_len = int(seqs.shape[0]), int(seqs.shape[1])
        encdec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        prompt = 0
        if _is_tensor(inputs) and inputs.dim() >= 1:
            prompt = int(inputs.shape[-1])
        elif _is_tensor(embeds) and embeds.dim() == 3:
            prompt = int(embeds.shape[1])
        if encdec:
            new = out_len - 1  # the decoder start token
        elif _is_tensor(inputs):
            new = out_len - prompt
        else:
            new = out_len  # from embeddings: only new tokens come back
        total_ns = t_end - st.t0
        ends = st.ends
        ttft_ns = (ends[0] - st.t0) if ends else total_ns
        decode_ms = [(b - a) / 1e6 for a, b in zip(ends, ends[1:], strict=False)]
        cache = dict.get(result, "cache") if isinstance(result, dict) else None
        if cache is None and isinstance(result, dict):
            cache = dict.get(result, "past_key_values")
        kv = cache_nbytes(cache if cache is not None else st.cache)
        st.cache = None
        self._emit(Generation(t=time.time(), batch=batch, prompt_tokens=prompt, new_tokens=max(0, new),
                              ttft_ms=ttft_ns / 1e6, decode_ms=decode_ms, kv_bytes=kv,
                              total_ms=total_ns / 1e6))
        decode_ns = (ends[-1] - ends[0]) if len(ends) > 1 else 0
        self._emit(self._span("prefill", "model_inference", wall0, ttft_ns, depth + 1,
                              {"phase": "prefill", "tokens": prompt, "batch": batch,
                               "kv_bytes": st.prefill_cache}))
        if decode_ms:
            self._emit(self._span("decode", "model_inference", wall0 + ttft_ns / 1e9, decode_ns,
                                  depth + 1, {"phase": "decode", "steps": len(decode_ms),
                                              "p50_ms": percentile(decode_ms, 50),
                                              "p95_ms": percentile(decode_ms, 95)}))
        attrs: dict[str, Any] = {
            "model": type(model).__name__, "batch": batch, "prompt_tokens": prompt,
            "new_tokens": max(0, new), "forwards": len(ends), "ttft_ms": ttft_ns / 1e6,
            "decode_p50_ms": percentile(decode_ms, 50), "decode_p95_ms": percentile(decode_ms, 95),
            "kv_bytes": kv,
        }
        if total_ns > 0:
            attrs["tokens_per_s"] = batch * max(0, new) / (total_ns / 1e9)
        self._emit(self._span("generate", "model_inference", wall0, total_ns, depth, attrs))

    # -- Trainer -------------------------------------------------------------------------------

    def _patch_trainer(self, module: Any) -> None:
        cls = module.Trainer

        def before(args: tuple, kwargs: dict) -> Any:
            return args[0]

        def after(trainer: Any, result: Any, err: Any, wall0: float, dur: int, depth: int) -> None:
            if err is not None:
                return
            callback_cls = _callback_class()
            handler = getattr(trainer, "callback_handler", None)
            if handler is None:
                return
            if not any(isinstance(cb, callback_cls) for cb in handler.callbacks):
                trainer.add_callback(callback_cls())

        self._wrap_method(cls, "__init__", "trainer", before, after)

    # -- mixed precision -----------------------------------------------------------------------

    def _on_root_forward_start(self, module: Any, t_start_ns: int, args: Any, kwargs: Any) -> None:
        """Hot path (root forwards of detailed steps): read the autocast state; make an event only
        on change."""
        if self._off_all or not core.BUS.detail or "precision" in self._off:
            return
        try:
            torch = sys.modules["torch"]
            if torch.is_autocast_enabled("cuda"):
                amp = ("cuda", torch.get_autocast_dtype("cuda"))
            elif torch.is_autocast_enabled("cpu"):
                amp = ("cpu", torch.get_autocast_dtype("cpu"))
            else:
                amp = None
            if amp != self._amp_last:
                self._amp_last = amp
                self._pending.append(self._precision_span(
                    "autocast", {"enabled": amp is not None, "device": amp[0] if amp else "",
                                 "dtype": _dtype_name(amp[1]) if amp else ""}))
                self._pending.append(Metric(name="amp/autocast", value=1.0 if amp else 0.0,
                                            t=time.time(), step=self._step()))
            if module not in self._models_seen:
                self._models_seen.add(module)
                self._pending.append(self._precision_span("model dtype", self._model_dtypes(module)))
        except Exception as exc:
            self._fail("precision", exc)

    def _precision_span(self, name: str, attrs: dict[str, Any]) -> Span:
        return Span(name=name, category="mixed_precision", start=time.time(), dur_ms=0.0,
                    step=self._step(), attrs=attrs)

    @staticmethod
    def _model_dtypes(module: Any) -> dict[str, Any]:
        dtype = getattr(module, "dtype", None)
        if dtype is None or not hasattr(dtype, "is_floating_point"):
            first = next(iter(module.parameters()), None)
            dtype = first.dtype if first is not None else None
        return {"model": type(module).__name__, "dtype": _dtype_name(dtype),
                "config_dtype": _config_dtype(getattr(module, "config", None))}


# --- Trainer callback (built lazily: transformers is imported only when it is asked for) ----------

_CALLBACK: type | None = None


def _emitter() -> Any:
    """Where the callback sends events: the installed instrument's context, else the running agent."""
    instr = _CURRENT
    if instr is not None and instr.ctx is not None and not instr._off_all:
        return instr.ctx
    return core.ACTIVE


def _callback_class() -> type:
    global _CALLBACK
    if _CALLBACK is not None:
        return _CALLBACK
    from transformers.trainer_callback import TrainerCallback

    class LlmtopCallback(TrainerCallback):
        """Sends Trainer's logs to llmtop as ``trainer/<key>`` metrics (loss, learning_rate,
        grad_norm, epoch, eval_* …) at Trainer's global step, and marks evaluations and the
        training run as spans. Harmless when no agent runs."""

        def __init__(self) -> None:
            self._eval_start: tuple[float, int] | None = None
            self._train_start: tuple[float, int] | None = None

        def _send(self, event: Any) -> None:
            sink = _emitter()
            if sink is not None:
                try:
                    sink.emit(event)
                except Exception:
                    pass

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._train_start = (time.time(), time.perf_counter_ns())

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self._train_start is None:
                return
            wall0, t0 = self._train_start
            self._train_start = None
            self._send(Span(name="train", category="training_loop", start=wall0,
                            dur_ms=(time.perf_counter_ns() - t0) / 1e6, step=state.global_step,
                            attrs={"global_step": state.global_step, "epoch": state.epoch,
                                   "max_steps": state.max_steps,
                                   "grad_accum": getattr(args, "gradient_accumulation_steps", 1)}))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if not logs:
                return
            now = time.time()
            for key, value in logs.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._send(Metric(name=f"trainer/{key}", value=float(value), t=now,
                                      step=state.global_step))

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self._eval_start is None:
                self._eval_start = (time.time(), time.perf_counter_ns())

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None,
                        **kwargs: Any) -> None:
            start = self._eval_start or (time.time(), time.perf_counter_ns())
            self._eval_start = None
            attrs: dict[str, Any] = {"global_step": state.global_step}
            for key, value in (metrics or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    attrs[key] = float(value)
            self._send(Span(name="evaluate", category="model_inference", start=start[0],
                            dur_ms=(time.perf_counter_ns() - start[1]) / 1e6, step=state.global_step,
                            attrs=attrs))

    _CALLBACK = LlmtopCallback
    return _CALLBACK


def __getattr__(name: str) -> Any:
    if name == "LlmtopCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
