"""How close the shipped low-rank direction is to exact K-FAC in a running training, against the best
a rank-k truncation of the same factors could do.

A digits MLP (64-256-256-10) trains with SGD + momentum on its plain gradients for ``--steps``
steps. Alongside, engines observe every batch (the same captured rows): one in exact mode
(dense factors) and one per rank k (the shipped path: sketches, warm-started Nyström refresh
every 10 steps). Every 10 steps each engine's preconditioned gradient is compared with the
exact one (cosine over all layers): the curve from a cold start to steady state. At the end
the exact engine's own EMA factors are truncated by hand in float64 (A → top-k eigenpairs,
B → algebraic top-k of B − diag B, plus diag B; π-damping from the exact traces) and that
direction is compared too: the shipped path should come within 0.01 of it.

    python -m benchmarks.approximation [--steps 300]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_lrkfac import LowRankKFAC

from .common import RESULTS, device_record, print_table, pyplot, write_json

RANKS = (8, 16, 32, 64)
DAMPINGS = (1e-2, 1e-3)


def truncated_direction(kfac: LowRankKFAC, damping: float, rank: int) -> torch.Tensor:
    """(B_k + δ_B)⁻¹ G (A_k + δ_A)⁻¹ from the exact engine's dense EMA factors by dense float64 algebra,
    flat in ``model.parameters()`` order (weight, then bias, per layer)."""
    directions = []
    for layer in kfac.layers:
        a, b = layer.a_factor.matrix.double(), layer.b_factor.matrix.double()
        values, vectors = torch.linalg.eigh(a)
        top = values.argsort(descending=True)[:rank]
        a_k = (vectors[:, top] * values[top]) @ vectors[:, top].T
        diag = torch.diag(torch.diagonal(b))
        values, vectors = torch.linalg.eigh(b - diag)
        top = values.argsort(descending=True)[:rank]
        b_k = (vectors[:, top] * values[top]) @ vectors[:, top].T + diag
        pi = ((torch.trace(a) / a.shape[0]) / (torch.trace(b) / b.shape[0])).sqrt()
        module = layer.module
        gradient = torch.cat([module.weight.grad, module.bias.grad[:, None]], 1).double()
        left = torch.linalg.solve(b_k + damping**0.5 / pi * torch.eye(b.shape[0], dtype=b.dtype), gradient)
        natural = left @ torch.linalg.inv(a_k + pi * damping**0.5 * torch.eye(a.shape[0], dtype=a.dtype))
        directions += [natural[:, :-1].flatten(), natural[:, -1]]
    return torch.cat(directions)


def run(damping: float, steps: int) -> tuple[list[dict], list[dict]]:
    """``steps`` + 1 steps, so that the last one refreshes every engine (steps a multiple of 10)."""
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    data = torch.utils.data.TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = dict(damping=damping, kl_clip=None, basis_update_interval=10)
    engines = {"exact": LowRankKFAC(model, rank=1024, **options)}
    engines.update({rank: LowRankKFAC(model, rank=rank, **options) for rank in RANKS})
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = (batch for _ in range(steps + 1) for batch in loader)
    parameters, curve = list(model.parameters()), []
    for step in range(steps + 1):
        x_batch, y_batch = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x_batch), y_batch).backward()
        plain = [p.grad.clone() for p in parameters]
        directions = {}
        for name, engine in engines.items():  # every engine preconditions the same plain gradient
            for p, g in zip(parameters, plain):
                p.grad.copy_(g)
            engine.step()
            directions[name] = torch.cat([p.grad.flatten() for p in parameters]).double()
        for p, g in zip(parameters, plain):  # train on the plain gradient: the engines only observe
            p.grad.copy_(g)
        if step % 10 == 0:
            row = {"damping": damping, "step": step}
            for rank in RANKS:
                row[f"k={rank}"] = float(F.cosine_similarity(directions[rank], directions["exact"], dim=0))
            curve.append(row)
        if step < steps:
            optimizer.step()
    steady = []
    for rank in RANKS:
        truncated = truncated_direction(engines["exact"], damping, rank)
        row = {
            "damping": damping,
            "k": rank,
            "shipped": float(F.cosine_similarity(directions[rank], directions["exact"], dim=0)),
            "truncation": float(F.cosine_similarity(truncated, directions["exact"], dim=0)),
        }
        row["gap"] = row["truncation"] - row["shipped"]
        steady.append(row)
    full = truncated_direction(engines["exact"], damping, 1024)  # no truncation: must equal the exact engine
    assert float(F.cosine_similarity(full, directions["exact"], dim=0)) > 1 - 1e-6, "reference disagrees"
    for engine in engines.values():
        engine.close()
    return curve, steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="a multiple of 10 (the refresh interval)")
    args = parser.parse_args()
    curves, steady = [], []
    for damping in DAMPINGS:
        curve, rows = run(damping, args.steps)
        curves += curve
        steady += rows
        print_table(rows, list(rows[0]))
    print(f"\ncosine to exact K-FAC after {args.steps} steps: shipped low-rank path vs exact top-k truncation:")
    print_table(steady, list(steady[0]))
    write_json("approximation", {**device_record(torch.device("cpu")), "steps": args.steps, "curve": curves}, steady)
    plt = pyplot()
    if plt is not None:
        figure, axes = plt.subplots(1, len(DAMPINGS), figsize=(5 * len(DAMPINGS), 3.8))
        for ax, damping in zip(axes, DAMPINGS):
            sel = [r for r in curves if r["damping"] == damping]
            for rank in RANKS:
                line = ax.plot([r["step"] for r in sel], [r[f"k={rank}"] for r in sel], label=f"shipped k={rank}")
                truncation = next(r["truncation"] for r in steady if r["damping"] == damping and r["k"] == rank)
                ax.axhline(truncation, ls="--", color=line[0].get_color(), lw=0.8)
            ax.set(xlabel="training step (cold start at 0)", ylabel="cosine to exact K-FAC", title=f"λ = {damping:g}")
        axes[0].legend(title="dashed: top-k truncation at the end", fontsize=8)
        figure.tight_layout()
        figure.savefig(RESULTS / "approximation.png", dpi=120)


if __name__ == "__main__":
    main()
