"""``GenerationMixin.generate``: a ``Generation`` event (prefill = time to first token, one decode
latency per later forward, KV-cache bytes) and ``generate``/``prefill``/``decode`` spans.

The model's forwards are timed by hooks that live on the model only while its ``generate`` runs.
``generation_phase()`` tells other instruments (the step tracker) whether this thread is in the
prefill or the decode part of a ``generate`` call.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from llmtop.agent.hf.wrapping import Patcher, is_tensor, tl
from llmtop.agent.runtime import core
from llmtop.protocol.events import Generation
from llmtop.protocol.formulas import percentile


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
        if is_tensor(obj):
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
    stack = getattr(tl, "gen", None)
    if not stack:
        return None
    return "decode" if stack[-1].ends else "prefill"


class Generate:
    """Wraps ``GenerationMixin.generate`` and times the model's forwards while it runs."""

    def __init__(self, patcher: Patcher) -> None:
        self.p = patcher
        self._lock = threading.Lock()  # the hook table, from any thread calling generate
        # model → [generate calls running, hook handles…] (generation timing, only during generate)
        self._hooked: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
        self._gen_hooks: tuple[Callable[..., None], Callable[..., None]] | None = None
        self._is_compiling: Callable[[], bool] = lambda: False

    def activate(self) -> None:
        """transformers is in use: learn how to tell a dynamo trace (whose forwards are not timed)."""
        torch = sys.modules.get("torch")  # transformers' modeling code imported it already
        compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
        if compiling is not None:
            self._is_compiling = compiling
        core.BUS.generation_phase = generation_phase

    def uninstall(self) -> None:
        for entry in list(self._hooked.values()):
            for h in entry[1:]:
                h.remove()
        self._hooked = weakref.WeakKeyDictionary()
        if core.BUS.generation_phase is generation_phase:
            core.BUS.generation_phase = core.no_generation

    def patch(self, module: Any) -> None:
        cls = module.GenerationMixin

        def before(args: tuple, kwargs: dict) -> Any:
            model = args[0]
            stack = getattr(tl, "gen", None)
            if stack is None:
                stack = tl.gen = []
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
            stack = tl.gen
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

        self.p.wrap_method(cls, "generate", "generate", before, after, reentrant=True)

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
            stack = getattr(tl, "gen", None)
            if stack and stack[-1].model is module and not instr._is_compiling():
                stack[-1].starts.append(time.perf_counter_ns())

        def post(module: Any, args: Any, output: Any) -> None:
            stack = getattr(tl, "gen", None)
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
        if inputs is None and len(args) > 1 and is_tensor(args[1]):
            inputs = args[1]
        embeds = kwargs.get("inputs_embeds")
        seqs = dict.get(result, "sequences") if isinstance(result, dict) else result
        if not is_tensor(seqs) or seqs.dim() != 2:
            return
        batch, out_len = int(seqs.shape[0]), int(seqs.shape[1])
        encdec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        prompt = 0
        if is_tensor(inputs) and inputs.dim() >= 1:
            prompt = int(inputs.shape[-1])
        elif is_tensor(embeds) and embeds.dim() == 3:
            prompt = int(embeds.shape[1])
        if encdec:
            new = out_len - 1  # the decoder start token
        elif is_tensor(inputs):
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
        self.p.emit(Generation(t=time.time(), batch=batch, prompt_tokens=prompt, new_tokens=max(0, new),
                              ttft_ms=ttft_ns / 1e6, decode_ms=decode_ms, kv_bytes=kv,
                              total_ms=total_ns / 1e6))
        decode_ns = (ends[-1] - ends[0]) if len(ends) > 1 else 0
        self.p.emit(self.p.span("prefill", "model_inference", wall0, ttft_ns, depth + 1,
                              {"phase": "prefill", "tokens": prompt, "batch": batch,
                               "kv_bytes": st.prefill_cache}))
        if decode_ms:
            self.p.emit(self.p.span("decode", "model_inference", wall0 + ttft_ns / 1e9, decode_ns,
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
        self.p.emit(self.p.span("generate", "model_inference", wall0, total_ns, depth, attrs))
