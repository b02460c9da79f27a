"""A small DDP training loop (gloo on CPU) with a planted slow rank.

Steps 0-1 warm up; in steps 2-5 rank 1 sleeps DDP_DELAY seconds before its forward (rank 0 then
waits in DDP's all-reduce); in steps 6-9 rank 0 sleeps instead. Rank R writes what DDP reduced per
step (its gradients' bytes) and which rank was slow, and DDP's buckets (those it starts with, those
it rebuilds in the second iteration) to ``OUT.rankR.json`` (argv[1]).
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

DELAY = float(os.environ.get("DDP_DELAY", "0.15"))
STEPS = 10


def slow_rank(step: int) -> int | None:
    return 1 if 2 <= step <= 5 else 0 if 6 <= step <= 9 else None


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_step = []
    for step in range(STEPS):
        if slow_rank(step) == rank:
            time.sleep(DELAY)
        loss = ddp(torch.randn(32, 64)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        per_step.append({"bytes": grad_bytes, "slow": slow_rank(step)})
    data = ddp._get_ddp_logging_data()
    buckets = {k: [int(s) for s in str(data.get(f"{k}bucket_sizes", "")).replace(",", " ").split()]
               for k in ("", "rebuilt_")}
    with open(f"{sys.argv[1]}.rank{rank}.json", "w") as f:
        json.dump({"steps": per_step, "delay": DELAY, "initial": buckets[""], "rebuilt": buckets["rebuilt_"]}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
