"""LightningModules for the examples and configs: an MLP, a small 2D and a 1D CNN, a CIFAR ResNet-18,
a small GPT-style language model and an MLP autoencoder.

They are ordinary models (cross-entropy with torchmetrics accuracy, or MSE for the
autoencoder; SGD or Adam; the language model classifies every next token): the callback
needs nothing from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..optim import KFACWithAdamW
from .optim import MuonWithAdamW

OPTIMIZERS = ("sgd", "adam", "adamw", "muon", "kfac-adamw")


class Trainable(pl.LightningModule):
    """``self.net`` trained by SGD (with momentum, possibly 0), Adam, AdamW, Muon on the hidden matrices with AdamW
    (at ``adamw_lr``) on the rest, or ``kfac-adamw``: the callback's finished steps (``step_size: normalized``) with
    AdamW (at ``adamw_lr``) on what it does not handle; a subclass defines ``_shared_step``."""

    def __init__(self, lr: float, momentum: float, weight_decay: float, optimizer: str, adamw_lr: float = 3e-3) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.lr, self.momentum, self.weight_decay, self.optimizer_name = lr, momentum, weight_decay, optimizer
        self.adamw_lr = adamw_lr
        self.net: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _shared_step(self, batch, split: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def hidden_matrices(self) -> list[nn.Parameter]:
        """Muon's parameters: the 2-D weights of every nn.Linear but the last (the output head)."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        return [m.weight for m in linears[:-1]]

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "muon":
            matrices = self.hidden_matrices()
            ids = {id(m) for m in matrices}
            others = [p for p in self.parameters() if id(p) not in ids]
            return MuonWithAdamW(matrices, others, lr=self.lr, adamw_lr=self.adamw_lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "kfac-adamw":
            return KFACWithAdamW(self.parameters(), lr=self.lr, adamw_lr=self.adamw_lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


class Classifier(Trainable):
    """Cross-entropy classifier around ``self.net``; logs loss and accuracy per split.

    Logits (batch, …, classes) and targets (batch, …) are flattened: a sequence model's loss
    is the mean over every position.
    """

    def __init__(
        self, num_classes: int, lr: float, momentum: float, weight_decay: float, optimizer: str, adamw_lr: float = 3e-3
    ) -> None:
        super().__init__(lr, momentum, weight_decay, optimizer, adamw_lr)
        self.accuracy = nn.ModuleDict(
            {f"{split}_acc": MulticlassAccuracy(num_classes) for split in ("train", "val", "test")}
        )

    def _shared_step(self, batch, split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        loss = F.cross_entropy(logits, y)
        accuracy = self.accuracy[f"{split}_acc"]
        accuracy(logits, y)
        on_step = split == "train"
        self.log(f"{split}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=split != "test")
        self.log(f"{split}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=split != "train")
        return loss


class MLPClassifier(Classifier):
    """Fully connected network: in_features → hidden… → num_classes, ReLU between."""

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (256, 256),
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__(num_classes, lr, momentum, weight_decay, optimizer)
        self.save_hyperparameters()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)


class CNNClassifier(Classifier):
    """3×3 conv blocks and a linear head, for 1D or 2D inputs reshaped to images. Each block is conv-ReLU-maxpool, or
    with ``strides`` given, a conv of that stride and ReLU (no pooling)."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        channels: Sequence[int] = (32, 64),
        num_classes: int = 10,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
        strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__(num_classes, lr, momentum, weight_decay, optimizer)
        self.save_hyperparameters()
        if strides is not None and len(strides) != len(channels):
            raise ValueError(f"`strides` must give one stride per conv ({len(channels)}), got {list(strides)}")
        layers: list[nn.Module] = []
        size, previous = image_size, in_channels
        for index, width in enumerate(channels):
            if strides is None:
                layers += [nn.Conv2d(previous, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
                size, previous = size // 2, width
                continue
            layers += [nn.Conv2d(previous, width, 3, stride=strides[index], padding=1), nn.ReLU()]
            size, previous = (size - 1) // strides[index] + 1, width
        layers += [nn.Flatten(), nn.Linear(previous * size * size, num_classes)]
        self.net = nn.Sequential(*layers)


class Conv1dClassifier(Classifier):
    """1D CNN for signals (batch, length): conv-ReLU-maxpool blocks (same padding), then ``hidden`` linear-ReLU
    layers (none by default) and a linear head."""

    def __init__(
        self,
        length: int = 40,
        channels: Sequence[int] = (32, 64),
        kernel_size: int = 5,
        num_classes: int = 10,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
        hidden: Sequence[int] = (),
    ) -> None:
        super().__init__(num_classes, lr, momentum, weight_decay, optimizer)
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Unflatten(1, (1, length))]
        size, previous = length, 1
        for width in channels:
            layers += [nn.Conv1d(previous, width, kernel_size, padding=kernel_size // 2), nn.ReLU(), nn.MaxPool1d(2)]
            size, previous = size // 2, width
        layers.append(nn.Flatten())
        previous *= size
        for width in hidden:
            layers += [nn.Linear(previous, width), nn.ReLU()]
            previous = width
        layers.append(nn.Linear(previous, num_classes))
        self.net = nn.Sequential(*layers)


class DepthwiseCNNClassifier(Classifier):
    """MobileNet-style CNN: a 3×3 stem, then blocks of depthwise 3×3 + pointwise 1×1 convolutions
    with batch norm and a residual connection (stride 2 between widths), pooling and a linear head."""

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        num_classes: int = 10,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__(num_classes, lr, momentum, weight_decay, optimizer)
        self.save_hyperparameters()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
        ]
        for previous, width in zip(widths, widths[1:]):
            layers += [DepthwiseSeparableBlock(previous), nn.Conv2d(previous, width, 1, stride=2, bias=False)]
        layers += [DepthwiseSeparableBlock(widths[-1]), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)


class DepthwiseSeparableBlock(nn.Module):
    """x + BN(pointwise(ReLU(BN(depthwise(x))))), then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm1, self.norm2 = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.norm2(self.pointwise(torch.relu(self.norm1(self.depthwise(x))))))


def require_torchvision():
    """Import torchvision or explain how to get it (the optional ``vision`` extra)."""
    try:
        import torchvision
    except Exception as error:  # ImportError, or a torchvision built for another torch
        raise ImportError(
            "The CIFAR-10 example needs torchvision matching your torch: `pip install -e .[vision]` "
            f"(or the torchvision release for your torch). Import failed with: {error}"
        ) from error
    return torchvision


class ResNet18Classifier(Classifier):
    """torchvision ResNet-18 with the CIFAR stem (3×3 conv, no max-pool). Needs the ``vision`` extra."""

    def __init__(
        self,
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__(num_classes, lr, momentum, weight_decay, optimizer)
        self.save_hyperparameters()
        net = require_torchvision().models.resnet18(num_classes=num_classes)
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.net = net


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with its projections as ``nn.Linear`` modules (nanoGPT's layout),
    so each projection's own forward runs and K-FAC can precondition it."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"`width` ({width}) must be divisible by `heads` ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, width))


class GPTBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x)) with a 4× GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPTLanguageModel(Classifier):
    """Small GPT-style causal language model: token and position embeddings, pre-norm blocks,
    final LayerNorm and a linear head over the vocabulary (optionally tied to the token embedding).

    Batches are (tokens, next tokens), both (batch, length) with length ≤ ``context``.
    """

    def __init__(
        self,
        vocab_size: int = 32,
        context: int = 16,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        tie_weights: bool = False,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
        adamw_lr: float = 3e-3,
    ) -> None:
        super().__init__(vocab_size, lr, momentum, weight_decay, optimizer, adamw_lr)
        self.save_hyperparameters()
        self.context = context
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[GPTBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.tokens.weight
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        """nanoGPT's initialisation: N(0, 0.02) weights and embeddings, zero biases, the residual projections
        scaled by 1/√(2·depth). (PyTorch's N(0, 1) embeddings make a tied head's logits so large that the softmax
        gradients underflow to subnormal floats, which slow CPU matmuls some 50×.)"""
        for name, parameter in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(parameter)
            elif parameter.dim() == 2:
                residual = name.endswith(("attention.proj.weight", "mlp.2.weight"))
                nn.init.normal_(parameter, std=0.02 / (2 * depth) ** 0.5 if residual else 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        if length > self.context:
            raise ValueError(f"sequence length {length} exceeds the model's context {self.context}")
        # Positions per example (not broadcast over the batch), so each position has its own gradient.
        positions = torch.arange(length, device=tokens.device).expand(batch, length)
        hidden = self.blocks(self.tokens(tokens) + self.positions(positions))
        return self.head(self.norm(hidden))

    def hidden_matrices(self) -> list[nn.Parameter]:
        """Muon's parameters: the blocks' 2-D weights (attention and MLP); embeddings and head go to AdamW."""
        return [p for p in self.blocks.parameters() if p.dim() == 2]


class MLPAutoencoder(Trainable):
    """Deep fully connected autoencoder (ReLU) trained on MSE reconstruction: a regression loss.

    Batches are (x, label); the label is ignored. ``test_mse`` is logged per split.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (128, 32, 8, 32, 128),
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__(lr, momentum, weight_decay, optimizer)
        self.save_hyperparameters()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], in_features))
        self.net = nn.Sequential(*layers)

    def _shared_step(self, batch, split: str) -> torch.Tensor:
        x = batch[0]
        loss = F.mse_loss(self(x), x)
        self.log(f"{split}_mse", loss, on_step=split == "train", on_epoch=True, prog_bar=True)
        return loss
