"""One FSDP2 (or single-process) run of the engine for tests/test_sharding.py; run as a script.

``--world 2`` spawns two gloo ranks on the CPU, applies ``fully_shard`` to every handled layer and then to the
root (FSDP2 on a 1-D mesh), and trains in a plain loop where rank r takes half r of each global batch.
``--world 1`` trains the same model in one process on the global batch. ``--driver lightning``: the callback under
Lightning's ``ModelParallelStrategy`` (FSDP2 in ``configure_model``, gloo on the CPU), same halves of the same
batches. Rank 0 writes the full parameters, the engine's state and its communication counts to ``--out``;
``--load`` resumes from such a file (engine driver).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_lrkfac import LowRankKFAC  # noqa: E402

GLOBAL_BATCH = 24


class TokenModel(nn.Module):
    """Embedding (sharded along the tokens: A's side) then Linear layers (sharded along their outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 6)
        self.hidden = nn.Linear(4 * 6, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(tokens).flatten(1))))


def new_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(
            nn.Linear(10, 24), nn.ReLU(), nn.Conv1d(1, 3, 3, padding=1), nn.Flatten(), nn.Linear(72, 7)
        )
        model[2] = _Unsqueezed(model[2])
    else:
        model = TokenModel()
    return model.double()


class _Unsqueezed(nn.Module):
    """A Conv1d over the features as one channel: a conv layer in the model."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.unsqueeze(1))


def batches(kind: str, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        if kind == "mlp":
            x = torch.randn(GLOBAL_BATCH, 10, generator=generator, dtype=torch.float64)
            y = torch.randint(0, 7, (GLOBAL_BATCH,), generator=generator)
        else:
            x = torch.randint(0, 40, (GLOBAL_BATCH, 4), generator=generator)
            y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=generator)
        out.append((x, y))
    return out


def options(mode: str, step_size: str = "optimizer") -> dict:
    common = dict(basis_update_interval=2, factor_decay=0.8, damping=1e-2, kl_clip=1e-2)
    if step_size == "normalized":  # each layer's norm summed over its shards
        common.update(step_size="normalized", kl_clip=None, damping_mode="relative")
    if mode == "exact":
        return {**common, "dense_threshold": 10_000}
    return {**common, "dense_threshold": 0, "rank": 4, "oversampling": 2}


def shard(model: nn.Module, kfac: LowRankKFAC) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in kfac.layers:
        fully_shard(layer.module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
    }


def train(rank: int, args: argparse.Namespace) -> None:
    world = args.world
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = new_model(args.model)
    kfac = LowRankKFAC(model, **options(args.mode, args.step_size))
    first = 0
    if args.load:
        saved = torch.load(args.load, weights_only=False)
        model.load_state_dict(saved["parameters"])
        kfac.load_state_dict(saved["engine"])
        first = saved["steps"]
    if world > 1:
        shard(model, kfac)
    momentum = 0.0 if args.step_size == "normalized" else args.momentum
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    for x, y in batches(args.model, first + args.steps)[first:]:
        part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        optimizer.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        kfac.step(lr=optimizer)
        optimizer.step()
    parameters = full_parameters(model)
    if rank == 0:
        record = {
            "parameters": parameters,
            "engine": kfac.state_dict(),
            "steps": first + args.steps,
            "bytes": dict(kfac.comm.bytes_by_kind),
            "sharded": sorted(kfac.layers[i].name for i in kfac.sharding.shards) if kfac.sharding else [],
        }
        torch.save(record, args.out)
    if world > 1:
        # Drop every holder of the gloo group (the sharded model, the engine, the optimizer) while the
        # group is still registered: a group freed at interpreter exit can abort a rank (CI saw
        # "terminate called without an active exception" on rank 1).
        del model, kfac, optimizer, parameters
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def run_lightning(args: argparse.Namespace) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import ModelParallelStrategy

    from lightning_lrkfac import LowRankKFACCallback

    class Sharded(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = new_model(args.model)

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for module in self.net.modules():
                if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
                    fully_shard(module, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=args.momentum)

        def train_dataloader(self):
            rank, world = self.global_rank, self.trainer.world_size
            part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
            return torch.utils.data.DataLoader(
                [(x[part], y[part]) for x, y in batches(args.model, args.steps)], batch_size=None
            )

    callback = LowRankKFACCallback(log_stats=False, **options(args.mode))
    strategy = ModelParallelStrategy(data_parallel_size=args.world, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=args.world, strategy=strategy, max_steps=args.steps, callbacks=[callback],
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    module = Sharded()
    trainer.fit(module)
    parameters = {name.removeprefix("net."): value.cpu() for name, value in full_parameters(module).items()}
    if trainer.global_rank == 0:
        engine = callback.engine
        sharded = sorted(engine.layers[i].name.removeprefix("net.") for i in engine.sharding.shards)
        torch.save({"parameters": parameters, "steps": args.steps, "sharded": sharded}, args.out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--model", choices=["mlp", "tokens"], default="mlp")
    parser.add_argument("--mode", choices=["exact", "lowrank"], default="exact")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--step-size", dest="step_size", choices=["optimizer", "normalized"], default="optimizer")
    parser.add_argument("--load", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, default=29541)
    parser.add_argument("--driver", choices=["engine", "lightning"], default="engine")
    parser.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu", help="lightning driver only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.driver == "lightning":
        os.environ.setdefault("MASTER_PORT", str(args.port))
        run_lightning(args)
    elif args.world == 1:
        train(0, args)
    else:
        mp.spawn(train, args=(args,), nprocs=args.world)


if __name__ == "__main__":
    main()
