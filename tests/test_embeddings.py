"""nn.Embedding: K-FAC with the exact diagonal A of token frequencies (optional), tied and sparse weights."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.dense_kfac import import_asdl
from lightning_lrkfac import LowRankKFACCallback
from lightning_lrkfac.examples.data import ArithmeticSequencesDataModule
from lightning_lrkfac.examples.models import GPTLanguageModel
from lightning_lrkfac.lowrank import DiagonalFactor

from .helpers import damped_natural, kfac_grads, plain_grads, quiet_trainer

EMBEDDING_OPTIONS = dict(rank=64, damping=1e-2, kl_clip=None, factor_dtype="float64", precondition_embeddings=True)


def test_embedding_matches_asdl_kron_factors():
    """One token per example: asdl's Kronecker factors of the Embedding give the reference."""
    torch.set_default_dtype(torch.float64)
    try:
        asdl = import_asdl()
        model = nn.Sequential(nn.Embedding(11, 6), nn.Flatten(), nn.Tanh(), nn.Linear(6, 3))
        x, y = torch.randint(0, 11, (20, 1)), torch.randint(0, 3, (20,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = asdl.FisherConfig(
                fisher_type="fisher_emp", fisher_shapes=["kron"], loss_type="cross_entropy", data_size=x.shape[0]
            )
            maker = asdl.get_fisher_maker(model, config)
            maker.setup_loss_call(F.cross_entropy, maker.setup_model_call(model, x), y)
            maker.forward_and_backward()
        kron = model[0].fisher.kron
        plain = plain_grads(model, x, y)
        expected = damped_natural(kron.A.double(), kron.B.double(), plain[0].T, 1e-2).T
        got, _ = kfac_grads(model, x, y, **EMBEDDING_OPTIONS)
    finally:
        torch.set_default_dtype(torch.float32)
    assert not torch.allclose(expected, plain[0], atol=1e-3)
    torch.testing.assert_close(got[0], expected, rtol=1e-6, atol=1e-9)  # asdl counts tokens in float32


class SequenceTagger(nn.Module):
    def __init__(self, vocab: int = 9, width: int = 5, classes: int = 3, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width, padding_idx=padding_idx)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embedding(tokens)))


def token_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_on_sequences_matches_one_hot_linear_expand_reference(padding_idx):
    """The Embedding as a Linear on flattened one-hot positions (padding = zero input), dense K-FAC-expand."""
    torch.set_default_dtype(torch.float64)
    try:
        model = SequenceTagger(padding_idx=padding_idx)
        x, y = torch.randint(0, 9, (4, 7)), torch.randint(0, 3, (4, 7))
        x[:, -2:] = 0  # trailing padding (token 0)
        positions = x.numel()
        embedded = model.embedding(x)
        loss = token_loss(model.head(torch.tanh(embedded)), y)
        (output_grad,) = torch.autograd.grad(loss, embedded, retain_graph=True)
        (weight_grad,) = torch.autograd.grad(loss, model.embedding.weight)
        one_hot = F.one_hot(x.reshape(-1), 9).double()
        if padding_idx is not None:
            one_hot[x.reshape(-1) == padding_idx] = 0.0
        per_token = output_grad.reshape(positions, -1) * positions
        A, B = one_hot.T @ one_hot / positions, per_token.T @ per_token / positions
        expected = damped_natural(A, B, weight_grad.T, 1e-2).T
        got, kfac = kfac_grads(model, x, y, token_loss, **EMBEDDING_OPTIONS)
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(got[0], expected, rtol=1e-9, atol=1e-12)
    a_factor = kfac.layers[0].a_factor
    assert isinstance(a_factor, DiagonalFactor) and a_factor.diag.shape == (9,)
    if padding_idx is not None:
        assert float(a_factor.diag[padding_idx]) == 0.0 and float(got[0][padding_idx].abs().max()) == 0.0


