"""A small DDP training job (gloo, CPU) with one planted straggler, for tests/test_stragglers.py.

Run under ``torchrun --standalone --nproc_per_node=N``. ``--slow-rank R --cause data`` makes rank R's
dataset sleep in ``__getitem__`` (a slow data loader); ``--cause layer`` makes rank R's second block
sleep inside its forward (a slow layer). With ``--ready-dir D`` each rank writes ``D/rank{R}.pid`` and
waits for ``D/go`` before training, so that a test can attach a recorder to every rank first.
``--every-rank-ms T``: every rank's loader takes T ms per batch (a job mostly waiting for its data).
"""

from __future__ import annotations

import argparse
import os
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
    def __init__(self, n: int, delay_s: float) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, DIM, generator=g)
        self.y = torch.randn(n, DIM, generator=g)
        self.delay_s = delay_s

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.x[i], self.y[i]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)
        self.act = nn.GELU()
        self.delay_s = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)
        return x + self.act(self.fc(x))


class Net(nn.Module):
    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--slow-rank", type=int, default=-1)
    ap.add_argument("--cause", choices=("data", "layer", "none"), default="none")
    ap.add_argument("--delay-ms", type=float, default=30.0)
    ap.add_argument("--ready-dir", default="")
    ap.add_argument("--every-rank-ms", type=float, default=0.0, help="every rank's loader waits this long per batch")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Net(blocks=4)
    slow = rank == args.slow_rank
    if slow and args.cause == "layer":
        model.blocks[1].delay_s = args.delay_ms / 1000.0
    ddp = DistributedDataParallel(model)
    per_item = args.delay_ms / 1000.0 / BATCH if slow and args.cause == "data" else 0.0
    per_item += args.every_rank_ms / 1000.0 / BATCH
    loader = DataLoader(Tokens(args.steps * BATCH, per_item), batch_size=BATCH, shuffle=False)
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
    if rank == 0:
        print(f"done {args.steps} steps on {dist.get_world_size()} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
