"""Trainer step time with the callback vs plain SGD on the same model and batches, side by side.

Factors are updated every step and bases refreshed every 10 (the defaults). Models: MLP on
mnist1d, a small CNN on 8×8 digits images, a GPT-style language model (2 blocks, width 64,
embeddings preconditioned too) on generated token sequences, and, on a GPU, a 4-block
width-256 GPT on 64-token sequences and ResNet-18 on synthetic 32×32 batches (torchvision).

    python -m benchmarks.step_overhead [--quick]
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch

from lightning_lrkfac import LowRankKFACCallback
from lightning_lrkfac.examples.data import ArithmeticSequencesDataModule, DigitsDataModule, MNIST1DDataModule
from lightning_lrkfac.examples.models import CNNClassifier, GPTLanguageModel, MLPClassifier, ResNet18Classifier

from .common import RESULTS, device_record, print_table, pyplot, write_json
from .training import StepTimer, quiet_trainer


def synthetic_cifar(batches: int, batch_size: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (batches * batch_size,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def cases(device: torch.device, quick: bool):
    """(name, model factory, data (module or loader), callback options)."""
    yield "mlp-mnist1d", lambda: MLPClassifier(in_features=40, hidden=(256, 256)), MNIST1DDataModule(128), {}
    yield "cnn-digits", lambda: CNNClassifier(), DigitsDataModule(64, as_images=True), {}
    embeddings = {"precondition_embeddings": True}
    yield "gpt-w64-sequences", lambda: GPTLanguageModel(), ArithmeticSequencesDataModule(), embeddings
    if device.type == "cuda" and not quick:
        gpt = partial(GPTLanguageModel, vocab_size=256, context=64, width=256, depth=4, heads=8)
        sequences = ArithmeticSequencesDataModule(vocab_size=256, length=65, num_sequences=20000)
        yield "gpt-w256-sequences", gpt, sequences, embeddings
        try:
            ResNet18Classifier()
        except ImportError:
            return
        yield "resnet18-synthetic32", lambda: ResNet18Classifier(), synthetic_cifar(60, 128), {}


def time_steps(model_factory, data, device, callback, steps: int) -> float:
    torch.manual_seed(0)
    timer = StepTimer()
    trainer = quiet_trainer(
        accelerator=device.type, max_steps=steps, callbacks=[timer] + ([callback] if callback else [])
    )
    trainer.fit(model_factory(), data)
    return statistics.median(timer.seconds[10:])  # the first steps are warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = 40 if args.quick else 120
    rows = []
    for name, model_factory, data, options in cases(device, args.quick):
        # Interleave the two arms so that drifts in machine load hit both.
        sgd, kfac = [], []
        for _ in range(2 if args.quick else 3):
            sgd.append(time_steps(model_factory, data, device, None, steps))
            callback = LowRankKFACCallback(rank=32, log_stats=False, **options)
            kfac.append(time_steps(model_factory, data, device, callback, steps))
        row = {
            "model": name,
            "sgd_ms": 1e3 * statistics.median(sgd),
            "kfac_ms": 1e3 * statistics.median(kfac),
        }
        row["ratio"] = row["kfac_ms"] / row["sgd_ms"]
        rows.append(row)
        print_table([row], list(row))
    print("\nstep time, median over steps and repeats:")
    print_table(rows, list(rows[0]))
    write_json("step_overhead", {**device_record(device), "steps": steps}, rows)
    plt = pyplot()
    if plt is not None:
        figure, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([r["model"] for r in rows], [r["ratio"] for r in rows])
        ax.axhline(1.3, color="k", ls="--", label="target 1.3×")
        ax.set(ylabel="step time / SGD step time", title=f"callback overhead ({device_record(device)['device']})")
        ax.legend()
        figure.tight_layout()
        figure.savefig(RESULTS / "step_overhead.png", dpi=120)


if __name__ == "__main__":
    main()
