"""A tiny DDP training job for the job view's tests: gloo on CPU, one rank per process (torchrun).

--steps N steps of a small MLP, each --sleep seconds longer on rank --slow-rank (a straggler)."""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def say(line: str) -> None:
    """One write per line: the ranks share one terminal or pipe (print writes its parts one by one)."""
    os.write(1, (line + "\n").encode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sleep", type=float, default=0.05)
    parser.add_argument("--slow-rank", type=int, default=-1)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(args.steps):
        x = torch.randn(16, 32)
        time.sleep(args.sleep * (3 if rank == args.slow_rank else 1))
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            say(f"rank {rank} step {step} loss {loss.item():.4f}")
    dist.barrier()
    dist.destroy_process_group()
    say(f"rank {rank} done (pid {os.getpid()})")


if __name__ == "__main__":
    main()
