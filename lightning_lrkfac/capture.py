"""Collect each handled module's inputs and output gradients during forward/backward.

Plain module hooks. For the empirical Fisher a forward hook puts a tensor hook on the
output; when the training loss's gradient reaches it, the input (which autograd keeps
alive anyway for the weight gradient) and that gradient are recorded together. A call
whose output never gets a gradient (a forward aborted before backward, an extra forward
for a metric) leaves nothing behind. For the Monte-Carlo Fisher the forward hook keeps
the input and the output itself, and :meth:`ActivationCapture.backpropagate` later sends
the gradient of a sampled loss back to those outputs only. A module called several times
in one forward contributes one entry per call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class ActivationCapture:
    """Records (input, output-grad) pairs of the given modules while ``enabled`` is True.

    Args:
        modules: the handled modules by name.
        prediction_module: the module whose output is the model's prediction (recorded in
            :attr:`predictions`), or ``None`` when nothing needs it.
        monte_carlo: the Monte-Carlo Fisher: output gradients come from a loss sampled from
            the prediction (:meth:`backpropagate`), not from the training loss.
    """

    def __init__(
        self, modules: Mapping[str, nn.Module], prediction_module: nn.Module | None = None, monte_carlo: bool = False
    ) -> None:
        if monte_carlo and prediction_module is None:
            raise ValueError("ActivationCapture: the Monte-Carlo Fisher needs a prediction module")
        self.names = {module: name for name, module in modules.items()}
        self.modules = list(modules.values())
        self.prediction_module = prediction_module
        self.monte_carlo = monte_carlo
        #: Record inputs and output gradients (the steps that fold statistics).
        self.enabled = False
        #: Record the predictions on every training forward, not only while ``enabled`` (the automatic step size).
        self.always_predict = False
        self.inputs: dict[nn.Module, list[Tensor]] = {m: [] for m in self.modules}
        self.outputs: dict[nn.Module, list[Tensor]] = {m: [] for m in self.modules}
        self.output_grads: dict[nn.Module, list[Tensor]] = {m: [] for m in self.modules}
        self.predictions: list[Tensor] = []
        self._handles: list[RemovableHandle] = []

    def attach(self) -> ActivationCapture:
        """Install the hooks (idempotent); returns the capture."""
        if self._handles:
            return self
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self.modules]
        if self.prediction_module is not None:
            self._handles.append(self.prediction_module.register_forward_hook(self._prediction_hook))
        return self

    def detach(self) -> None:
        """Remove the hooks and drop whatever was recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        for module in self.modules:
            self.inputs[module].clear()
            self.outputs[module].clear()
            self.output_grads[module].clear()
        self.predictions.clear()

    @staticmethod
    def _trains(module: nn.Module, output: object) -> bool:
        """A training forward whose output will get a gradient."""
        return module.training and torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad

    def _recording(self, module: nn.Module, output: object) -> bool:
        return self.enabled and self._trains(module, output)

    # Under torch.compile the hooks run eagerly, at a graph break each: traced, their per-module dict lookups would
    # guard on module identity and recompile once per handled layer until dynamo's recompile limit.
    @torch.compiler.disable
    def _forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not self._recording(module, output):
            return
        inputs = args[0].detach()
        if self.monte_carlo:
            self.inputs[module].append(inputs)
            self.outputs[module].append(output)
            return
        recorded_inputs, grads = self.inputs[module], self.output_grads[module]

        def record(grad: Tensor) -> None:
            recorded_inputs.append(inputs)
            grads.append(grad.detach())

        output.register_hook(record)

    @torch.compiler.disable
    def _prediction_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if (self.enabled or self.always_predict) and self._trains(module, output):
            self.predictions.append(output)

    def backpropagate(self, sampled_loss: Callable[[Tensor], Tensor], scale: float | Tensor = 1.0) -> None:
        """Monte-Carlo Fisher: record ∂(scale · Σ sampled_loss(prediction))/∂output for every handled call.

        One partial backward from the predictions to the recorded outputs; the graph is
        retained for the training loss's own backward. Raises if a handled module's output
        does not reach the prediction (its B would have no statistics).
        """
        outputs = [(m, out) for m in self.modules for out in self.outputs[m]]
        predictions, self.predictions = self.predictions, []
        for module in self.modules:
            self.outputs[module].clear()
        if not outputs:
            return
        if not predictions:
            raise RuntimeError(
                "fisher_type='mc': handled modules ran, but the prediction module's forward did not (or returned no "
                "tensor that requires grad); name the module whose output is the prediction in `mc_output_module`."
            )
        loss = sum(sampled_loss(prediction) for prediction in predictions) * scale
        grads = torch.autograd.grad(loss, [out for _, out in outputs], retain_graph=True, allow_unused=True)
        unreached = sorted({self.names[m] for (m, _), g in zip(outputs, grads) if g is None})
        if unreached:
            raise RuntimeError(
                f"fisher_type='mc': the outputs of handled modules {unreached} do not reach the prediction module's output; "
                "name the model's final output module in `mc_output_module` or `exclude` those modules."
            )
        for (module, _), grad in zip(outputs, grads):
            self.output_grads[module].append(grad.detach())

    def pop(self, module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """The recorded inputs and output grads of ``module`` since the last pop, then cleared."""
        inputs, grads = list(self.inputs[module]), list(self.output_grads[module])
        self.inputs[module].clear()
        self.output_grads[module].clear()
        return inputs, grads


def prediction_module(model: nn.Module, name: str | None, handled: list[str]) -> nn.Module:
    """The submodule ``name`` of ``model`` whose output is the prediction (``model`` itself for None); a clear
    error naming `mc_output_module` and the handled layers when there is none of that name."""
    if name is None:
        return model
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(
            f"LowRankKFAC: `mc_output_module` must name a submodule of {type(model).__name__}, "
            f"got {name!r}; handled layers: {handled}"
        )
    return modules[name]


def _compile_configs(module: nn.Module) -> list[dict | None]:
    """The inductor configs ``torch.compile`` was given for this module: as ``torch.compile(module)``, as
    ``module.compile()``, or as a LightningModule handed compiled to ``Trainer.fit`` (Lightning keeps the context)."""
    contexts = [getattr(module, "dynamo_ctx", None), (getattr(module, "_compiler_ctx", None) or {}).get("dynamo_ctx")]
    configs = [getattr(context, "compiler_config", None) for context in contexts if context is not None]
    compiled_call = getattr(module, "_compiled_call_impl", None)
    if compiled_call is not None and hasattr(compiled_call, "get_compiler_config"):
        configs.append(compiled_call.get_compiler_config())
    return configs


def cuda_graph_compiled(model: nn.Module) -> list[str]:
    """Names of ``model`` and its submodules compiled to replay CUDA graphs (``mode='reduce-overhead'`` or
    ``'max-autotune'``, or ``options={'triton.cudagraphs': True}``)."""
    return [
        name or type(model).__name__
        for name, module in model.named_modules()
        if any((config or {}).get("triton.cudagraphs") for config in _compile_configs(module))
    ]


def check_no_cuda_graphs(model: nn.Module, device: torch.device) -> None:
    """Refuse a model compiled with CUDA graphs on a CUDA device: the hooks keep each handled call's input and output
    gradient from the forward to the step, and a CUDA graph overwrites those buffers at its next replay (only a copy
    keeps them). Inductor does not make CUDA graphs for a CPU model, so there it trains as with ``mode='default'``."""
    compiled = cuda_graph_compiled(model)
    if compiled and device.type == "cuda":
        raise RuntimeError(
            f"LowRankKFAC cannot run under torch.compile with CUDA graphs ({compiled}: mode='reduce-overhead' or "
            "'max-autotune'): its hooks keep each handled layer's inputs and output gradients until the step, and a "
            "CUDA graph overwrites them at its next replay. Compile with mode='default' or "
            "'max-autotune-no-cudagraphs'."
        )
