"""Small offline building blocks for the examples, tests and benchmarks.

Everything here works without network access: the text ships in ``examples/data/``, the tokenizer
is trained locally with the ``tokenizers`` library (byte-level BPE, like GPT-2) and cached on disk,
and models are built from configs with random weights.

    from examples.tinylib import load_text, build_tokenizer, tiny_gpt_config   # from the repo root
    import tinylib                                                              # from examples/
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS = DATA_DIR / "tiny_corpus.txt"
SPECIAL = "<|endoftext|>"
_STAMP = "llmtop_tokenizer_stamp.json"


def load_text(path: str | os.PathLike[str] | None = None) -> str:
    """The shipped English text (about 200 KB of plain prose)."""
    return Path(path or CORPUS).read_text(encoding="utf-8")


def default_tokenizer_dir(vocab_size: int = 2048) -> Path:
    """Where the examples cache their tokenizer: ``$XDG_CACHE_HOME/llmtop`` or ``~/.cache/llmtop``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmtop" / f"tiny-bpe-{vocab_size}"


def _stamp(text: str, vocab_size: int) -> dict[str, Any]:
    return {"corpus_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "vocab_size": vocab_size}


def build_tokenizer(out_dir: str | os.PathLike[str] | None = None, vocab_size: int = 2048,
                    text: str | None = None) -> Any:
    """A byte-level BPE tokenizer trained on the shipped text, as a ``PreTrainedTokenizerFast``.

    Saved with ``save_pretrained(out_dir)`` so ``AutoTokenizer.from_pretrained(out_dir)`` loads it.
    A tokenizer already in ``out_dir`` for the same text and vocabulary size is loaded, not retrained.
    ``vocab_size`` is an upper bound: BPE stops once every word is one token, which for the shipped
    text happens at about 1 260 entries. Size models with ``len(tokenizer)``.
    """
    from transformers import PreTrainedTokenizerFast

    text = load_text() if text is None else text
    out = Path(out_dir) if out_dir is not None else default_tokenizer_dir(vocab_size)
    stamp = _stamp(text, vocab_size)
    stamp_file = out / _STAMP
    if (out / "tokenizer.json").is_file() and stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                return PreTrainedTokenizerFast.from_pretrained(str(out))
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        unk_token=SPECIAL,
        clean_up_tokenization_spaces=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    stamp_file.write_text(json.dumps(stamp))
    return fast


def tiny_gpt_config(vocab_size: int = 2048, n_layer: int = 4, n_embd: int = 128, n_head: int = 4,
                    n_positions: int = 256, dropout: float = 0.0, **extra: Any) -> Any:
    """A small ``GPT2Config`` (random init via ``GPT2LMHeadModel(config)``); dropout off by default
    so that runs are deterministic given a seed."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
        **extra,
    )


def encode_text(tokenizer: Any, text: str | None = None) -> list[int]:
    """Token ids of the whole text (no special tokens added)."""
    return tokenizer(load_text() if text is None else text, add_special_tokens=False)["input_ids"]


class TokenBlocks:
    """A map-style dataset of ``seq_len``-token blocks cut from one token stream (inputs = labels;
    the model shifts them itself). Usable with ``torch.utils.data.DataLoader``."""

    def __init__(self, ids: list[int], seq_len: int) -> None:
        import torch

        if len(ids) < seq_len + 1:
            raise ValueError(f"text too short: {len(ids)} tokens for blocks of {seq_len}")
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.seq_len = seq_len
        # Overlapping starts every half block: more distinct samples from a small text.
        self.starts = list(range(0, len(ids) - seq_len, max(1, seq_len // 2)))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Any:
        s = self.starts[i]
        return self.ids[s:s + self.seq_len]
