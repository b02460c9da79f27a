"""Seeded AdamW training: losses and random states must print the same with and without llmtop."""
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


torch.manual_seed(1)
random.seed(1)
np.random.seed(1)
model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
for it in range(60):
    x = torch.randn(32, 16)
    y = torch.randint(0, 4, (32,))
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if it % 5 == 0:
        print("iter", it, f"{loss.item():.10f}", random.random(), float(np.random.rand()))
states()
