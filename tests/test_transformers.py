"""Transformers: Linear layers shared over positions (K-FAC-expand / -reduce), attention, coverage."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_lrkfac import LowRankKFACCallback
from lightning_lrkfac.examples.data import ArithmeticSequencesDataModule

from .helpers import damped_natural, kfac_grads, linear_io_grads, plain_grads, quiet_trainer, with_ones


class TinyEncoder(nn.Module):
    """Embedding-free encoder layer on (batch, positions, features) with a per-position head."""

    def __init__(self, width: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=10, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.layer(x))


def token_loss(logits, y):
    """Mean over every (example, position): a token-level loss such as a language model's."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def dense_reference(model: TinyEncoder, x, y, damping: float, sharing: str) -> dict[str, torch.Tensor]:
    """Dense K-FAC for the encoder's Linear layers, built by flattening (expand) or reducing positions."""
    linears = {"layer.linear1": model.layer.linear1, "layer.linear2": model.layer.linear2, "head": model.head}
    inputs, grads, param_grads = linear_io_grads(linears, lambda: token_loss(model(x), y))
    n, r = x.shape[:2]
    expected = {}
    for i, name in enumerate(linears):
        a, g = inputs[name], grads[name] * (n * r)  # per-token gradients of the token-mean loss
        if sharing == "expand":
            a, g = a.reshape(n * r, -1), g.reshape(n * r, -1)
        else:  # reduce: mean of inputs and sum of per-example gradients over the positions
            a, g = a.mean(1), (grads[name] * n).sum(1)
        a = with_ones(a)
        A, B = a.T @ a / a.shape[0], g.T @ g / g.shape[0]
        P = damped_natural(A, B, torch.cat([param_grads[2 * i], param_grads[2 * i + 1][:, None]], 1), damping)
        expected[f"{name}.weight"], expected[f"{name}.bias"] = P[:, :-1], P[:, -1]
    return expected


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_exact_mode_on_an_encoder_layer_matches_flattened_and_reduced_references(sharing):
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model, x, y = TinyEncoder(), torch.randn(4, 5, 6), torch.randint(0, 3, (4, 5))
        expected = dense_reference(model, x, y, 1e-2, sharing)
        names = [n for n, _ in model.named_parameters()]
        plain = dict(zip(names, plain_grads(model, x, y, token_loss)))
        grads, kfac = kfac_grads(model, x, y, token_loss, rank=64, damping=1e-2, kl_clip=None, weight_sharing=sharing)
        got = dict(zip(names, grads))
    finally:
        torch.set_default_dtype(torch.float32)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-12, msg=name)
    # Attention (in_proj as a raw parameter, out_proj used functionally) and norms keep the plain gradient.
    for name in ("layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight", "layer.norm1.weight"):
        torch.testing.assert_close(got[name], plain[name], rtol=0, atol=0)
    reason = "weight used functionally by nn.MultiheadAttention"
    assert kfac.skipped_modules == {
        "layer.self_attn": "nn.MultiheadAttention (precondition_attention=False)",
        "layer.self_attn.out_proj": reason,
    }


def test_expand_and_reduce_differ():
    torch.manual_seed(0)
    model, x, y = TinyEncoder(), torch.randn(4, 5, 6), torch.randint(0, 3, (4, 5))
    results = [
        kfac_grads(model, x, y, token_loss, rank=64, kl_clip=None, weight_sharing=s)[0] for s in ("expand", "reduce")
    ]
    assert not torch.allclose(results[0][-2], results[1][-2], rtol=1e-3)


class FunctionalLinear(nn.Module):
    """A Linear whose weight is used through F.linear: its own forward never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.inner.weight, self.inner.bias)))


def test_layer_used_only_functionally_keeps_its_plain_gradient_and_others_are_preconditioned():
    torch.manual_seed(0)
    model, x, y = FunctionalLinear(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    plain = plain_grads(model, x, y)
    got, kfac = kfac_grads(model, x, y, rank=64, kl_clip=None)
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0)  # inner.weight: no statistics, plain
    assert not torch.allclose(got[2], plain[2])  # head: preconditioned
    assert not kfac.layers[0].ready and kfac.layers[1].ready


class TinyLM(pl.LightningModule):
    """GPT-style: token + position embeddings, one causal encoder layer, tied-free output head."""

    def __init__(self, vocab: int = 16, width: int = 32, length: int = 12) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.block = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.out = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, tokens):
        h = self.tokens(tokens) + self.positions.weight[: tokens.shape[1]]
        return self.out(self.block(h, src_mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True))

    def training_step(self, batch, batch_idx):
        tokens, next_tokens = batch
        return token_loss(self(tokens), next_tokens)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_small_transformer_language_model_trains_with_the_callback():
    torch.manual_seed(0)
    sequences = ArithmeticSequencesDataModule(vocab_size=16, length=13, num_sequences=640, max_step=3, noise=0.0)
    sequences.setup()
    data = sequences.train_set
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = TinyLM()
    with torch.no_grad():
        before = float(model.training_step(data.tensors, 0))
    callback = LowRankKFACCallback(rank=16, dense_threshold=0, damping=1e-2)
    quiet_trainer(max_epochs=4, callbacks=[callback]).fit(model, loader)
    with torch.no_grad():
        after = float(model.training_step(data.tensors, 0))
    assert after < 0.5 * before, (before, after)
    assert int(callback.engine.skipped_updates) == 0
    rows = {row["parameter"]: row for row in callback.engine.coverage}
    assert rows["out.weight"]["preconditioned"] and rows["block.linear1.weight"]["preconditioned"]
    assert rows["out.weight"]["how"] == "K-FAC Linear (expand), A rank 16/33, B dense 16"
    assert rows["out.bias"]["how"] == rows["out.weight"]["how"] + ", bias augmented"
    assert not rows["block.self_attn.out_proj.weight"]["preconditioned"]
    assert "used functionally" in rows["block.self_attn.out_proj.weight"]["how"]
    assert (
        rows["tokens.weight"]["preconditioned"] and not rows["block.norm1.weight"]["preconditioned"]
    )  # embeddings: default
