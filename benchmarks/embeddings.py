"""Should embeddings be preconditioned by default? Steps and wall time to a next-token test accuracy on
the GPT config (configs/sequences_gpt.yaml: 2 blocks, width 64, generated sequences), with
``precondition_embeddings`` on and off, everything else as in the config; the harness's sweep (one grid point
each, the arms alternating, seeds outside), 3 seeds.

    python -m benchmarks.embeddings [--seeds 3] [--target 0.8]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch

from lightning_lrkfac import LowRankKFACCallback
from lightning_lrkfac.examples.data import ArithmeticSequencesDataModule
from lightning_lrkfac.examples.models import GPTLanguageModel

from .common import device_record, print_table, write_json
from .harness import Method, Run, sweep
from .training import TargetTracker, quiet_trainer, tensors

CALLBACK = dict(rank=16, damping=0.01, basis_update_interval=10, kl_clip=0.001, log_stats=False)
#: The config's SGD rate and momentum; the two arms differ in ``precondition_embeddings`` alone.
METHODS = [
    Method(f"precondition_embeddings={on}", "sgd", 0.9, {**CALLBACK, "precondition_embeddings": on}, ({"lr": 0.3},))
    for on in (False, True)
]


@dataclass(frozen=True)
class SequencesTask:
    """The GPT config on generated arithmetic sequences, next-token test accuracy every 10 steps, 5 epochs."""

    target: float
    name: str = "sequences GPT"

    def run(self, method: Method, config: dict, seed: int, device: torch.device) -> Run:
        data = ArithmeticSequencesDataModule(vocab_size=32, length=17, batch_size=64, seed=seed)
        data.setup("fit")
        test_x, test_y = tensors(data.test_set)
        torch.manual_seed(seed)
        model = GPTLanguageModel(
            vocab_size=32, context=16, width=64, depth=2, heads=4, lr=config["lr"], momentum=method.momentum
        )
        tracker = TargetTracker(test_x, test_y, self.target, every=10)
        callback = LowRankKFACCallback(seed=seed, **method.callback)
        quiet_trainer(accelerator=device.type, max_epochs=5, callbacks=[tracker, callback]).fit(model, data)
        return Run(tracker.history, statistics.median(tracker.seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    task = SequencesTask(args.target)
    result = sweep([task], METHODS, args.seeds, device, target=lambda t, _: t.target)
    rows = [row for method in METHODS for row in result.rows(task.name, method, task.target)]
    print(f"\nsteps and training seconds to {args.target:.0%} next-token test accuracy (median of {args.seeds} seeds):")
    print_table(rows, list(rows[0]))
    write_json("embeddings", {**device_record(device), "target": args.target, "seeds": args.seeds}, rows)


if __name__ == "__main__":
    main()
