"""A seeded char-level GPT trainer in the nanoGPT style: batches sliced from a tensor (no DataLoader),
gradient accumulation, an evaluation every N iterations (and before the first) under ``torch.no_grad``
with the model in eval mode. Prints what it did as JSON lines, for the test to compare with llmtop's.

    python char_gpt_train.py [iters] [eval_every] [accum]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

ITERS = int(sys.argv[1]) if len(sys.argv) > 1 else 12
EVAL_EVERY = int(sys.argv[2]) if len(sys.argv) > 2 else 5
ACCUM = int(sys.argv[3]) if len(sys.argv) > 3 else 2
EVAL_ITERS, BATCH, BLOCK = 3, 4, 16

torch.manual_seed(1337)
text = (Path(__file__).resolve().parents[2] / "examples" / "data" / "tiny_corpus.txt").read_text()[:20000]
chars = sorted(set(text))
data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
split = len(data) * 9 // 10
train_data, val_data = data[:split], data[split:]


def get_batch(source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(source) - BLOCK - 1, (BATCH,))
    x = torch.stack([source[i:i + BLOCK] for i in ix])
    y = torch.stack([source[i + 1:i + BLOCK + 1] for i in ix])
    return x, y


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(BLOCK, dim)
        self.block = nn.TransformerEncoderLayer(dim, 2, 64, dropout=0.1, batch_first=True, norm_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.block(self.tok(idx) + self.pos(torch.arange(t)), src_mask=mask, is_causal=True)
        logits = self.head(h)
        loss = nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


model = GPT(len(chars))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)


@torch.no_grad()
def estimate_loss() -> float:
    model.eval()
    losses = [model(*get_batch(val_data))[1].item() for _ in range(EVAL_ITERS)]
    model.train()
    return sum(losses) / len(losses)


evals = 0
for it in range(ITERS):
    if it % EVAL_EVERY == 0:
        print(json.dumps({"eval_before": it, "val_loss": estimate_loss()}), flush=True)
        evals += 1
    total = 0.0
    for _ in range(ACCUM):
        _, loss = model(*get_batch(train_data))
        loss = loss / ACCUM
        loss.backward()
        total += loss.item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(json.dumps({"iter": it, "loss": total}), flush=True)
print(json.dumps({"iters": ITERS, "evals": evals, "eval_forwards": evals * EVAL_ITERS,
                  "samples_per_iter": BATCH * ACCUM, "tokens_per_iter": BATCH * BLOCK * ACCUM}), flush=True)
