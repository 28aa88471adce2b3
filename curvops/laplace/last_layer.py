"""Last-layer Laplace without passes through the network body: the last layer (an ``nn.Linear``
whose output is the model's output) found in one forward pass, its inputs (the features) computed
once without a graph, and the last layer alone as the model the posterior is fitted on.

With every parameter but the last layer's ``θ_L = [W, b]`` fixed, the network is ``f(x) =
h(φ(x); θ_L)`` with fixed features ``φ(x)``: the loss, its gradient and the GGN (and KFAC) in ``θ_L``
are the last layer's on the features, so fitting ``h`` on ``(φ(x_n), y_n)`` gives the same posterior
as ``params=[W, b]`` on the network, at the cost of one forward pass of the body (no backward pass,
and no further forward passes for the curvature). The predictives still run the whole network.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..nn.model import ModelData

LAST_LAYER = "last_layer"


def _checked_last(
    model: ModelData, calls: list[tuple[nn.Module, Tensor, Tensor]], output: Tensor
) -> nn.Linear:
    """The last module with parameters called, which must be an ``nn.Linear`` giving ``output``."""
    names = {module: name for name, module in model.model.named_modules()}
    if not calls:
        raise ValueError("params='last_layer': the model called no module with parameters.")
    module, _, result = calls[-1]
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"params='last_layer' needs an nn.Linear last layer; the last module with parameters is "
            f"{names[module]!r} ({type(module).__name__}). Pass params=[...] explicitly."
        )
    if result is not output:
        raise ValueError(
            f"params='last_layer': the output of the last layer {names[module]!r} is not the model's output "
            "(the model changes it after the layer). Pass params=[...] explicitly."
        )
    if sum(m is module for m, _, _ in calls) != 1:
        raise ValueError(
            f"params='last_layer': the last layer {names[module]!r} runs more than once in a forward pass; "
            "it must run once. Pass params=[...] explicitly."
        )
    return module


def last_layer_features(model: ModelData) -> tuple[nn.Linear, list[tuple[Tensor, Any]], tuple | None]:
    """The last layer (found in the first batch's forward pass: the last module with parameters
    called, an ``nn.Linear`` whose output is the model's output), every batch's ``(φ(X), y)`` (its
    inputs, detached, from one forward pass per batch without a graph) and the first batch's
    input shape (for errors). Raises a ``ValueError`` naming the module otherwise."""
    calls: list[tuple[nn.Module, Tensor, Tensor]] = []
    candidates = [m for m in model.model.modules() if next(m.parameters(recurse=False), None) is not None]
    handles = [
        m.register_forward_hook(lambda m, args, out: calls.append((m, args[0], out))) for m in candidates
    ]
    layer, batches, shape = None, [], None
    try:
        for _, inputs, targets in model.batches("Laplace: last-layer features"):
            calls.clear()
            with torch.no_grad():
                output = model.forward(model.param_dict(), inputs)
            if layer is None:
                layer = _checked_last(model, calls, output)
                for handle in handles:
                    handle.remove()
                handles = [layer.register_forward_hook(lambda m, args, out: calls.append((m, args[0], out)))]
                shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else None
            batches.append((calls[-1][1].detach(), targets))
    finally:
        for handle in handles:
            handle.remove()
    if layer is None:
        raise ValueError("params='last_layer' needs data with at least one batch.")
    return layer, batches, shape


def head_model(layer: nn.Linear, batches: list, empty: bool) -> ModelData:
    """The last layer alone, on the feature batches, over its trainable parameters."""
    params = [p for p in (layer.weight, layer.bias) if p is not None and p.requires_grad]
    return ModelData(layer, batches, params, allow_empty=empty)
