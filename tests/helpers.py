"""Drive the callback's hooks for one optimizer step without a Trainer, and the dense reference
it is compared with (for exact comparisons)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


class _Module(torch.nn.Module):
    """Wraps a plain model in what the callback's setup() inspects."""

    automatic_optimization = True

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net


def fake_trainer(global_step: int = 0, accumulate: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=global_step,
        accumulate_grad_batches=accumulate,
        precision_plugin=SimpleNamespace(),
        optimizers=[object()],
    )


def run_one_step(callback, model, x, y, loss_fn=F.cross_entropy, refreshes: int = 1):
    """Gradients after one forward/backward, preconditioned by ``callback`` if given.

    ``refreshes`` > 1 folds the same batch that many times first (decay keeps the factor
    equal to this batch's statistics), so the low-rank bases converge on it.
    """
    model.zero_grad()
    if callback is None:
        loss_fn(model(x), y).backward()
        return [p.grad.detach().clone() for p in model.parameters()]
    wrapper = _Module(model)
    trainer = fake_trainer()
    callback.setup(trainer, wrapper, "fit")
    callback.on_fit_start(trainer, wrapper)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(refreshes):
        model.zero_grad()
        callback.on_train_batch_start(trainer, wrapper, None, 0)
        loss = loss_fn(model(x), y)
        callback.on_before_backward(trainer, wrapper, loss)
        loss.backward()
        callback.on_after_backward(trainer, wrapper)
        callback.on_before_optimizer_step(trainer, wrapper, optimizer)
    callback.teardown(trainer, wrapper, "fit")
    return [p.grad.detach().clone() for p in model.parameters()]


def damped_natural(A: torch.Tensor, B: torch.Tensor, G: torch.Tensor, damping: float) -> torch.Tensor:
    """(B + δ_B I)⁻¹ G (A + δ_A I)⁻¹ with π-damping (δ_A = π√λ, δ_B = √λ/π), by dense solves."""
    pi = ((A.trace() / A.shape[0]) / (B.trace() / B.shape[0])).sqrt()
    left = torch.linalg.solve(B + damping**0.5 / pi * torch.eye(B.shape[0], dtype=B.dtype), G)
    return left @ torch.linalg.inv(A + pi * damping**0.5 * torch.eye(A.shape[0], dtype=A.dtype))
