"""Seeded training from a shuffling DataLoader with two workers: the shuffle order and the workers'
seeds come from the script's generator, and each worker draws random augmentations."""
import random

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset


def states() -> None:
    """Everything the script can see of its random streams at the end, as text."""
    import hashlib
    import pickle

    print("torch", hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(), torch.rand(1).item())
    print("random", hashlib.sha256(pickle.dumps(random.getstate())).hexdigest(), random.random())
    print("numpy", hashlib.sha256(pickle.dumps(np.random.get_state())).hexdigest(), float(np.random.rand()))
    print("settings", torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype(),
          torch.are_deterministic_algorithms_enabled(), torch.is_autocast_enabled("cpu"))



class Noisy(Dataset):
    def __len__(self) -> int:
        return 96

    def __getitem__(self, i: int):
        g = torch.full((8,), float(i % 7)) + torch.randn(8) * 0.1  # the worker's seeded stream
        return g + random.random() + float(np.random.rand()), i % 3


if __name__ == "__main__":
    torch.manual_seed(4)
    random.seed(4)
    np.random.seed(4)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(Noisy(), batch_size=12, shuffle=True, num_workers=2,
                        worker_init_fn=lambda w: np.random.seed(torch.initial_seed() % 2**32))
    for epoch in range(2):
        for it, (x, y) in enumerate(loader):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            print("epoch", epoch, "iter", it, f"{loss.item():.10f}", f"{x.sum().item():.6f}")
    states()
