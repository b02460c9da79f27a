"""Classify sentences with a ``text-classification`` pipeline on a small random-init BERT, on CPU.

    python examples/pipeline_classify.py                  # a few seconds
    llmtop attach examples/pipeline_classify.py           # the same run, watched

Offline: a WordPiece tokenizer is trained on the shipped text (and cached), a tiny ``BertConfig``
model is randomly initialised and saved with the tokenizer to a temporary directory, and
``pipeline(...)`` loads both from there. The labels are meaningless (random weights); the
pipeline's preprocess / forward / postprocess split and its items/s are real.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_local  # noqa: E402  (lives next to this script)
import tinylib  # noqa: E402

LABELS = ["calm", "busy", "strange"]


def sentences(n: int) -> list[str]:
    """The first ``n`` usable sentences of the shipped text."""
    out: list[str] = []
    for line in tinylib.load_text().splitlines():
        for s in line.split(". "):
            s = s.strip()
            if len(s.split()) >= 4:
                out.append(s)
                if len(out) == n:
                    return out
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=64, help="sentences to classify (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok_dir = hf_local.bert_tokenizer_dir()
    texts = sentences(args.texts)
    with tempfile.TemporaryDirectory(prefix="llmtop-bert-") as ckpt:
        config = BertConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=128, num_labels=len(LABELS),
                            initializer_range=0.5,
                            id2label=dict(enumerate(LABELS)),
                            label2id={name: i for i, name in enumerate(LABELS)})
        hf_local.save_model(BertForSequenceClassification(config), tok_dir, ckpt)

        classify = pipeline("text-classification", model=ckpt, tokenizer=ckpt, device="cpu")

        # One sentence at a time (the way many scripts start) …
        for text in texts[:4]:
            result = classify(text, truncation=True, max_length=64)
            print(f"single {result[0]['label']:>8} {result[0]['score']:.3f} | {text[:50]}")
        # … then the whole list, batched by the pipeline itself.
        results = classify(texts, batch_size=args.batch_size, truncation=True, max_length=64)
        counts = {name: sum(r["label"] == name for r in results) for name in LABELS}
        print(f"batched texts={len(results)} batch_size={args.batch_size} labels={counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
