"""asdl's dense K-FAC inside the same Lightning loop: the dense baseline of the time-to-accuracy benchmark.

asdl's ``KfacGradientMaker`` runs the forward and backward itself, so the module uses manual
optimization: each step asks asdl for the preconditioned gradient, then steps the same
SGD-with-momentum optimizer as the other arms. Curvature every ``curvature_interval`` steps,
inverses every ``inverse_interval`` steps (the callback's factor and basis intervals).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from lightning_lrkfac.examples.models import MLPClassifier


class _NoNvtx(contextlib.ContextDecorator):
    """asdl wraps its calls in torch.cuda.nvtx.range (as a context and as a decorator), which raises on
    CPU-only torch builds."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def import_asdl():
    """Import asdl (the dense K-FAC reference of the tests and benchmarks), nvtx ranges neutralised without CUDA."""
    if not torch.cuda.is_available():
        torch.cuda.nvtx.range = _NoNvtx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import asdl
    return asdl


class AsdlKFACClassifier(MLPClassifier):
    """The MLP classifier trained with asdl's dense K-FAC (empirical Fisher, EMA-free, damping λ)."""

    def __init__(
        self,
        *args,
        damping: float = 1e-3,
        batch_size: int = 64,
        curvature_interval: int = 1,
        inverse_interval: int = 10,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.asdl_options = dict(
            damping=damping,
            data_size=batch_size,
            curvature_upd_interval=curvature_interval,
            preconditioner_upd_interval=inverse_interval,
        )
        self.maker = None

    def on_fit_start(self) -> None:
        asdl = import_asdl()
        config = asdl.PreconditioningConfig(**self.asdl_options)
        self.maker = asdl.KfacGradientMaker(self.net, config, fisher_type="fisher_emp", loss_type="cross_entropy")

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        outputs = self.maker.setup_model_call(self.net, x)
        self.maker.setup_loss_call(F.cross_entropy, outputs, y)
        _, loss = self.maker.forward_and_backward()
        optimizer.step()
        return loss
