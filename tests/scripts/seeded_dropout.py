"""Seeded training through dropout layers (train mode draws masks every step), with eval passes."""
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


torch.manual_seed(3)
random.seed(3)
np.random.seed(3)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 64), nn.Dropout(0.1),
                      nn.ReLU(), nn.Linear(64, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for it in range(60):
    if it % 20 == 0:
        model.eval()
        with torch.no_grad():
            print("eval", it, f"{model(torch.randn(16, 20)).sum().item():.10f}")
        model.train()
    x, y = torch.randn(16, 20), torch.randint(0, 2, (16,))
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if it % 5 == 0:
        print("iter", it, f"{loss.item():.10f}")
states()
