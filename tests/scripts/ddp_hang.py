"""A planted hang: rank 1 skips the collective of step HANG_STEP and stalls, so rank 0 waits in it
until gloo's timeout (DDP_TIMEOUT seconds) raises; rank 0 says so and ends normally.

argv[1]: ``all_reduce`` (rank 1 skips an explicit all_reduce) or ``ddp`` (rank 1 skips a DDP
backward: rank 0 waits in DDP's gradient all-reduce)."""

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

HANG_STEP = 3
TIMEOUT = float(os.environ.get("DDP_TIMEOUT", "4"))


def main() -> None:
    mode = sys.argv[1]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    rank = dist.get_rank()
    model = nn.Linear(8, 2)
    if mode == "ddp":
        model = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(6):
        loss = model(torch.randn(4, 8)).sum()
        if rank == 1 and step == HANG_STEP:
            time.sleep(TIMEOUT + 2)  # stuck elsewhere: never arrives in this step's collective
            return
        try:
            loss.backward()
            if mode == "all_reduce":
                dist.all_reduce(torch.ones(100))
        except RuntimeError as exc:
            print(f"rank {rank}: {mode} of step {step} failed: {str(exc).splitlines()[0][:80]}", flush=True)
            return
        opt.step()
        opt.zero_grad()


if __name__ == "__main__":
    main()
