"""The private torch / Lightning attributes that compat.py reads still exist: an upgrade that drops one fails here."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lightning_lrkfac import compat

from .helpers import DigitsModule, digits_loader, quiet_trainer


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, (2, 3), padding="same", dilation=(1, 2)),
        nn.Conv2d(3, 4, 3, padding=(2, 1), padding_mode="reflect"),
        nn.Conv2d(3, 4, 3, padding="valid"),
    ],
)
def test_conv_padding_attribute_exists_and_the_fallback_agrees(conv):
    assert hasattr(conv, "_reversed_padding_repeated_twice"), "torch dropped Conv2d._reversed_padding_repeated_twice"
    from_torch = compat.conv_explicit_padding(conv)
    del conv._reversed_padding_repeated_twice
    assert compat.conv_explicit_padding(conv) == from_torch


def test_grad_scaler_private_state_exists():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(4, 3)).sum()).backward()
    scaler.unscale_(optimizer)
    scale = compat.scaler_scale_tensor(scaler)
    assert isinstance(scale, torch.Tensor) and float(scale) == scaler.get_scale(), "GradScaler._scale changed"
    flags = compat.scaler_found_inf(scaler, optimizer)
    assert flags and all(isinstance(f, torch.Tensor) and float(f) == 0.0 for f in flags), "found_inf_per_device changed"
    model.weight.grad[0, 0] = float("inf")
    scaler.update()
    optimizer.zero_grad()
    scaler.scale(model(torch.randn(4, 3)).sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.unscale_(optimizer)
    assert sum(float(f) for f in compat.scaler_found_inf(scaler, optimizer)) == 1.0


def test_lightning_logger_connector_attribute_exists():
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(DigitsModule(), digits_loader(limit=64))
    connector = getattr(trainer, "_logger_connector", None)
    assert connector is not None and hasattr(connector, "should_update_logs"), "Lightning dropped should_update_logs"
    assert compat.logger_writes_this_step(object()) is True  # unknown: log every step


def test_ddp_strategy_private_attributes_exist():
    from pytorch_lightning.strategies import DDPStrategy

    spawn, unused = DDPStrategy(start_method="spawn"), DDPStrategy(find_unused_parameters=True)
    assert hasattr(spawn, "_start_method") and hasattr(unused, "_ddp_kwargs"), "Lightning renamed DDPStrategy internals"
    assert compat.ddp_start_method(spawn) == "spawn" and compat.ddp_start_method(DDPStrategy()) == "popen"
    assert compat.ddp_finds_unused_parameters(unused) and not compat.ddp_finds_unused_parameters(DDPStrategy())
