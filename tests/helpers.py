"""Test helpers: one preconditioned step through the engine, the dense reference it is compared with,
and the one digits model, loader and quiet Trainer that the Lightning tests share."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.plugins import MixedPrecision
from sklearn.datasets import load_digits

from lightning_lrkfac import LowRankKFAC
from lightning_lrkfac.layers import KFACLayer


def plain_grads(model, x, y, loss_fn=F.cross_entropy) -> list[torch.Tensor]:
    """Every parameter's plain gradient after one forward/backward."""
    model.zero_grad()
    loss_fn(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def kfac_grads(model, x, y, loss_fn=F.cross_entropy, refreshes: int = 1, **options):
    """(gradients after one engine-preconditioned step, the engine); plain PyTorch, no Trainer.

    ``refreshes`` > 1 folds the same batch that many times first (decay keeps the factor
    equal to this batch's statistics); with ``basis_update_interval=1`` the low-rank bases
    then converge on it.
    """
    with LowRankKFAC(model, **options) as kfac:
        for _ in range(refreshes):
            model.zero_grad()
            loss = loss_fn(model(x), y)
            kfac.before_backward()
            loss.backward()
            kfac.step(lr=0.1)
    return [p.grad.detach().clone() for p in model.parameters()], kfac


def linear_io_grads(linears: dict[str, nn.Module], loss_of_forward) -> tuple[dict, dict, list]:
    """(inputs, output gradients, parameter gradients [w, b per layer]) of ``linears`` for one loss.

    ``loss_of_forward()`` runs the model's forward and returns the loss; hooks record each
    layer's input and output, and autograd gives the output gradients: no code under test involved.
    """
    inputs, outputs = {}, {}

    def record(name):
        def hook(module, args, output):
            inputs[name], outputs[name] = args[0], output

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in linears.items()]
    loss = loss_of_forward()
    for hook in hooks:
        hook.remove()
    grads = dict(zip(linears, torch.autograd.grad(loss, [outputs[n] for n in linears], retain_graph=True)))
    params = list(torch.autograd.grad(loss, [p for m in linears.values() for p in (m.weight, m.bias)]))
    return inputs, grads, params


def same(a, b) -> bool:
    """Nested dicts / lists / tuples of tensors and plain values, equal entry by entry (tensors bitwise)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def damped_natural(A: torch.Tensor, B: torch.Tensor, G: torch.Tensor, damping: float) -> torch.Tensor:
    """(B + δ_B I)⁻¹ G (A + δ_A I)⁻¹ with π-damping (δ_A = π√λ, δ_B = √λ/π), by dense solves."""
    pi = ((A.trace() / A.shape[0]) / (B.trace() / B.shape[0])).sqrt()
    left = torch.linalg.solve(B + damping**0.5 / pi * torch.eye(B.shape[0], dtype=B.dtype), G)
    return left @ torch.linalg.inv(A + pi * damping**0.5 * torch.eye(A.shape[0], dtype=A.dtype))


class DigitsModule(pl.LightningModule):
    """64-w-w-10 MLP (LayerNorm before the head) on sklearn's digits, SGD with momentum."""

    def __init__(self, lr: float = 0.05, width: int = 64) -> None:
        super().__init__()
        self.lr = lr
        self.body = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits_tensors(limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    return (x[:limit], y[:limit]) if limit else (x, y)


def digits_loader(batch_size=64, limit=None, shuffle=True):
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*digits_tensors(limit)),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(0),
    )


def quiet_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class GradRecorder(pl.Callback):
    """Records every parameter's gradient as the optimizer sees it (after all earlier callbacks)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def with_ones(x: torch.Tensor) -> torch.Tensor:
    """Rows with the ones column an augmented bias adds to A, on the rows' device."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


def fp16_plugin() -> MixedPrecision:
    """16-mixed on the CPU with a real GradScaler."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


class InfGradAtStep(pl.Callback):
    """Puts an inf into one parameter gradient at a given step (after our statistics are taken)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            pl_module.head.weight.grad[0, 0] = float("inf")


class Scaled(nn.Module):
    """A user's own layer: y = s · x Wᵀ with a fixed scale s (no nn.Linear inside)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 2.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.scale = scale

    def forward(self, x):
        return self.scale * x @ self.weight.T


class ScaledLayer(KFACLayer):
    """K-FAC for :class:`Scaled`: A from s·x (the weight's true input), B from the output gradients."""

    module_type = Scaled

    def __init__(self, name: str, module: Scaled, bias_mode: str = "augment") -> None:
        out_features, in_features = module.weight.shape
        super().__init__(name, module, in_features, out_features, has_bias=False, augment=False)

    def _input_rows(self, inputs):
        return self.module.scale * inputs.reshape(-1, inputs.shape[-1])

    def output_grad_rows(self, grads):
        return grads.reshape(-1, grads.shape[-1])

    def num_samples(self, grads):
        return grads.numel() // grads.shape[-1]
