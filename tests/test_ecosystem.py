"""Where Lightning users train: activation checkpointing (torch's, reentrant or not, and Hugging Face's), mixed
precision against float32, and Lightning Fabric against the plain loop."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lightning_lrkfac import LowRankKFAC, LowRankKFACCallback

from .helpers import DigitsModule, digits_loader, quiet_trainer


class Blocks(nn.Module):
    """Two Linear-Tanh blocks and a head; ``checkpointing``: None, or torch's checkpoint (use_reentrant True/False)."""

    def __init__(self, checkpointing: bool | None) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8), nn.Tanh())]
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x) if self.checkpointing is None else checkpoint(block, x, use_reentrant=self.checkpointing)
        return self.head(x)


def exact_run(model: nn.Module, batch, steps: int = 3, step_rule: str = "kfac") -> tuple[list[torch.Tensor], dict]:
    """Exact mode (float64), a refresh every step: the parameters after ``steps`` and the engine's state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with LowRankKFAC(model, dense_threshold=1000, basis_update_interval=1, step_rule=step_rule) as kfac:
        for _ in range(steps):
            optimizer.zero_grad()
            batch(model).backward()
            kfac.step(lr=optimizer)
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()], kfac.state_dict()


def assert_same_statistics_and_steps(left: tuple, right: tuple) -> None:
    (left_parameters, left_state), (right_parameters, right_state) = left, right
    for a, b in zip(left_parameters, right_parameters):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for name, entry in left_state["layers"].items():
        for factor in ("A", "B"):
            for key in set(entry[factor]["tensors"]) & {"matrix", "diag", "sketch", "trace"}:
                mine, theirs = entry[factor]["tensors"][key], right_state["layers"][name][factor]["tensors"][key]
                assert float(mine.abs().max()) > 0, "the statistics were taken"
                torch.testing.assert_close(theirs, mine, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("step_rule", ["kfac", "ekfac"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_torch_activation_checkpointing_counts_each_statistic_once(reentrant, step_rule):
    """The recomputed forward fires the hooks again; the statistics and steps must equal the run without it. (A
    duplicated row leaves a mean unchanged, so EKFAC's per-example pairs of A- and B-rows are the sharper check.)"""
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))

    def run(checkpointing):
        torch.manual_seed(0)
        model = Blocks(checkpointing).double()
        inputs = x.clone().requires_grad_(checkpointing is True)  # the reentrant variant needs an input with grad
        return exact_run(model, lambda m: F.cross_entropy(m(inputs), y), step_rule=step_rule)

    assert_same_statistics_and_steps(run(None), run(reentrant))


@pytest.mark.parametrize("reentrant", [True, False])
def test_hugging_face_gradient_checkpointing_counts_each_statistic_once(reentrant):
    transformers = pytest.importorskip("transformers")
    warnings.filterwarnings("ignore", module="transformers")
    tokens = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))

    def run(checkpointing: bool):
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, use_cache=False,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config).double().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert model.is_gradient_checkpointing
        return exact_run(model, lambda m: m(input_ids=tokens, labels=tokens).loss, steps=2)

    assert_same_statistics_and_steps(run(False), run(True))


@pytest.mark.parametrize(
    "precision",
    [
        "bf16-mixed",
        pytest.param(
            "16-mixed",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="fp16 AMP needs CUDA (Lightning runs bf16 on a CPU)"
            ),
        ),
    ],
)
def test_mixed_precision_steps_match_float32_and_keep_float32_factors(precision):
    """The factors and inverses are float32 under AMP. After 3 steps, how far each parameter's total update is from
    the float32 run's (in Frobenius norm, relative) stays within 1.5× what the same AMP does to plain SGD with
    momentum: the callback adds no error of its own beyond the half-precision forward and backward (measured on 2
    CPU cores: at most 5.2% with the callback, 6.9% without)."""

    def deviation(callback: bool) -> float:
        parameters = {}
        for name in ("32-true", precision):
            torch.manual_seed(0)
            callbacks = [LowRankKFACCallback(rank=8, log_stats=False)] if callback else []
            trainer = quiet_trainer(max_steps=3, precision=name, callbacks=callbacks)
            module = DigitsModule()
            trainer.fit(module, digits_loader(limit=192, shuffle=False))
            parameters[name] = [p.detach().clone() for p in module.parameters()]
            for layer in callbacks[0].engine.layers if callback else []:
                assert all(t.dtype == torch.float32 for f in layer.factors for t in f.state_tensors())
        torch.manual_seed(0)
        initial = [p.detach().clone() for p in DigitsModule().parameters()]
        errors = []
        for mixed, full, start in zip(parameters[precision], parameters["32-true"], initial):
            assert (full - start).norm() > 0
            errors.append(float((mixed - full).norm() / (full - start).norm()))
        return max(errors)

    assert deviation(callback=True) <= 1.5 * deviation(callback=False)


def fabric_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(32, 10, generator=generator), torch.randint(0, 4, (32,), generator=generator)) for _ in range(4)
    ]


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))


