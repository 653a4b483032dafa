"""Lightning Fabric's DDP on CPU processes driving the engine: ``fabric.backward``, the engine's step, the optimizer.

Each rank trains on its slice of the global batch; rank 0 saves the final parameters (``--devices 1``: one process
with the global batch, through the same loop).

    python tests/fabric_ddp_run.py --devices 2 --out OUT.pt
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from lightning_fabric import Fabric
from torch import nn

from lightning_lrkfac import LowRankKFAC

GLOBAL_BATCH, STEPS = 32, 4


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 10, generator=generator, dtype=torch.float64), torch.randint(0, 4, (GLOBAL_BATCH,), generator=generator))
        for _ in range(STEPS)
    ]  # fmt: skip


def train(fabric: Fabric, out: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kfac = LowRankKFAC(model, dense_threshold=1000, basis_update_interval=1)  # exact factors, a refresh every step
    model, optimizer = fabric.setup(model, optimizer)
    rank, world = fabric.global_rank, fabric.world_size
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    with kfac:
        for x, y in batches():
            optimizer.zero_grad()
            fabric.backward(F.cross_entropy(model(x[part]), y[part]))
            kfac.step(lr=optimizer)
            optimizer.step()
    if rank == 0:
        torch.save({"parameters": [p.detach().clone() for p in model.parameters()], "steps": kfac.steps}, out)
    fabric.barrier()  # leave together: a rank exiting while the other still uses gloo can abort it (SIGABRT, seen once)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    strategy = "ddp_spawn" if args.devices > 1 else "auto"
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=strategy)
    fabric.launch(train, args.out)


if __name__ == "__main__":
    main()
