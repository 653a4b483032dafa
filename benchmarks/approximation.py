"""How close the low-rank direction is to exact K-FAC on real layers mid-training, vs rank k.

A digits MLP (64-256-256-10) is trained for two epochs with the callback. Then, with the
parameters frozen (lr = 0), exact K-FAC and low-rank K-FAC at each k see the same 30
batches with the default EMA and refresh schedule. Reported: the cosine similarity of the
final preconditioned gradient to the exact one (per layer and overall) and the share of
tr A captured by the kept eigenpairs.

    python -m benchmarks.approximation
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_lrkfac import LowRankKFACCallback
from lightning_lrkfac.examples.data import DigitsDataModule
from lightning_lrkfac.examples.models import MLPClassifier

from .common import RESULTS, device_record, print_table, pyplot, write_json
from .training import quiet_trainer

RANKS = (2, 4, 8, 16, 32, 64, 128)


class LastGradients(pl.Callback):
    """The gradients as the optimizer would see them (after the K-FAC callback, listed before this one)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {name: p.grad.detach().clone() for name, p in pl_module.named_parameters() if p.grad is not None}


def mid_training_model(data: DigitsDataModule) -> MLPClassifier:
    torch.manual_seed(0)
    model = MLPClassifier(in_features=64, hidden=(256, 256), lr=0.1)
    callback = LowRankKFACCallback(rank=16, damping=1e-2, isotropic_tail=True, log_stats=False)
    quiet_trainer(accelerator="cpu", max_epochs=2, callbacks=[callback]).fit(model, data)
    return model


def directions(model: MLPClassifier, loader, callback: LowRankKFACCallback, steps: int) -> dict[str, torch.Tensor]:
    frozen = MLPClassifier(in_features=64, hidden=(256, 256), lr=0.0, momentum=0.0)
    frozen.load_state_dict(model.state_dict())
    recorder = LastGradients()
    quiet_trainer(accelerator="cpu", max_steps=steps, callbacks=[callback, recorder]).fit(frozen, loader)
    return recorder.grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    data = DigitsDataModule(64)
    data.setup("fit")
    model = mid_training_model(data)
    loader = torch.utils.data.DataLoader(data.train_set, batch_size=64, shuffle=False)  # same batches for all
    options = dict(damping=1e-2, kl_clip=None, log_stats=False)
    exact = directions(model, loader, LowRankKFACCallback(rank=1024, **options), args.steps)
    layers = sorted({name.rsplit(".", 1)[0] for name in exact})
    rows = []
    for tail in (False, True):
        for rank in RANKS:
            callback = LowRankKFACCallback(rank=rank, isotropic_tail=tail, **options)
            got = directions(model, loader, callback, args.steps)
            row: dict = {"k": rank, "isotropic_tail": tail}
            flat = lambda grads: torch.cat([grads[n].flatten() for n in sorted(grads)])  # noqa: E731
            row["cosine"] = float(F.cosine_similarity(flat(got), flat(exact), dim=0))
            for layer in layers:
                names = [n for n in exact if n.startswith(layer + ".")]
                a = torch.cat([got[n].flatten() for n in names])
                b = torch.cat([exact[n].flatten() for n in names])
                row[f"cos_{layer}"] = float(F.cosine_similarity(a, b, dim=0))
            for layer in callback.layers:
                row[f"traceA_{layer.name}"] = float(layer.a_factor.captured_trace())
            rows.append(row)
            print_table([row], list(row))
    print("\ncosine to exact K-FAC and captured share of tr A, digits MLP after 2 epochs:")
    print_table(rows, list(rows[0]))
    write_json("approximation", {**device_record(torch.device("cpu")), "steps": args.steps}, rows)
    plt = pyplot()
    if plt is not None:
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for tail in (False, True):
            sel = [r for r in rows if r["isotropic_tail"] == tail]
            axes[0].plot([r["k"] for r in sel], [r["cosine"] for r in sel], marker="o", label=f"isotropic_tail={tail}")
        for key in [k for k in rows[0] if k.startswith("traceA_")]:
            sel = [r for r in rows if not r["isotropic_tail"]]
            axes[1].plot([r["k"] for r in sel], [r[key] for r in sel], marker="o", label=key[7:])
        axes[0].set(xscale="log", xlabel="rank k", ylabel="cosine to exact K-FAC", title="preconditioned direction")
        axes[1].set(xscale="log", xlabel="rank k", ylabel="captured share of tr A", title="A factors")
        for ax in axes:
            ax.legend()
        figure.tight_layout()
        figure.savefig(RESULTS / "approximation.png", dpi=120)


if __name__ == "__main__":
    main()
