"""Offline Hugging Face checkpoints for the transformers examples: a BERT-style WordPiece tokenizer
trained on the shipped text, and random-init models saved to local directories, so that the real
``from_pretrained`` loading code runs without the Hub.

    import hf_local                                   # from examples/
    tok_dir = hf_local.bert_tokenizer_dir()           # trained once, then cached
    model_dir = hf_local.save_model(model, tok_dir, "tiny-bert-cls")
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tinylib  # noqa: E402  (lives next to this script)

BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/llmtop/<name>`` (or ``~/.cache/llmtop/<name>``), like tinylib's tokenizer."""
    return tinylib.default_tokenizer_dir().parent / name


def bert_tokenizer_dir(vocab_size: int = 2048, out_dir: str | os.PathLike[str] | None = None) -> Path:
    """A lowercase WordPiece tokenizer with ``[CLS] … [SEP]`` framing, trained on the shipped text and
    saved with ``save_pretrained``; reused when already there. Returns its directory."""
    out = Path(out_dir) if out_dir is not None else cache_dir(f"tiny-wordpiece-{vocab_size}")
    if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL,
                                        show_progress=False)
    tok.train_from_iterator(tinylib.load_text().splitlines(), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=512)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def gpt_tokenizer_dir(vocab_size: int = 2048) -> Path:
    """tinylib's byte-level BPE tokenizer (GPT-2 style), trained once and cached; its directory."""
    out = tinylib.default_tokenizer_dir(vocab_size)
    tinylib.build_tokenizer(out, vocab_size=vocab_size)
    return out


def save_model(model: Any, tokenizer_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Save ``model`` and copy the tokenizer beside it: one directory that ``from_pretrained``
    loads for both, like a Hub checkpoint."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    return out
