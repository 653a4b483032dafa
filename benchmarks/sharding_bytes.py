"""Bytes per step that the curvature adds under FSDP2, against FSDP2's own gradient reduce-scatter.

Two gloo ranks on the CPU train a GPT-like block (the Linear layers of one transformer block at width d: qkv
d→3d, proj d→d, fc d→4d, fc2 4d→d, float32), each layer and the root under ``fully_shard``, with the engine at
rank k. Measured on one step after the first (the bases exist), on rank 0:

- FSDP2's own traffic: the input bytes of every ``reduce_scatter_single`` (the gradients) and
  ``all_gather_single`` (the parameters), counted by wrapping torch.distributed's functions;
- the engine's: its :class:`~lightning_lrkfac.distributed.Communicator` counts per kind: ``statistics`` (the
  sketches, as under DDP, every ``factor_update_interval`` steps), ``shards`` (Wᵀ X, k × d_in per layer, every
  step), ``kl`` and ``checks`` (one number each).

Byte counts are the payload each rank puts into a collective. A ring all-reduce moves about twice its payload and a
reduce-scatter about once, so the wire-byte ratio is about twice the payload ratio printed here.

    python -m benchmarks.sharding_bytes
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from .common import print_table, write_json

WIDTHS = (512, 1024, 2048)
RANKS = (16, 32)
TOKENS = 64


class Block(nn.Module):
    """The Linear layers of a transformer block, chained shape-consistently (no attention arithmetic)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.qkv(x)[..., : x.shape[-1]]
        return self.fc2(F.gelu(self.fc(self.proj(query))))


def _counting(counts: dict[str, int], name: str, function):
    def wrapper(*args, **kwargs):
        tensor = kwargs.get("input", args[1] if len(args) > 1 else None)
        if tensor is not None:
            counts[name] = counts.get(name, 0) + tensor.numel() * tensor.element_size()
        return function(*args, **kwargs)

    return wrapper


def _measure(rank: int, world: int, store: str, width: int, k: int, queue) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_lrkfac import LowRankKFAC

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    counts: dict[str, int] = {}
    dist.reduce_scatter_single = _counting(counts, "reduce_scatter", dist.reduce_scatter_single)
    dist.all_gather_single = _counting(counts, "all_gather", dist.all_gather_single)
    torch.manual_seed(0)
    model = Block(width)
    kfac = LowRankKFAC(model, rank=k)
    mesh = init_device_mesh("cpu", (world,))
    for layer in kfac.layers:
        fully_shard(layer.module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(rank)
    for step in range(2):
        if step == 1:
            counts.clear()
            kfac.comm.bytes_by_kind.clear()
        optimizer.zero_grad()
        x = torch.randn(TOKENS, width, generator=generator)
        model(x).square().mean().backward()
        kfac.step(lr=optimizer)
        optimizer.step()
    if rank == 0:
        queue.put(
            {
                "fsdp": dict(counts),
                "engine": dict(kfac.comm.bytes_by_kind),
                "params": sum(p.numel() for p in model.parameters()),
            }
        )
    dist.barrier()
    dist.destroy_process_group()


def measure(width: int, k: int, world: int = 2) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    store = os.path.join(tempfile.mkdtemp(), "store")
    processes = [context.Process(target=_measure, args=(r, world, store, width, k, queue)) for r in range(world)]
    for process in processes:
        process.start()
    result = queue.get(timeout=600)
    for process in processes:
        process.join()
    fsdp, engine = result["fsdp"], result["engine"]
    gradients = fsdp.get("reduce_scatter", 0)
    every_step = engine.get("shards", 0) + engine.get("kl", 0) + engine.get("checks", 0)
    return {
        "width": width,
        "rank k": k,
        "parameters": result["params"],
        "FSDP reduce-scatter bytes": gradients,
        "FSDP all-gather bytes": fsdp.get("all_gather", 0),
        "shards bytes": engine.get("shards", 0),
        "statistics bytes": engine.get("statistics", 0),
        "kl + checks bytes": engine.get("kl", 0) + engine.get("checks", 0),
        "step / reduce-scatter": every_step / gradients,
        "statistics / reduce-scatter": engine.get("statistics", 0) / gradients,
        "all / reduce-scatter": (every_step + engine.get("statistics", 0)) / gradients,
        "model k·Σd_in / Σd_out·d_in": k * 7 * width / (12 * width * width),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", nargs="*", type=int, default=list(WIDTHS))
    parser.add_argument("--ranks", nargs="*", type=int, default=list(RANKS))
    args = parser.parse_args()
    rows = [measure(width, k) for width in args.widths for k in args.ranks]
    print_table(rows, list(rows[0]))
    write_json("sharding_bytes", {"world_size": 2, "tokens_per_rank": TOKENS, "dtype": "float32"}, rows)


if __name__ == "__main__":
    main()
