"""The language-model example pieces: the Python-docs byte stream and its fixed split, and Muon with AdamW run as
one optimizer (checked against the two torch optimizers stepped by hand)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from lightning_lrkfac.examples.data import PythonDocsDataModule, python_docs_bytes
from lightning_lrkfac.examples.models import GPTLanguageModel
from lightning_lrkfac.examples.optim import MuonWithAdamW


def test_python_docs_split_is_fixed_and_windows_are_next_byte_pairs():
    stream = python_docs_bytes()
    assert len(stream) > 400_000 and int(stream.max()) < 256
    first, second = PythonDocsDataModule(context=32, batch_size=4), PythonDocsDataModule(context=32, batch_size=4)
    first.setup(), second.setup()
    x, y = first.train_set[5]
    assert x.shape == y.shape == (32,) and torch.equal(x[1:], y[:-1])
    assert torch.equal(first.train_set.offsets, second.train_set.offsets)  # the same seed, the same windows
    train_end, val_end = int(0.9 * len(stream)), int(0.95 * len(stream))
    assert torch.equal(first.val_set[0][0], stream[train_end : train_end + 32])
    assert torch.equal(first.test_set[0][0], stream[val_end : val_end + 32])
    assert int(first.train_set.offsets.max()) + 33 <= train_end  # no training window reaches validation bytes
    tokens, targets = next(iter(first.train_dataloader()))
    assert tokens.shape == targets.shape == (4, 32)


def two_layer() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_muon_with_adamw_steps_like_the_two_torch_optimizers():
    model, twin = two_layer(), two_layer()
    combined = MuonWithAdamW([model[0].weight], [model[0].bias, *model[2].parameters()], lr=0.05, adamw_lr=1e-2)
    muon = torch.optim.Muon([twin[0].weight], lr=0.05, momentum=0.95, weight_decay=0.0)
    adamw = torch.optim.AdamW([twin[0].bias, *twin[2].parameters()], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    x = torch.randn(16, 6)
    for _ in range(3):
        for net, optimizers in ((model, [combined]), (twin, [muon, adamw])):
            for optimizer in optimizers:
                optimizer.zero_grad()
            net(x).square().mean().backward()
            for optimizer in optimizers:
                optimizer.step()
    for mine, reference in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    assert [group["lr"] for group in combined.param_groups] == [0.05, 1e-2]


def test_muon_with_adamw_resumes_from_its_state_dict_and_schedulers_reach_both():
    model = two_layer()
    optimizer = MuonWithAdamW([model[0].weight], [model[0].bias, *model[2].parameters()])
    x = torch.randn(16, 6)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    resumed_model = copy.deepcopy(model)
    resumed = MuonWithAdamW([resumed_model[0].weight], [resumed_model[0].bias, *resumed_model[2].parameters()])
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from a checkpoint file
    for net, opt in ((model, optimizer), (resumed_model, resumed)):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    for mine, reference in zip(resumed_model.parameters(), model.parameters()):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    torch.optim.lr_scheduler.StepLR(resumed, step_size=1, gamma=0.5).step()
    assert resumed.muon.param_groups[0]["lr"] == 0.01 and resumed.adamw.param_groups[0]["lr"] == 1.5e-3


def test_muon_takes_only_matrices_and_the_gpt_gives_it_the_blocks():
    with pytest.raises(ValueError, match="`matrices` must be a non-empty list of 2-D parameters"):
        MuonWithAdamW([nn.Parameter(torch.ones(3))], [])
    model = GPTLanguageModel(vocab_size=16, context=8, width=16, depth=2, heads=2, tie_weights=True, optimizer="muon")
    optimizer = model.configure_optimizers()
    matrices = {id(p) for p in optimizer.muon.param_groups[0]["params"]}
    assert matrices == {id(p) for p in model.blocks.parameters() if p.dim() == 2}
    assert id(model.tokens.weight) in {id(p) for p in optimizer.adamw.param_groups[0]["params"]}
