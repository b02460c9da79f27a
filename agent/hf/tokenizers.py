"""Tokenizer ``__call__``/``encode``: ``text_preprocessing`` spans with texts, tokens, padding share,
tokens/s and truncations (the first few per tick one by one, the rest summed into one span)."""

from __future__ import annotations

from typing import Any

from llmtop.agent.hf.loading import Loading
from llmtop.agent.hf.wrapping import Patcher, is_tensor
from llmtop.protocol.events import Span

SPANS_PER_TICK = 32  # tokenizer calls sent one by one per tick; the rest are summed into one span


def token_counts(ids: Any, mask: Any) -> tuple[int, int, int | None]:
    """(sequences, token positions, pad positions) of a tokenizer's ``input_ids``/``attention_mask``.

    Works on lists, nested lists, torch tensors and numpy arrays; pads are None without a mask.
    """
    if is_tensor(ids) or hasattr(ids, "ndim"):
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


class Tokenizers:
    """Wraps ``PreTrainedTokenizerBase``'s encoding methods (and its ``from_pretrained``)."""

    def __init__(self, patcher: Patcher, loading: Loading) -> None:
        self.p = patcher
        self.loading = loading
        self._agg: list[Any] | None = None  # calls past SPANS_PER_TICK this tick, summed
        self._spans = 0  # spans sent one by one this tick

    def patch(self, module: Any) -> None:
        cls = module.PreTrainedTokenizerBase
        self.loading.wrap(cls, "tokenizer")

        def before(args: tuple, kwargs: dict) -> Any:
            trunc = kwargs.get("truncation")
            return trunc is not None and trunc is not False and str(trunc) != "do_not_truncate"

        def after(truncating: bool, result: Any, err: Any, wall0: float, dur: int, depth: int) -> None:
            if err is not None or result is None:
                return
            if isinstance(result, (list, tuple)) or is_tensor(result):
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
            self._record(wall0, dur, depth, texts, tokens, pads, truncated)

        for attr in ("__call__", "encode", "encode_plus", "batch_encode_plus"):
            self.p.wrap_method(cls, attr, "tokenize", before, after)

    def poll(self) -> list[Span]:
        """Agent thread, every tick: the summed span of the calls past ``SPANS_PER_TICK``."""
        self._spans = 0
        agg, self._agg = self._agg, None
        return [self._summed_span(agg)] if agg is not None else []

    def _record(self, wall0: float, dur: int, depth: int, texts: int, tokens: int,
                pads: int | None, truncated: int | None) -> None:
        if self._spans < SPANS_PER_TICK:
            self._spans += 1
            attrs = _tokenize_attrs(1, texts, tokens, pads, truncated, dur)
            self.p.emit(self.p.span("tokenize", "text_preprocessing", wall0, dur, depth, attrs))
            return
        agg = self._agg
        if agg is None:
            self._agg = [1, texts, tokens, pads, truncated, dur, wall0]
            return
        agg[0] += 1
        agg[1] += texts
        agg[2] += tokens
        agg[3] = None if agg[3] is None or pads is None else agg[3] + pads
        agg[4] = None if agg[4] is None or truncated is None else agg[4] + truncated
        agg[5] += dur

    def _summed_span(self, agg: list[Any]) -> Span:
        calls, texts, tokens, pads, truncated, dur, wall0 = agg
        attrs = _tokenize_attrs(calls, texts, tokens, pads, truncated, dur)
        attrs["summed"] = True  # many calls in one tick: dur_ms is their total time
        return self.p.span("tokenize", "text_preprocessing", wall0, dur, 0, attrs)
