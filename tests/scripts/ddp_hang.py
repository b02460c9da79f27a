"""A planted hang: rank 1 skips the all_reduce of step HANG_STEP and stalls, so rank 0 waits in it
until gloo's timeout (DDP_TIMEOUT seconds) raises; rank 0 says so and ends normally."""

import datetime
import os
import time

import torch
import torch.distributed as dist
from torch import nn

HANG_STEP = 3
TIMEOUT = float(os.environ.get("DDP_TIMEOUT", "4"))


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    rank = dist.get_rank()
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(6):
        model(torch.randn(4, 8)).sum().backward()
        if rank == 1 and step == HANG_STEP:
            time.sleep(TIMEOUT + 2)  # stuck elsewhere: never arrives in this all_reduce
            return
        try:
            dist.all_reduce(torch.ones(100))
        except RuntimeError as exc:
            print(f"rank {rank}: all_reduce of step {step} failed: {str(exc).splitlines()[0][:80]}", flush=True)
            return
        opt.step()
        opt.zero_grad()


if __name__ == "__main__":
    main()
