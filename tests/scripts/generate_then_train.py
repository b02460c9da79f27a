"""``generate()`` with a tied-embedding GPT-2 built from a config (random init, offline), then a short
fine-tune of the same model with AdamW: the generate calls come before the first training step.
Prints each call and each iteration as JSON lines.

    python generate_then_train.py [calls] [iters] [seconds]

Training runs ``iters`` iterations, or longer until ``seconds`` have passed (so that the agent, which
counts one new input shape a second, has counted the training step's after the generate calls').
"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
ITERS = int(sys.argv[2]) if len(sys.argv) > 2 else 8
SECONDS = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
NEW, BATCH, SEQ = 4, 2, 12

torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64, tie_word_embeddings=True)
model = GPT2LMHeadModel(config).eval()
for call in range(CALLS):
    prompt = 5 + call
    ids = torch.randint(1, 128, (BATCH, prompt))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, pad_token_id=0)
    print(json.dumps({"call": call, "batch": BATCH, "prompt": prompt, "new": out.shape[1] - prompt}), flush=True)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
t0 = time.monotonic()
it = 0
while it < ITERS or (time.monotonic() - t0 < SECONDS and it < 5000):
    ids = torch.randint(1, 128, (BATCH, SEQ))
    loss = model(ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(json.dumps({"iter": it, "loss": loss.item()}), flush=True)
    it += 1
print(json.dumps({"calls": CALLS, "iters": it}), flush=True)
