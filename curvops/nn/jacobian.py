"""The Jacobian of a model's outputs over a data set with respect to its parameters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import vjp

from ..errors import NonDeterministicDataError
from ..linalg.linear_map import LinearMap
from .forward_checks import fixed_forward
from .jacobian_products import add_trees, pull_back, push_forward
from .model import ModelData


class Jacobian(LinearMap):
    """``J = ∂f/∂θ`` stacked over the data, as a map of shape ``(M, D)``.

    Row order: batch by batch, each output ``f(X_b)`` flattened row-major, so ``J @ v`` is
    ``torch.cat([jvp(f(X_b)).flatten() for b])``; ``M`` is the total number of output entries.
    ``J @ V`` runs one ``vmap``-ed ``jvp`` per batch for all columns of ``V``; ``J.T @ U`` one
    ``vjp`` per batch, pulled back column by column. Used for GLM predictives in Laplace
    approximations (``J P^-1 J^T``). Parameters are snapshotted by reference as for the
    curvature operators: after they change, products raise
    :class:`~curvops.errors.StaleParametersError`.

    Args:
        model: the network ``f``.
        data: a re-iterable of ``(X, y)`` batches, or one pair ``(X, y)`` with a tensor ``X``;
            ``y`` is not used and may be ``None``.
        params: the parameters ``θ``, trainable or frozen, a list or a dict of them (default:
            the model's trainable ones, in order).
        progressbar: a tqdm bar on every pass over the data.
        check_deterministic: raise when a pass sees other data or outputs than the first.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> jac = curvops.Jacobian(model, [(x, None)])
        >>> jac.shape
        (8, 8)
        >>> v = torch.randn(8)
        >>> torch.allclose(jac @ v, (x @ v[:6].reshape(2, 3).T + v[6:]).flatten(), atol=1e-6)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable,
        params: Sequence[nn.Parameter] | None = None,
        progressbar: bool = False,
        check_deterministic: bool = False,
    ) -> None:
        self._model = ModelData(model, data, params, progressbar, check_deterministic)
        params = self._model.param_dict()
        self._output_shapes = []
        with torch.no_grad():
            for index, inputs, _ in self._model.batches("Jacobian: reading data"):
                with fixed_forward():
                    output = self._model.forward(params, inputs)
                self._model.check_output(index, output)
                self._output_shapes.append(output.shape)
        rows = sum(shape.numel() for shape in self._output_shapes)
        super().__init__((rows, self._model.size), self._model.dtype, self._model.device)

    def _matmat(self, x: Tensor) -> Tensor:
        tree = self._model.to_tree(x)
        params = self._model.param_dict()
        blocks = []
        for index, inputs, _ in self._model.batches("Jacobian product"):
            forward = lambda p: self._model.forward(p, inputs)  # noqa: E731, B023
            with fixed_forward():
                output, tangents = push_forward(forward, params, tree)
            self._check_output(index, output)
            blocks.append(tangents.reshape(x.shape[1], -1).T)
        return torch.cat(blocks, dim=0)

    def _rmatmat(self, y: Tensor) -> Tensor:
        params = self._model.param_dict()
        parts = y.split([shape.numel() for shape in self._output_shapes], dim=0)
        total = None
        for index, inputs, _ in self._model.batches("Jacobian transpose product"):
            with fixed_forward():
                output, pullback = vjp(lambda p: self._model.forward(p, inputs), params)  # noqa: B023
            self._check_output(index, output)
            cotangents = parts[index].T.reshape(y.shape[1], *self._output_shapes[index])
            total = add_trees(total, pull_back(pullback, cotangents))
        return self._model.from_tree(total)

    def _check_output(self, index: int, output: Tensor) -> None:
        """Finite, and shaped as batch ``index``'s output on the first pass (its rows of ``J``)."""
        expected = self._output_shapes[index]
        if output.shape != expected:
            raise NonDeterministicDataError(
                f"Jacobian: batch {index} gives outputs of shape {list(output.shape)}, {list(expected)} on "
                "the first pass: the rows of J are the outputs batch by batch, so the batches must be the "
                "same on every pass; use a fixed, non-shuffled loader (shuffle=False)."
            )
        self._model.check_output(index, output)
