"""One data-parallel (or single-process) training run for tests/test_distributed.py; run as a script.

``--driver lightning``: Lightning's "ddp" strategy re-launches this file once per rank (gloo on
CPU) and the callback drives the engine. ``--driver engine``: plain ``torch.distributed``
(spawned gloo ranks, torch's DistributedDataParallel) and a plain loop that calls the engine;
no Lightning. Every rank writes its parameters and the engine's bookkeeping to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests.helpers`, run as a script

from lightning_lrkfac import LowRankKFAC  # noqa: E402
from tests.helpers import DigitsModule, digits_tensors, same  # noqa: E402

LR = 0.1


def kfac_options(args: argparse.Namespace) -> dict:
    """dense_threshold 0: below rank 65 every factor (the head's B of 10 too) is low-rank, sketches communicated."""
    step_size = {"step_size": args.step_size, "kl_clip": None} if args.step_size != "optimizer" else {}
    if args.step_size == "normalized":
        step_size["damping_mode"] = "relative"
    return dict(
        rank=args.rank, oversampling=4, basis_update_interval=2, work_distribution=args.work, log_stats=False,
        step_rule=args.step_rule, dense_threshold=0, **step_size,
    )  # fmt: skip


def shard_loader(world_size: int, rank: int, global_batch: int) -> torch.utils.data.DataLoader:
    """Rank r of W gets examples r, r+W, …, unshuffled: with local batch G/W, the ranks' batch t
    together are examples [t·G, (t+1)·G), exactly the single-process batch t of size G."""
    dataset = torch.utils.data.TensorDataset(*digits_tensors(limit=512))
    sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=False)
    return torch.utils.data.DataLoader(dataset, batch_size=global_batch // world_size, sampler=sampler)


class AutomaticStepDigits(DigitsModule):
    """step_size='auto' wants SGD(lr=1) without momentum."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class NormalizedStepDigits(DigitsModule):
    """step_size='normalized': the engine's finished steps on the linear layers, AdamW on the LayerNorm."""

    def configure_optimizers(self):
        from lightning_lrkfac.optim import KFACWithAdamW

        return KFACWithAdamW(self.parameters(), lr=0.02, adamw_lr=3e-3, weight_decay=1e-2)


def new_model(step_size: str = "optimizer") -> DigitsModule:
    torch.manual_seed(0)
    module = {"auto": AutomaticStepDigits, "normalized": NormalizedStepDigits}.get(step_size, DigitsModule)
    return module(lr=LR, width=32)


def save(out: Path, rank: int, model: torch.nn.Module, engine: LowRankKFAC | None, **extra) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {"parameters": {name: p.detach().clone() for name, p in model.named_parameters()}, **extra}
    if engine is not None:
        record.update(
            curvature={
                f"{name}.{factor}.{key}": value
                for name, entry in engine.state_dict()["layers"].items()
                for factor in ("A", "B")
                for key, value in entry[factor]["tensors"].items()
            }
            | {
                f"{name}.rule.{key}": value
                for name, entry in engine.state_dict()["layers"].items()
                for key, value in entry["rule"].items()
            },
            owners=engine.assignment.owners,
            world_size=engine.comm.world_size,
            bytes=engine.comm.bytes_by_kind,
            layers=[
                (layer.name, type(layer.a_factor).__name__, type(layer.b_factor).__name__) for layer in engine.layers
            ],
            pending_numel=sum(t.numel() for layer in engine.layers for f in layer.factors for t in f.pending_tensors()),
        )
    torch.save(record, out / f"rank{rank}.pt")


def run_lightning(args: argparse.Namespace) -> None:
    import pytorch_lightning as pl

    from lightning_lrkfac import LowRankKFACCallback

    class Shards(pl.LightningDataModule):
        def train_dataloader(self):
            return shard_loader(self.trainer.world_size, self.trainer.global_rank, args.global_batch)

    pl.seed_everything(0, verbose=False)
    callback = LowRankKFACCallback(**kfac_options(args))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps,
        callbacks=[] if args.plain else [callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    model = new_model(args.step_size)
    trainer.fit(model, Shards())
    save(args.out, trainer.global_rank, model, None if args.plain else callback.engine)


def engine_worker(rank: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    if args.devices > 1:
        dist.init_process_group("gloo", rank=rank, world_size=args.devices)
    model = new_model(args.step_size)
    optimizer = model.configure_optimizers()
    options = kfac_options(args)
    options.pop("log_stats")
    kfac = LowRankKFAC(model, **options)
    kfac.check_optimizer(optimizer)  # KFACWithAdamW learns which parameters take the finished steps
    resumed_equal = None
    if args.resume is not None:  # saved under another world size or work distribution
        saved = torch.load(args.resume)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        kfac.load_state_dict(saved["kfac"])
        resumed_equal = same(kfac.state_dict(), saved["kfac"])
    net = torch.nn.parallel.DistributedDataParallel(model) if args.devices > 1 else model
    batches = iter(shard_loader(args.devices, rank, args.global_batch))
    for _ in range(kfac.steps):  # the batches the saved run had already taken
        next(batches)
    with kfac:
        for step in range(kfac.steps, args.steps):
            x, y = next(batches)
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            kfac.before_backward(loss)  # step_size='auto': G's graphs (a no-op otherwise)
            loss.backward()
            kfac.step(lr=optimizer, loss_closure=lambda x=x, y=y: F.cross_entropy(model(x), y))
            optimizer.step()
            if step + 1 == args.save_at and rank == 0:
                args.out.mkdir(parents=True, exist_ok=True)
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "kfac": kfac.state_dict()}
                torch.save(state, args.out / "checkpoint.pt")
    save(args.out, rank, model, kfac, resumed_equal=resumed_equal, final_loss=float(loss))
    if args.devices > 1:
        # Free DDP's reducer while the process group is still registered: a reducer that holds the
        # last reference destroys the gloo group from a destructor and can deadlock on the GIL.
        del net
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--driver", choices=("lightning", "engine"), default="lightning")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8, help="K-FAC rank (≥ 65: exact mode)")
    parser.add_argument("--work", default="replicate")
    parser.add_argument("--step-rule", default="kfac", choices=("kfac", "ekfac"))
    parser.add_argument("--step-size", default="optimizer", choices=("optimizer", "auto", "normalized"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--plain", action="store_true", help="no callback (plain SGD), to check the harness")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save-at", type=int, default=None, help="engine: save a checkpoint after this many steps")
    parser.add_argument("--resume", type=Path, default=None, help="engine: continue from this checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.driver == "lightning":
        run_lightning(args)
    elif args.devices > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        torch.multiprocessing.spawn(engine_worker, args=(args,), nprocs=args.devices)
    else:
        engine_worker(0, args)


if __name__ == "__main__":
    main()
