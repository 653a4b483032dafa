"""Collect each handled module's inputs and output gradients during forward/backward.

Plain module hooks: a forward hook keeps the input (autograd keeps it alive anyway for
the weight gradient) and puts a tensor hook on the output for its gradient. A module
called several times in one forward contributes one entry per call.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class ActivationCapture:
    """Records (input, output-grad) pairs of the given modules while ``enabled`` is True."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(modules)
        self.enabled = False
        self.inputs: dict[nn.Module, list[Tensor]] = {m: [] for m in self.modules}
        self.output_grads: dict[nn.Module, list[Tensor]] = {m: [] for m in self.modules}
        self._handles: list[RemovableHandle] = []

    def attach(self) -> None:
        """Install the hooks (idempotent)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(self._forward_hook) for m in self.modules]

    def detach(self) -> None:
        """Remove the hooks and drop whatever was recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        for module in self.modules:
            self.inputs[module].clear()
            self.output_grads[module].clear()

    def _forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not (
            self.enabled
            and module.training
            and torch.is_grad_enabled()
            and isinstance(output, Tensor)
            and output.requires_grad
        ):
            return
        self.inputs[module].append(args[0].detach())
        grads = self.output_grads[module]
        output.register_hook(lambda grad: grads.append(grad.detach()))

    def pop(self, module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """The recorded inputs and output grads of ``module`` since the last pop, then cleared."""
        inputs, grads = list(self.inputs[module]), list(self.output_grads[module])
        self.inputs[module].clear()
        self.output_grads[module].clear()
        return inputs, grads
