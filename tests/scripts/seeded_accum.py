"""Seeded training with gradient accumulation (4 micro-batches per optimizer step)."""
import random

import numpy as np
import torch
import torch.nn as nn


def states() -> None:
    """Everything the script can see of its random streams at the end, as text."""
    import hashlib
    import pickle

    print("torch", hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(), torch.rand(1).item())
    print("random", hashlib.sha256(pickle.dumps(random.getstate())).hexdigest(), random.random())
    print("numpy", hashlib.sha256(pickle.dumps(np.random.get_state())).hexdigest(), float(np.random.rand()))
    print("settings", torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype(),
          torch.are_deterministic_algorithms_enabled(), torch.is_autocast_enabled("cpu"))


torch.manual_seed(2)
random.seed(2)
np.random.seed(2)
model = nn.Sequential(nn.Embedding(40, 16), nn.Flatten(), nn.Linear(16 * 6, 32), nn.Tanh(), nn.Linear(32, 40))
opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
accum = 4
for it in range(80):
    x, y = torch.randint(0, 40, (8, 6)), torch.randint(0, 40, (8,))
    loss = nn.functional.cross_entropy(model(x), y) / accum
    loss.backward()
    if it % accum == accum - 1:
        opt.step()
        opt.zero_grad(set_to_none=True)
    if it % 8 == 0:
        print("iter", it, f"{loss.item():.10f}", random.randint(0, 10**9))
states()
