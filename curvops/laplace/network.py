"""The trained network at the Laplace approximation's own copy of ``θ*``: checked test inputs and
forward passes, per-datum Jacobians in bounded chunks, and outputs at sampled parameters."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from ..errors import NonDeterministicDataError
from ..nn.batches import data_count
from ..nn.forward_checks import check_batch_statistics, fixed_forward
from ..nn.jacobian import datum_chunks, datum_jacobians
from ..nn.mappings import ModelInputs
from ..nn.model import ModelData
from ..nn.tensor_sums import tensor_leaves


def _shape(x: Any) -> Any:
    """The shape of a tensor of inputs, or ``{key: shape}`` of keyword inputs, for messages."""
    if isinstance(x, Tensor):
        return list(x.shape)
    return {key: list(t.shape) for key, t in x.items() if isinstance(t, Tensor)}


class Network:
    """``f(x, θ)`` for parameter values of the chosen parameters (a copy of ``θ*``, or samples).

    Args:
        model: the model and its chosen parameters; the others (and buffers) stay its own, and
            a change of one of them raises :class:`~curvops.errors.StaleParametersError`.
        theta: ``θ*`` per parameter tensor, ``{name: tensor}``.
        output_shape: one datum's output shape on the training data.
        input_example: a training batch's input shape (for errors), or ``None``.
    """

    def __init__(
        self,
        model: ModelData,
        theta: dict[str, Tensor],
        output_shape: tuple[int, ...],
        input_example: tuple[int, ...] | None,
    ) -> None:
        self.model = model
        self.theta = theta
        self.output_shape = output_shape
        self.input_example = input_example

    def prepare_inputs(self, x: Any) -> Any:
        """Test inputs ``[B, ...]`` (or the :class:`~curvops.nn.ModelInputs` of a model called as
        ``model(**x)``) on the parameters' device (floats in their dtype); checked."""
        if not isinstance(x, (Tensor, ModelInputs)):
            raise TypeError(
                f"x must be a tensor of inputs (or curvops.nn.ModelInputs), got {type(x).__name__}."
            )
        leaves = tensor_leaves(x)
        rows = {t.shape[0] if t.ndim else 0 for t in leaves}
        if len(rows) != 1 or 0 in rows:
            raise ValueError(f"x must be a non-empty batch [B, ...], got shape {_shape(x)}.")
        return tree_map(self._placed, x)

    def _placed(self, t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        return t.to(self.model.device, self.model.dtype) if t.is_floating_point() else t.to(self.model.device)

    def check_model(self) -> None:
        """Before a forward pass: raise :class:`~curvops.errors.StaleParametersError` if a parameter
        outside ``θ`` or a buffer, which the model provides, changed since the build, and refuse
        batch normalisation switched to train mode since (it would update running statistics)."""
        self.model.check_fresh(chosen=False)
        check_batch_statistics(self.model.model)

    def forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The model output at ``params``, with a clear error for inputs the model rejects."""
        self.check_model()
        try:
            with fixed_forward():
                output = self.model.forward(params, x)
        except NonDeterministicDataError:
            raise
        except (RuntimeError, ValueError, IndexError, TypeError) as error:
            example = self.input_example
            expected = f" (the training inputs had shape {list(example)})" if example else ""
            raise ValueError(f"The model rejects inputs of shape {_shape(x)}{expected}: {error}") from error
        if tuple(output.shape[1:]) != self.output_shape or output.shape[0] != data_count(x):
            raise ValueError(
                f"The model maps inputs of shape {_shape(x)} to outputs of shape {list(output.shape)}, "
                f"but the training outputs were [B, {', '.join(map(str, self.output_shape))}]."
            )
        return output

    def jacobians(self, x: Tensor, batch_size: int | None) -> Iterator[Tensor]:
        """``J_n = ∂f(x_n)/∂θ`` at ``θ*``, ``[B, C, D]`` per chunk of ``batch_size`` rows of ``x``
        (default: chunks of about :data:`~curvops.nn.jacobian.ELEMENTS_PER_CHUNK` entries)."""
        entries = max(1, math.prod(self.output_shape)) * self.model.size
        for _, chunk in datum_chunks(x, entries, batch_size):
            self.check_model()
            yield datum_jacobians(self.model, self.theta, chunk)

    def sampled_outputs(self, samples: Tensor, x: Tensor) -> Tensor:
        """``f(x, θ_s)`` for flat parameter samples ``[S, D]``: ``[S, B, ...]``."""
        sizes = [t.numel() for t in self.theta.values()]
        outputs = []
        with torch.no_grad():
            for theta in samples:
                params = {
                    name: part.reshape(value.shape)
                    for (name, value), part in zip(self.theta.items(), theta.split(sizes), strict=True)
                }
                outputs.append(self.forward(params, x))
        return torch.stack(outputs)
