"""A seeded DDP run (gloo, 2 ranks) with explicit collectives besides DDP's: rank 0 prints every
loss and the final parameters' sum at full precision, for a with/without-llmtop comparison."""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1234 + rank)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4))
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.005)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    for step in range(8):
        x = torch.randn(16, 32)
        loss = ddp(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        work = dist.all_reduce(torch.full((3,), float(step)), async_op=True)
        work.wait()
        if rank == 0:
            print(f"step {step} loss {loss.item()!r} mean {total.item() / 2!r} rand {torch.rand(1).item()!r}")
    if rank == 0:
        print("params", repr(sum(p.double().sum().item() for p in model.parameters())))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
