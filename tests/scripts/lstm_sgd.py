"""A word-level LSTM language model in the style of PyTorch's word_language_model example: sequence-first
batches ``(seq, batch)``, no optimizer (a hand-written SGD update on ``p.data``), hidden state carried
and detached between iterations. Prints its iterations and losses as JSON lines.

    python lstm_sgd.py [iters]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

ITERS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
SEQ, BATCH, LR = 12, 6, 2.0

torch.manual_seed(0)
words = (Path(__file__).resolve().parents[2] / "examples" / "data" / "tiny_corpus.txt").read_text().split()[:6000]
vocab = {w: i for i, w in enumerate(sorted(set(words)))}
ids = torch.tensor([vocab[w] for w in words], dtype=torch.long)
nb = len(ids) // BATCH
data = ids[:nb * BATCH].view(BATCH, nb).t().contiguous()  # (time, batch): batchify


class RNNModel(nn.Module):
    def __init__(self, ntoken: int, dim: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Embedding(ntoken, dim)
        self.rnn = nn.LSTM(dim, dim, 2)  # batch_first=False, torch's default
        self.decoder = nn.Linear(dim, ntoken)

    def forward(self, x: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        out, hidden = self.rnn(self.encoder(x), hidden)
        return self.decoder(out), hidden


model = RNNModel(len(vocab))
criterion = nn.CrossEntropyLoss()
hidden = (torch.zeros(2, BATCH, 32), torch.zeros(2, BATCH, 32))
for it in range(ITERS):
    i = (it * SEQ) % (len(data) - SEQ - 1)
    x, y = data[i:i + SEQ], data[i + 1:i + 1 + SEQ]
    hidden = tuple(h.detach() for h in hidden)
    model.zero_grad()
    out, hidden = model(x, hidden)
    loss = criterion(out.view(-1, len(vocab)), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
    for p in model.parameters():
        p.data.add_(p.grad, alpha=-LR)
    print(json.dumps({"iter": it, "loss": loss.item()}), flush=True)
print(json.dumps({"iters": ITERS, "samples_per_iter": BATCH, "tokens_per_iter": SEQ * BATCH}), flush=True)
