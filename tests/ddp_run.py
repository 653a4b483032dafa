"""One DDP (or single-process) training run for tests/test_distributed.py; run as a script.

Lightning's "ddp" strategy re-launches this file once per rank (gloo on CPU). Every rank
writes its parameters and the callback's bookkeeping to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

from lightning_lrkfac import LowRankKFACCallback


class DigitsMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class OrderedShards(pl.LightningDataModule):
    """Rank r of W gets examples r, r+W, …, unshuffled: with local batch G/W, the ranks' batch t
    together are examples [t·G, (t+1)·G), exactly the single-process batch t of size G."""

    def __init__(self, global_batch: int) -> None:
        super().__init__()
        self.global_batch = global_batch
        x, y = load_digits(return_X_y=True)
        self.dataset = torch.utils.data.TensorDataset(
            torch.tensor(x[:512] / 16.0, dtype=torch.float32), torch.tensor(y[:512])
        )

    def train_dataloader(self):
        world_size, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = torch.utils.data.DistributedSampler(self.dataset, world_size, rank, shuffle=False)
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.global_batch // world_size, sampler=sampler)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8, help="K-FAC rank (≥ 65: exact mode)")
    parser.add_argument("--work", default="replicate")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--plain", action="store_true", help="no callback (plain SGD), to check the harness")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    callback = LowRankKFACCallback(
        rank=args.rank, oversampling=4, basis_update_interval=2, work_distribution=args.work, log_stats=False
    )
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
    torch.manual_seed(0)
    model = DigitsMLP()
    trainer.fit(model, OrderedShards(args.global_batch))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
            "curvature": {
                f"{name}.{factor}.{key}": value
                for name, entry in callback.state_dict().get("layers", {}).items()
                for factor in ("A", "B")
                for key, value in entry[factor]["tensors"].items()
            },
            "owners": callback.owners,
            "world_size": callback.comm.world_size,
            "bytes": callback.comm.bytes_by_kind,
            "layers": [
                (layer.name, type(layer.a_factor).__name__, type(layer.b_factor).__name__) for layer in callback.layers
            ],
            "pending_numel": sum(
                t.numel() for layer in callback.layers for f in layer.factors for t in f.pending_tensors()
            ),
        },
        args.out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