def test_embeddings_are_preconditioned_by_default_and_plain_when_switched_off():
    model, x, y = SequenceTagger(), torch.randint(0, 9, (4, 7)), torch.randint(0, 3, (4, 7))
    plain = plain_grads(model, x, y, token_loss)
    got, kfac = kfac_grads(model, x, y, token_loss, rank=64, kl_clip=None, precondition_embeddings=False)
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0)
    assert kfac.skipped_modules == {"embedding": "nn.Embedding (precondition_embeddings=False)"}
    got, kfac = kfac_grads(model, x, y, token_loss, rank=64, kl_clip=None)
    assert [layer.name for layer in kfac.layers] == ["embedding", "head"]
    assert not torch.allclose(got[0], plain[0], rtol=1e-3)


@pytest.mark.parametrize(
    "attribute, reason",
    [
        ("sparse", "sparse gradients (sparse=True)"),
        ("scale_grad_by_freq", "scale_grad_by_freq=True (its gradient is already frequency-scaled)"),
    ],
)
def test_sparse_or_frequency_scaled_embedding_keeps_the_plain_gradient(attribute, reason):
    model = SequenceTagger()
    setattr(model.embedding, attribute, True)
    x, y = torch.randint(0, 9, (4, 7)), torch.randint(0, 3, (4, 7))
    plain = plain_grads(model, x, y, token_loss)
    got, kfac = kfac_grads(model, x, y, token_loss, **EMBEDDING_OPTIONS)
    assert kfac.skipped_modules == {"embedding": reason}
    assert [layer.name for layer in kfac.layers] == ["head"]
    if attribute != "sparse":
        torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0)


def test_tied_gpt_weights_are_one_block_and_the_rest_is_preconditioned():
    torch.manual_seed(0)
    model = GPTLanguageModel(vocab_size=12, context=6, width=16, depth=1, heads=2, tie_weights=True)
    x, y = torch.randint(0, 12, (5, 6)), torch.randint(0, 12, (5, 6))
    names = [name for name, _ in model.named_parameters()]
    plain = dict(zip(names, plain_grads(model, x, y, token_loss)))
    grads, kfac = kfac_grads(model, x, y, token_loss, **EMBEDDING_OPTIONS)
    got = dict(zip(names, grads))
    assert "tokens" not in kfac.skipped_modules and "head" not in kfac.skipped_modules
    assert "head" in [layer.name for layer in kfac.layers] and "tokens" not in [layer.name for layer in kfac.layers]
    for name in ("tokens.weight", "positions.weight", "blocks.0.attention.qkv.weight", "blocks.0.mlp.2.weight"):
        assert not torch.allclose(got[name], plain[name], rtol=1e-3), name


def test_precondition_embeddings_must_be_a_bool():
    with pytest.raises(ValueError, match="`precondition_embeddings` must be true or false, got 'yes'"):
        LowRankKFACCallback(precondition_embeddings="yes")


def test_gpt_language_model_trains_with_preconditioned_embeddings():
    """Low-rank B over the embedding width (rank 8 < 32); the loss falls and the coverage says how."""
    torch.manual_seed(0)
    data = ArithmeticSequencesDataModule(vocab_size=16, length=9, num_sequences=640, batch_size=32)
    data.setup()
    model = GPTLanguageModel(vocab_size=16, context=8, width=32, depth=1, heads=2)
    x, y = data.train_set.tensors
    with torch.no_grad():
        before = float(token_loss(model(x), y))
    callback = LowRankKFACCallback(rank=8, dense_threshold=0, damping=1e-2, precondition_embeddings=True)
    quiet_trainer(max_epochs=6, callbacks=[callback]).fit(model, data)
    with torch.no_grad():
        after = float(token_loss(model(x), y))
    assert after < 0.5 * before, (before, after)
    assert int(callback.engine.skipped_updates) == 0
    rows = {row["parameter"]: row for row in callback.engine.coverage}
    assert rows["tokens.weight"]["how"] == "K-FAC Embedding (expand), A diagonal 16, B rank 8/32"
    assert rows["positions.weight"]["preconditioned"] and rows["head.weight"]["preconditioned"]
    assert not rows["norm.weight"]["preconditioned"]
    # The embedding factors were filled and used: token frequencies sum to one per position.
    tokens_layer = next(layer for layer in callback.engine.layers if layer.name == "tokens")
    assert abs(float(tokens_layer.a_factor.diag.sum()) - 1.0) < 1e-5
