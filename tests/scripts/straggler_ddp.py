"""A small DDP training job (gloo, CPU) with one planted straggler, for tests/test_stragglers.py.

Run under ``torchrun --standalone --nproc_per_node=N``. ``--slow-rank R --cause data`` makes rank R's
dataset sleep in ``__getitem__`` (a slow data loader); ``--cause layer`` makes rank R's second block
sleep inside its forward (a slow layer). With ``--ready-dir D`` each rank writes ``D/rank{R}.pid`` and
waits for ``D/go`` before training, so that a test can attach a recorder to every rank first.
``--every-rank-ms T``: every rank's loader takes T ms per batch (a job mostly waiting for its data).
``--cause host`` pins rank R's training thread to a CPU that two busy processes share (a host shared too
thinly); ``--dim`` and ``--batch`` set the model's width and the batch (more compute per step).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

DIM = 64
BATCH = 8


class Tokens(Dataset):
    def __init__(self, n: int, delay_s: float, dim: int = DIM) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.randn(n, dim, generator=g)
        self.delay_s = delay_s

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.x[i], self.y[i]


class Block(nn.Module):
    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.delay_s = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)
        return x + self.act(self.fc(x))


class Net(nn.Module):
    def __init__(self, blocks: int, dim: int = DIM) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(blocks))
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--slow-rank", type=int, default=-1)
    ap.add_argument("--cause", choices=("data", "layer", "host", "none"), default="none")
    ap.add_argument("--dim", type=int, default=DIM)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--delay-ms", type=float, default=30.0)
    ap.add_argument("--ready-dir", default="")
    ap.add_argument("--every-rank-ms", type=float, default=0.0, help="every rank's loader waits this long per batch")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Net(blocks=4, dim=args.dim)
    slow = rank == args.slow_rank
    hogs = crowd(slow) if args.cause == "host" else []
    if slow and args.cause == "layer":
        model.blocks[1].delay_s = args.delay_ms / 1000.0
    ddp = DistributedDataParallel(model)
    per_item = args.delay_ms / 1000.0 / args.batch if slow and args.cause == "data" else 0.0
    per_item += args.every_rank_ms / 1000.0 / args.batch
    loader = DataLoader(Tokens(args.steps * args.batch, per_item, args.dim), batch_size=args.batch, shuffle=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)

    if args.ready_dir:
        ready = Path(args.ready_dir)
        (ready / f"rank{rank}.pid").write_text(str(os.getpid()))
        deadline = time.monotonic() + 60.0
        while not (ready / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    dist.barrier()

    for x, y in loader:
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dist.barrier()
    for hog in hogs:
        hog.kill()
    if rank == 0:
        print(f"done {args.steps} steps on {dist.get_world_size()} ranks")
    dist.destroy_process_group()


HOG = """import os
os.sched_setaffinity(0, {%d})
parent = %d
while os.getppid() == parent:  # ends with the rank, however the rank ends
    for _ in range(200000):
        pass
"""


def crowd(slow: bool) -> list[subprocess.Popen]:
    """The slow rank's training thread pinned to one CPU that two busy processes share with it (the
    other ranks run where the scheduler puts them: the other CPUs, in practice)."""
    if not slow:
        return []
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})  # on Linux: this thread, the one that trains
    return [subprocess.Popen([sys.executable, "-c", HOG % (cpu, os.getpid())]) for _ in range(2)]


if __name__ == "__main__":
    main()
