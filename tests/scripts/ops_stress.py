"""Stress for the op profiler's windows (tests/test_ops_stress.py): a window on every step it may
open, ops on three threads at once, a DataLoader whose two workers are forked again every epoch
(sometimes while a window is open), until thousands of windows have been read or time is up."""
import sys
import threading
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

WANT = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
LIMIT_S = float(sys.argv[2]) if len(sys.argv) > 2 else 40.0
stop = threading.Event()


def ops_windows() -> int:
    from llmtop.agent.runtime import core

    agent = core.ACTIVE
    return sum(i.windows for i in getattr(agent, "_instruments", []) if i.name == "ops")


def side_training(seed: int) -> None:
    """Training on another thread that the step tracker does not follow (no module call, no
    ``backward()``, no optimizer: plain tensors and ``autograd.grad``), so the main thread owns the
    steps (op windows open on it) while these threads' ops run inside its windows."""
    gen = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(16, 32, generator=gen) * 0.1).requires_grad_()
    w2 = (torch.randn(32, 4, generator=gen) * 0.1).requires_grad_()
    while not stop.is_set():
        loss = (torch.randn(8, 16, generator=gen) @ w1).relu().matmul(w2).square().mean()
        g1, g2 = torch.autograd.grad(loss, (w1, w2))
        with torch.no_grad():
            w1 -= 0.01 * g1
            w2 -= 0.01 * g2


def main() -> None:
    threads = [threading.Thread(target=side_training, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    data = TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t0 = time.monotonic()
    epochs = 0
    try:
        while ops_windows() < WANT and time.monotonic() - t0 < LIMIT_S:
            epochs += 1
            for x, y in DataLoader(data, batch_size=8, shuffle=True, num_workers=2):
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
    finally:
        stop.set()
        for t in threads:
            t.join()
    print("windows", ops_windows(), "epochs", epochs, flush=True)


if __name__ == "__main__":
    main()
