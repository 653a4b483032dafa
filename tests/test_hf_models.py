"""Hugging Face models as people use them: GPT-2's transposed ``Conv1D``, a user-registered module type, and
coverage and a few training steps with the callback's defaults on tiny random GPT-2, Llama, BERT and T5."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers import logging as hf_logging
from transformers.pytorch_utils import Conv1D

from lightning_lrkfac import LowRankKFAC, LowRankKFACCallback
from lightning_lrkfac.layers import LAYER_TYPES, register_layer_type

from .helpers import Scaled, ScaledLayer, damped_natural, kfac_grads, plain_grads, quiet_trainer, with_ones

hf_logging.set_verbosity_error()


def token_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class Conv1DNet(nn.Module):
    """HF Conv1D layers on (batch, positions, features), or the same net written with nn.Linear."""

    def __init__(self, width: int, linear: bool = False) -> None:
        super().__init__()
        make = (lambda i, o: nn.Linear(i, o)) if linear else (lambda i, o: Conv1D(o, i))
        self.first, self.middle, self.second = make(5, width), make(width, width), make(width, 3)

    def forward(self, x):
        return self.second(torch.tanh(self.middle(torch.tanh(self.first(x)))))


def as_linear(model: Conv1DNet, width: int) -> Conv1DNet:
    twin = Conv1DNet(width, linear=True)
    with torch.no_grad():
        for conv, linear in zip(model.children(), twin.children()):
            linear.weight.copy_(conv.weight.T)
            linear.bias.copy_(conv.bias)
    return twin


def test_conv1d_in_exact_mode_matches_a_dense_reference():
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model, x, y = Conv1DNet(6), torch.randn(4, 3, 5), torch.randint(0, 3, (4, 3))
        inputs = model.middle(model.first(x).tanh()).tanh().reshape(-1, 6)
        plain = plain_grads(model, x, y, token_loss)
        logits = model(x)
        grad = torch.autograd.grad(token_loss(logits, y), logits)[0].reshape(-1, 3) * 12  # per-token gradients
        a, b = with_ones(inputs), grad
        expected = damped_natural(a.T @ a / 12, b.T @ b / 12, torch.cat([plain[4].T, plain[5][:, None]], 1), 1e-2)
        got, kfac = kfac_grads(model, x, y, token_loss, rank=64, damping=1e-2, kl_clip=None)
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(got[4], expected[:, :-1].T, rtol=1e-10, atol=1e-12)  # weight stored (in, out)
    torch.testing.assert_close(got[5], expected[:, -1], rtol=1e-10, atol=1e-12)
    rows = {row["parameter"]: row for row in kfac.coverage}
    assert rows["first.weight"]["how"].startswith("K-FAC Conv1D, transposed Linear (expand), A dense 6, B dense 6")


@pytest.mark.parametrize("width", [16, 512])
def test_conv1d_steps_like_the_same_net_of_linear_layers(width):
    """Low-rank mode, at a width where the first layer takes the in-place step (512: a transposed gradient view)."""
    torch.manual_seed(0)
    model, x, y = Conv1DNet(width), torch.randn(8, 4, 5), torch.randint(0, 3, (8, 4))
    twin = as_linear(model, width)
    options = dict(rank=4, kl_clip=1e-3, refreshes=3, basis_update_interval=1)
    got, kfac = kfac_grads(model, x, y, token_loss, **options)
    expected, _ = kfac_grads(twin, x, y, token_loss, **options)
    assert kfac.rules[1].fusable == (width == 512)
    for conv_grad, linear_grad in zip(got, expected):
        torch.testing.assert_close(
            conv_grad, linear_grad.T if conv_grad.dim() == 2 else linear_grad, rtol=1e-4, atol=1e-6
        )


class StackedConv1D(Conv1D):
    """A Conv1D subclass holding a 3-D weight (heads × in × out): not a Linear, so it keeps its plain gradient."""

    def __init__(self) -> None:
        super().__init__(3, 5)
        self.weight = nn.Parameter(torch.randn(2, 5, 3) * 0.1)

    def forward(self, x):
        return torch.einsum("bi,hio->bo", x, self.weight) + self.bias


def test_conv1d_whose_weight_is_not_2d_keeps_the_plain_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), StackedConv1D())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    plain = plain_grads(model, x, y)
    got, kfac = kfac_grads(model, x, y, rank=64, kl_clip=None)
    torch.testing.assert_close(got[2], plain[2], rtol=0, atol=0)
    assert kfac.skipped_modules == {"2": "Conv1D whose weight is not 2-D (shape (2, 5, 3)): not handled"}
    assert not torch.allclose(got[0], plain[0])


def test_a_registered_user_layer_type_is_preconditioned_exactly():
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(Scaled(4, 6), nn.Tanh(), nn.Linear(6, 3))
        x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        with pytest.raises(ValueError, match="found nothing to precondition"):
            LowRankKFAC(nn.Sequential(Scaled(4, 6)))
        register_layer_type(ScaledLayer)
        try:
            a = 2.0 * x
            out = model[0](x)
            grad = torch.autograd.grad(F.cross_entropy(model[2](torch.tanh(out)), y), out)[0] * 10
            plain = plain_grads(model, x, y)
            expected = damped_natural(a.T @ a / 10, grad.T @ grad / 10, plain[0], 1e-2)
            got, kfac = kfac_grads(model, x, y, rank=64, damping=1e-2, kl_clip=None)
        finally:
            LAYER_TYPES.remove(ScaledLayer)
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(got[0], expected, rtol=1e-10, atol=1e-12)
    assert [type(layer).__name__ for layer in kfac.layers] == ["ScaledLayer", "LinearLayer"]
    with pytest.raises(TypeError, match="takes a subclass of KFACLayer"):
        register_layer_type(Scaled)


# -- tiny random Hugging Face models -------------------------------------------------------------------------
VOCAB = 128


def tiny(name: str) -> nn.Module:
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4))
    if name == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32,
        )  # fmt: skip
        return LlamaForCausalLM(config)
    if name == "bert":
        config = BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=32, num_labels=4,
        )  # fmt: skip
        return BertForSequenceClassification(config)
    config = T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


class HFModule(pl.LightningModule):
    """A Hugging Face model in a LightningModule: its own loss (or cross-entropy on 4 labels for BERT), SGD."""

    def __init__(self, name: str, lr: float = 0.02) -> None:
        super().__init__()
        self.name, self.lr = name, lr
        self.model = tiny(name)

    def loss(self, batch):
        tokens, labels = batch
        if self.name == "bert":
            return F.cross_entropy(self.model(input_ids=tokens).logits, labels)
        targets = tokens.flip(1) if self.name == "t5" else tokens
        return self.model(input_ids=tokens, labels=targets).loss

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


MODELS = ["gpt2", "llama", "bert", "t5"]


@pytest.mark.parametrize("name", MODELS)
def test_coverage_of_tiny_hugging_face_models_is_at_least_95_percent(name):
    torch.manual_seed(0)
    with LowRankKFAC(tiny(name)) as kfac:
        rows = kfac.coverage
    share = sum(r["numel"] for r in rows if r["preconditioned"]) / sum(r["numel"] for r in rows)
    assert share >= 0.95, kfac.coverage_report()
    if name in ("gpt2", "t5"):  # the tied token embedding is one block with the LM head
        tied = rows[0] if name == "gpt2" else next(r for r in rows if r["parameter"] == "shared.weight")
        assert tied["preconditioned"] and "tied to nn.Embedding" in tied["how"], tied


@pytest.mark.parametrize("name", MODELS)
def test_callback_defaults_train_tiny_hugging_face_models_below_plain_sgd(name):
    """30 steps on one fixed batch (random tokens, BERT: random labels of 4 classes), SGD+momentum at lr 0.02."""
    generator = torch.Generator().manual_seed(2)  # a draw where BERT diverged with the earlier default damping 1e-3
    batch = (torch.randint(0, VOCAB, (16, 24), generator=generator), torch.randint(0, 4, (16,), generator=generator))
    repeated = torch.utils.data.TensorDataset(batch[0].repeat(30, 1), batch[1].repeat(30))
    loader = torch.utils.data.DataLoader(repeated, batch_size=16)  # the same batch at every step
    finals = {}
    for arm in ("sgd", "callback"):
        torch.manual_seed(1)
        module = HFModule(name)
        callbacks = [LowRankKFACCallback()] if arm == "callback" else []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quiet_trainer(max_steps=30, callbacks=callbacks).fit(module, loader)
        with torch.no_grad():
            module.eval()
            finals[arm] = float(module.loss(batch))
        if callbacks:
            assert int(callbacks[0].engine.skipped_updates) == 0 and callbacks[0].engine.skipped_steps == 0
    assert torch.isfinite(torch.tensor(finals["callback"])) and finals["callback"] < finals["sgd"], finals
