"""Should embeddings be preconditioned by default? Steps and wall time to a next-token test accuracy on
the GPT config (configs/sequences_gpt.yaml: 2 blocks, width 64, generated sequences), with
``precondition_embeddings`` on and off, everything else as in the config; arms interleaved, 3 seeds.

    python -m benchmarks.embeddings [--seeds 3] [--target 0.8]
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from lightning_lrkfac import LowRankKFACCallback
from lightning_lrkfac.examples.data import ArithmeticSequencesDataModule
from lightning_lrkfac.examples.models import GPTLanguageModel

from .common import device_record, print_table, write_json
from .training import TargetTracker, quiet_trainer, tensors

CALLBACK = dict(rank=16, damping=0.01, basis_update_interval=10, kl_clip=0.001, log_stats=False)


def one_run(embeddings: bool, seed: int, target: float, device: torch.device) -> dict:
    data = ArithmeticSequencesDataModule(vocab_size=32, length=17, batch_size=64, seed=seed)
    data.setup("fit")
    test_x, test_y = tensors(data.test_set)
    torch.manual_seed(seed)
    model = GPTLanguageModel(vocab_size=32, context=16, width=64, depth=2, heads=4, lr=0.3, momentum=0.9)
    tracker = TargetTracker(test_x, test_y, target, every=10)
    callback = LowRankKFACCallback(precondition_embeddings=embeddings, seed=seed, **CALLBACK)
    quiet_trainer(accelerator=device.type, max_epochs=5, callbacks=[tracker, callback]).fit(model, data)
    return {
        "steps": tracker.steps_to_target or math.inf,
        "seconds": tracker.seconds_to_target or math.inf,
        "final_accuracy": tracker.final,
        "ms_per_step": 1e3 * statistics.median(tracker.seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    results: dict[bool, list[dict]] = {True: [], False: []}
    for seed in range(args.seeds):
        for embeddings in (False, True):  # interleaved
            results[embeddings].append(one_run(embeddings, seed, args.target, device))
    rows = [
        {
            "precondition_embeddings": embeddings,
            "reached": sum(math.isfinite(r["steps"]) for r in runs),
            "median_steps": statistics.median(r["steps"] for r in runs),
            "median_seconds": statistics.median(r["seconds"] for r in runs),
            "median_final_accuracy": statistics.median(r["final_accuracy"] for r in runs),
            "ms_per_step": statistics.median(r["ms_per_step"] for r in runs),
        }
        for embeddings, runs in results.items()
    ]
    print(f"\nsteps and training seconds to {args.target:.0%} next-token test accuracy (median of {args.seeds} seeds):")
    print_table(rows, list(rows[0]))
    meta = {**device_record(device), "target": args.target, "seeds": args.seeds, "runs": results}
    write_json("embeddings", meta, rows)


if __name__ == "__main__":
    main()
