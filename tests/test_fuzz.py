"""Property-based: random valid options on random small models never crash and stay finite; random invalid
options fail at construction naming the option."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_lrkfac import KFACOptions, LowRankKFAC, LowRankKFACCallback

CLASSES = 3


class FuzzNet(nn.Module):
    """Linear layers, optionally a Conv2d branch, an Embedding (tied to the head), self-attention over
    a length-3 sequence, a frozen layer, a layer called twice and one never called."""

    def __init__(
        self,
        width: int,
        conv: bool,
        embedding: bool,
        tied: bool,
        attention: bool,
        frozen: bool,
        twice: bool,
        never: bool,
    ):
        super().__init__()
        self.twice = twice
        self.attention = nn.MultiheadAttention(width, 1, batch_first=True) if attention else None
        self.inp = nn.Linear(5, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, CLASSES)
        self.conv = (
            nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 16, width)) if conv else None
        )
        self.embedding = nn.Embedding(CLASSES, width) if embedding else None
        if embedding and tied:
            self.out.weight = self.embedding.weight
        if frozen:
            self.inp.weight.requires_grad_(False)
        self.unused = nn.Linear(width, width) if never else None

    def forward(self, batch):
        x, image, tokens = batch
        h = torch.tanh(self.inp(x))
        if self.conv is not None:
            h = h + self.conv(image)
        if self.embedding is not None:
            h = h + self.embedding(tokens)
        if self.attention is not None:
            sequence = torch.stack([h, torch.tanh(h), -h], dim=1)
            h = h + self.attention(sequence, sequence, sequence, need_weights=False)[0].mean(1)
        h = torch.tanh(self.hidden(h))
        if self.twice:
            h = torch.tanh(self.hidden(h))
        return self.out(h)


valid_options = st.fixed_dictionaries(
    {
        "rank": st.integers(1, 8),
        "oversampling": st.integers(0, 4),
        "damping": st.floats(1e-4, 1.0),
        "damping_mode": st.sampled_from(["pi", "relative"]),
        "factor_decay": st.floats(0.0, 0.99),
        "factor_update_interval": st.integers(1, 3),
        "basis_update_interval": st.integers(1, 3),
        "warmup_steps": st.integers(0, 2),
        "kl_clip": st.none() | st.floats(1e-4, 1.0),
        "isotropic_tail": st.booleans(),
        "bias_mode": st.sampled_from(["augment", "separate"]),
        "weight_sharing": st.sampled_from(["expand", "reduce"]),
        "precondition_embeddings": st.booleans(),
        "precondition_attention": st.booleans(),
        "dense_threshold": st.none() | st.integers(0, 8),
        "fisher_type": st.sampled_from(["empirical", "mc"]),
        "factor_dtype": st.sampled_from([None, "float32", "float64"]),
        "skip_non_finite_steps": st.booleans(),
        "statistics_examples": st.none() | st.integers(1, 4),
    }
)
models = st.builds(
    FuzzNet,
    width=st.integers(1, 12),
    conv=st.booleans(),
    embedding=st.booleans(),
    tied=st.booleans(),
    attention=st.booleans(),
    frozen=st.booleans(),
    twice=st.booleans(),
    never=st.booleans(),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=valid_options, model=models, batch=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_random_valid_options_on_random_models_stay_finite(options, model, batch, seed):
    torch.manual_seed(seed)
    data = (torch.randn(batch, 5), torch.randn(batch, 1, 4, 4), torch.randint(0, CLASSES, (batch,)))
    labels = torch.randint(0, CLASSES, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with LowRankKFAC(model, **options) as kfac:
        for _ in range(4):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data), labels)
            assert torch.isfinite(loss)
            kfac.before_backward()
            loss.backward()
            kfac.step(lr=optimizer)
            optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for layer in kfac.layers:
        for factor in layer.factors:
            assert all(torch.isfinite(t).all() for t in factor.state_tensors())
    assert kfac.steps == 4 and kfac.skipped_steps == 0


INVALID = {
    "rank": [0, -3, 2.5, "8", True],
    "oversampling": [-1, 1.5],
    "damping": [0.0, -1e-3, float("nan"), float("inf"), "big", lambda step: 0.0],
    "factor_decay": [1.0, -0.1, 2, lambda step: 1.5],
    "factor_update_interval": [0, 1.0],
    "basis_update_interval": [0, -2],
    "statistics_examples": [0, -1, 2.5, "all"],
    "warmup_steps": [-1, 0.5],
    "kl_clip": [0.0, -1.0, float("inf"), lambda step: -1.0],
    "damping_mode": ["absolute", None, 1],
    "step_size": ["newton", None, 1.0],
    "momentum": [1.0, -0.5, "0.95"],
    "update_norm": ["spectral", None],
    "damping_adaptation_interval": [0, 2.5],
    "min_damping": [0.0, -1e-6, float("nan")],
    "step_rule": ["adam", "KFAC", None],
    "adam_beta1": [1.0, -0.1, "0.9"],
    "adam_beta2": [1.5, float("nan")],
    "adam_eps": [0.0, -1e-8],
    "isotropic_tail": ["yes", 1],
    "bias_mode": ["both", None],
    "weight_sharing": ["mean", ""],
    "precondition_embeddings": ["true", 0],
    "precondition_tied_embeddings": ["false", None],
    "precondition_attention": [1, "yes"],
    "dense_threshold": [-1, 2.0],
    "include": ["head", [1, 2]],
    "exclude": ["head", [None]],
    "fisher_type": ["exact", "MC"],
    "mc_output_module": [3, ["head"]],
    "likelihood": ["poisson"],
    "loss_reduction": ["max", None],
    "factor_dtype": ["float16", "bfloat16", torch.float32],
    "seed": [1.5, "0"],
    "work_distribution": ["ring"],
    "skip_non_finite_steps": ["no", None],
    "log_stats": [1, "true"],
}


def test_every_option_has_invalid_examples():
    assert set(INVALID) == {spec.name for spec in dataclasses.fields(KFACOptions)}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_invalid_option_fails_at_construction_naming_it(data):
    option = data.draw(st.sampled_from(sorted(INVALID)))
    value = data.draw(st.sampled_from(INVALID[option]))
    for construct in (KFACOptions, LowRankKFACCallback, lambda **kw: LowRankKFAC(nn.Linear(2, 2), **kw)):
        with pytest.raises(ValueError, match=f"`{option}` must be"):
            construct(**{option: value})
