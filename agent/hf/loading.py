"""``from_pretrained`` of models, tokenizers and configs: a ``model_loading`` span with parameter
count, dtype, device map and memory added."""

from __future__ import annotations

import sys
from typing import Any

from llmtop.agent.hf.wrapping import Patcher, config_dtype, dtype_name
from llmtop.agent.instruments.gpu_timing import cuda_ready

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
    try:
        if cuda_ready():
            return int(sys.modules["torch"].cuda.memory_allocated())  # a counter read: no synchronisation
    except Exception:
        pass
    return None


def _delta(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


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


class Loading:
    """Wraps the ``from_pretrained`` classmethods (one span per load, the outermost only)."""

    def __init__(self, patcher: Patcher) -> None:
        self.p = patcher

    def patch_configs(self, module: Any) -> None:
        cls = getattr(module, "PreTrainedConfig", None) or getattr(module, "PretrainedConfig", None)
        if cls is not None:
            self.wrap(cls, "config")

    def patch_models(self, module: Any) -> None:
        self.wrap(module.PreTrainedModel, "model")

    def patch_auto_config(self, module: Any) -> None:
        self.wrap(module.AutoConfig, "config")

    def patch_auto_models(self, module: Any) -> None:
        self.wrap(module._BaseAutoModelClass, "model")

    def patch_auto_model_classes(self, module: Any) -> None:
        # Each AutoModelFor* class holds its own copy of the base from_pretrained (transformers'
        # ``copy_func``), made when this module ran: wrap the copies that predate our patch.
        base = module._BaseAutoModelClass
        for klass in list(vars(module).values()):
            if isinstance(klass, type) and issubclass(klass, base) and klass is not base:
                raw = klass.__dict__.get("from_pretrained")
                # A copy of our own wrapper (this module ran after our patch) needs no second one;
                # a copy made under an earlier, stopped agent does.
                if isinstance(raw, classmethod) and not self.p.owns(raw.__func__):
                    self.wrap(klass, "model")

    def patch_auto_tokenizer(self, module: Any) -> None:
        self.wrap(module.AutoTokenizer, "tokenizer")

    def wrap(self, cls: Any, what: str) -> None:
        patcher = self.p

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
                attrs["requested_dtype"] = dtype_name(requested)
            if what == "model" and loaded is not None:
                model = loaded
                attrs["params"] = sum(p.numel() for p in model.parameters())
                attrs["dtype"] = dtype_name(getattr(model, "dtype", None))
                attrs["config_dtype"] = config_dtype(getattr(model, "config", None))
                attrs["device_map"] = _device_map_summary(model)
            elif what == "config" and loaded is not None:
                config = loaded
                attrs["model_type"] = str(getattr(config, "model_type", ""))
                attrs["config_dtype"] = config_dtype(config)
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
            patcher.emit(patcher.span(label, "model_loading", wall0, dur, depth, attrs))

        patcher.wrap_classmethod(cls, "from_pretrained", f"load_{what}", before, after)
