"""Known Hugging Face models, built offline from their published configs on the meta device.

``model_configs.json`` (next to this file) holds the architecture fields of each model's published
``config.json``. A model is named by its Hub id (``facebook/opt-125m``), the id's last part
(``opt-125m``) or an alias (``llama-2-7b``), case-insensitively.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).with_name("model_configs.json")

TASK_CLASSES = {
    "encoder": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "image-classification": "AutoModelForImageClassification",
}


@dataclass
class KnownModel:
    id: str
    aliases: list[str]
    task: str
    config: dict[str, Any]

    @property
    def short(self) -> str:
        return self.aliases[-1] if self.aliases and "/" not in self.aliases[-1] else _last(self.id)


def _last(hub_id: str) -> str:
    return hub_id.rsplit("/", 1)[-1].lower()


@lru_cache(maxsize=1)
def known() -> list[KnownModel]:
    data = json.loads(CONFIGS.read_text())
    return [KnownModel(m["id"], m.get("aliases", []), m["task"], m["config"]) for m in data["models"]]


def find(name: str) -> KnownModel | None:
    key = name.strip().lower()
    for m in known():
        if key in {m.id.lower(), _last(m.id), *(a.lower() for a in m.aliases)}:
            return m
    return None


def task_of(config: Any) -> str:
    """The task (head) for a config read from a local directory, from its ``architectures``."""
    arch = " ".join(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq-lm"
    if "ForCausalLM" in arch or "LMHeadModel" in arch:
        return "causal-lm"
    if "ForImageClassification" in arch:
        return "image-classification"
    return "encoder"


def build_config(model: KnownModel) -> Any:
    from transformers import AutoConfig

    cfg = dict(model.config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def build(config: Any, task: str, dtype: Any = None, attn_implementation: str | None = None) -> Any:
    """The model for ``config`` with ``task``'s head, on the meta device: no weights allocated."""
    import torch
    import transformers

    auto = getattr(transformers, TASK_CLASSES[task])
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        try:
            model = auto.from_config(config, **kwargs)
        except ValueError:
            if task == "encoder":
                raise
            model = transformers.AutoModel.from_config(config, **kwargs)  # no such head: the base
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
