"""Explicit torch.distributed collectives in a small training loop (2 ranks, gloo on CPU).

Each step makes the same known collectives; rank R writes what it did, per step, to
``OUT.rankR.json`` (OUT: argv[1]) so a test can compare it with what llmtop measured.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

STEPS = int(os.environ.get("DDP_STEPS", "6"))


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    per_step = []
    for _ in range(STEPS):
        calls = nbytes = 0
        loss = model(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        grads = torch.ones(1000)  # float32: 4000 bytes
        dist.all_reduce(grads)
        calls, nbytes = calls + 1, nbytes + 4000
        ids = torch.arange(256)  # int64: 2048 bytes
        dist.broadcast(ids, src=0)
        calls, nbytes = calls + 1, nbytes + 2048
        dist.barrier()
        calls += 1
        out = torch.empty(world * 100)
        dist.all_gather_into_tensor(out, torch.full((100,), float(rank)))  # the gathered output
        calls, nbytes = calls + 1, nbytes + world * 400
        work = dist.all_reduce(torch.ones(10, dtype=torch.float64), async_op=True)
        work.wait()
        calls, nbytes = calls + 1, nbytes + 80
        buf = torch.zeros(16)
        req = dist.isend(buf, 1) if rank == 0 else dist.irecv(buf, 0)
        req.wait()
        calls, nbytes = calls + 1, nbytes + 64
        peer = (rank + 1) % world
        send, recv = torch.ones(32), torch.empty(32)
        ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
        for r in dist.batch_isend_irecv(ops):
            r.wait()
        calls, nbytes = calls + 1, nbytes + 256
        opt.step()
        opt.zero_grad()
        per_step.append({"calls": calls, "bytes": nbytes})
    with open(f"{sys.argv[1]}.rank{rank}.json", "w") as f:
        json.dump(per_step, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