def test_lightning_fabric_loop_equals_the_plain_loop():
    """``fabric.backward(loss)``, then the engine's step, then the optimizer: the same parameters as a plain loop."""
    fabric_module = pytest.importorskip("lightning_fabric")
    results = []
    for use_fabric in (False, True):
        model = small_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        kfac = LowRankKFAC(model, rank=4, dense_threshold=0)  # before fabric.setup: the layers keep their names
        backward = lambda loss: loss.backward()  # noqa: E731
        if use_fabric:
            fabric = fabric_module.Fabric(accelerator="cpu", devices=1)
            model, optimizer = fabric.setup(model, optimizer)
            backward = fabric.backward
        with kfac:
            for x, y in fabric_batches():
                optimizer.zero_grad()
                backward(F.cross_entropy(model(x), y))
                kfac.step(lr=optimizer)
                optimizer.step()
        assert [layer.name for layer in kfac.layers] == ["0", "2"] and kfac.bases_ready()
        results.append([p.detach().clone() for p in model.parameters()])
    for plain, fabric_run in zip(*results):
        assert torch.equal(plain, fabric_run)


def deep_mlp() -> nn.Module:
    """18 handled Linear layers: more than dynamo's recompile limit of 8."""
    torch.manual_seed(0)
    body = [module for _ in range(16) for module in (nn.Linear(16, 16), nn.Tanh())]
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), *body[:-1], nn.Tanh(), nn.Linear(16, 4)).double()


class Messages(logging.Handler):
    """The messages of one logger (dynamo's do not propagate to the root logger that caplog reads)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_torch_compile_runs_the_hooks_eagerly_without_recompiles():
    """torch.compile(model) with the engine: no recompile-limit warning for 18 handled layers (the hooks run at graph
    breaks instead of being traced), and the statistics and steps equal the eager run's (exact mode, float64)."""
    torch._dynamo.reset()
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 4, (32,))

    def run(compiled: bool):
        model = deep_mlp()
        net = torch.compile(model) if compiled else model
        return exact_run(model, lambda m: F.cross_entropy(net(x), y))

    eager = run(False)
    dynamo, messages = logging.getLogger("torch._dynamo"), Messages()
    dynamo.addHandler(messages)
    try:
        compiled = run(True)
    finally:
        dynamo.removeHandler(messages)
    assert len(eager[1]["layers"]) == 18
    assert not [m for m in messages.messages if "recompile" in m.lower()], messages.messages
    assert_same_statistics_and_steps(eager, compiled)


@pytest.mark.parametrize(
    ("compile_as", "graphed"),
    [
        ("default", False),
        ("max-autotune-no-cudagraphs", False),
        ("reduce-overhead", True),
        ("max-autotune", True),
        ("cudagraphs option", True),
        ("module.compile reduce-overhead", True),
        ("fit with a compiled LightningModule", True),
    ],
)
def test_models_compiled_with_cuda_graphs_are_refused_on_cuda(compile_as, graphed):
    """CUDA graphs overwrite the buffers the hooks keep until the step: refused at construction on a CUDA device,
    naming the compiled module and the modes to use instead; the other modes and any CPU model are accepted."""
    from pytorch_lightning.utilities.compile import from_compiled

    from lightning_lrkfac.capture import check_no_cuda_graphs

    module = DigitsModule()
    if compile_as == "cudagraphs option":
        model = torch.compile(module, options={"triton.cudagraphs": True})
    elif compile_as == "module.compile reduce-overhead":
        module.body[0].compile(mode="reduce-overhead")
        model = module
    elif compile_as == "fit with a compiled LightningModule":
        model = from_compiled(torch.compile(module, mode="reduce-overhead"))  # what Trainer.fit does with one
    else:
        model = torch.compile(module, mode=compile_as)
    check_no_cuda_graphs(model, torch.device("cpu"))  # no CUDA graphs on a CPU: trains as mode='default'
    if not graphed:
        check_no_cuda_graphs(model, torch.device("cuda"))
        return
    with pytest.raises(RuntimeError, match="CUDA graphs.*mode='default' or 'max-autotune-no-cudagraphs'") as error:
        check_no_cuda_graphs(model, torch.device("cuda"))
    assert ("body.0" if compile_as.startswith("module.compile") else type(model).__name__) in str(error.value)


def test_lightning_fabric_ddp_on_two_processes_equals_one_process_with_the_global_batch(tmp_path):
    """Fabric's ``ddp_spawn`` on 2 CPU processes, each with half the batch: the parameters of one process with the
    whole batch (exact mode, float64, 1e-10), so the statistics are folded over the ranks."""
    pytest.importorskip("lightning_fabric")
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("fabric_ddp_run.py")
    path = os.pathsep.join(filter(None, [str(script.parent.parent), os.environ.get("PYTHONPATH")]))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=path, PYTHONWARNINGS="ignore")
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}.pt"
        command = [sys.executable, str(script), "--devices", str(devices), "--out", str(out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)
        assert done.returncode == 0, done.stderr[-3000:]
        results[devices] = torch.load(out)
    assert results[1]["steps"] == results[2]["steps"] == 4
    for one, two in zip(results[1]["parameters"], results[2]["parameters"]):
        torch.testing.assert_close(two, one, rtol=1e-10, atol=1e-12)
