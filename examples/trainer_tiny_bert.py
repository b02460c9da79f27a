"""Fine-tune a tiny BERT classifier with ``transformers.Trainer`` for a few hundred steps, on CPU.

    python examples/trainer_tiny_bert.py                  # about half a minute
    python examples/trainer_tiny_bert.py --steps 40       # a quick look
    llmtop attach examples/trainer_tiny_bert.py           # the same run, watched

Offline: a WordPiece tokenizer is trained on the shipped text (and cached); the model is a random-init
``BertConfig`` saved to a temporary directory and loaded back with ``from_pretrained``. The task is
learnable from the text alone: is a sentence short, medium or long (in words)? The loss falls.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_local  # noqa: E402  (lives next to this script)
from pipeline_classify import sentences  # noqa: E402


def label_of(text: str) -> int:
    words = len(text.split())
    return 0 if words < 8 else 1 if words < 16 else 2


class Encoded(torch.utils.data.Dataset):
    """Tokenized sentences with their length-bucket labels."""

    def __init__(self, tokenizer: object, texts: list[str], max_length: int) -> None:
        self.enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length")
        self.labels = [label_of(t) for t in texts]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: torch.tensor(v[i]) for k, v in self.enc.items()}
        item["labels"] = torch.tensor(self.labels[i])
        return item


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation steps (default 2)")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--eval-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--log-history", metavar="FILE", help="write Trainer's log history to FILE as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok_dir = hf_local.bert_tokenizer_dir()
    texts = sentences(1200)
    split = len(texts) * 5 // 6
    with tempfile.TemporaryDirectory(prefix="llmtop-trainer-") as work:
        ckpt = Path(work) / "init"
        config = BertConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=args.seq_len, num_labels=3)
        hf_local.save_model(BertForSequenceClassification(config), tok_dir, ckpt)

        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        model = AutoModelForSequenceClassification.from_pretrained(ckpt)
        train = Encoded(tokenizer, texts[:split], args.seq_len)
        evaluation = Encoded(tokenizer, texts[split:], args.seq_len)

        training_args = TrainingArguments(
            output_dir=str(Path(work) / "out"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            gradient_accumulation_steps=args.grad_accum,
            learning_rate=1e-3,
            warmup_steps=max(1, args.steps // 20),
            logging_steps=args.logging_steps,
            eval_strategy="steps",
            eval_steps=args.eval_steps,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=args.seed,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation)
        trainer.train()
        final = trainer.evaluate()
        print(f"final eval_loss={final['eval_loss']:.4f} global_step={trainer.state.global_step}")
        if args.log_history:
            Path(args.log_history).write_text(json.dumps(trainer.state.log_history))
    return 0


if __name__ == "__main__":
    sys.exit(main())
