"""Several ``generate()`` calls with a tied-embedding GPT-2 built from a config (random init, offline).
Prints each call's batch, prompt length and new tokens as JSON lines.

    python generate_calls.py [calls]
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
NEW = 6

torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64, tie_word_embeddings=True)
model = GPT2LMHeadModel(config).eval()
assert model.lm_head.weight is model.transformer.wte.weight  # tied
for call in range(CALLS):
    batch, prompt = 2 + call, 5 + 2 * call
    ids = torch.randint(1, 128, (batch, prompt))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, pad_token_id=0)
    print(json.dumps({"call": call, "batch": batch, "prompt": prompt, "new": out.shape[1] - prompt}), flush=True)
print(json.dumps({"calls": CALLS}), flush=True)
