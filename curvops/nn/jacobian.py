"""The Jacobian of a model's outputs with respect to its parameters: over a data set as a
linear map (:class:`Jacobian`, products by forward and reverse mode), and datum by datum as
tensors (:func:`datum_jacobians`, for the GLM predictive and the diagonal GGN)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, vjp, vmap
from torch.utils._pytree import tree_map

from ..errors import NonDeterministicDataError
from ..linalg.checks import check_positive_int
from ..linalg.linear_map import LinearMap
from .batches import data_count, data_rows
from .forward_checks import fixed_forward
from .jacobian_products import add_trees, pull_back, push_forward
from .model import ModelData

ELEMENTS_PER_CHUNK = 2**22
"""The entries of a chunk of per-datum Jacobians ``[B, C, D]`` by default (32 MiB in float64)."""


def datum_jacobians(model: ModelData, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """``J_n = ∂f(x_n)/∂θ`` at ``params`` for every datum ``x_n`` of ``x``: ``[B, C, D]``.

    ``C`` is one datum's output size (flattened row-major), ``D`` the chosen parameters' size
    in their order. One ``vmap`` over the data of reverse mode (``jacrev``) on a single
    datum: ``C`` backward passes' work per datum, and memory ``O(B C D)``
    (:func:`datum_chunks` bounds ``B``). The model's forward passes must not draw random
    numbers (:func:`~curvops.nn.model.fixed_forward`).

    Args:
        model: the model and its chosen parameters (their names and order).
        params: ``{name: tensor}`` of the chosen parameters (:meth:`ModelData.param_dict`, or a
            copy of their values) to differentiate at.
        x: inputs ``[B, ...]`` (or a tree of them: :class:`~curvops.nn.mappings.ModelInputs`).

    Example:
        >>> model = ModelData(torch.nn.Linear(3, 2), [(torch.randn(4, 3), None)])
        >>> x = torch.randn(5, 3)
        >>> jac = datum_jacobians(model, model.param_dict(), x)
        >>> jac.shape
        torch.Size([5, 2, 8])
        >>> torch.allclose(jac[1], torch.cat([torch.kron(torch.eye(2), x[1]), torch.eye(2)], dim=1))
        True
    """

    def single(values: dict[str, Tensor], datum: Any) -> Tensor:
        return model.forward(values, tree_map(lambda t: t.unsqueeze(0), datum)).reshape(-1)

    with fixed_forward():
        jac = vmap(jacrev(single), in_dims=(None, 0))(params, x)
    return torch.cat([jac[name].flatten(2) for name in model.names], dim=2)


def datum_chunks(x: Any, datum_entries: int, batch_size: int | None = None) -> Iterator[tuple[int, Any]]:
    """``(start, x[start:start + B])`` over the rows of ``x`` (of every tensor of a tree), ``B = batch_size``.

    By default ``B`` keeps a chunk's per-datum Jacobians (``datum_entries = C·D`` entries per
    datum) near :data:`ELEMENTS_PER_CHUNK` entries.

    Example:
        >>> [(start, len(chunk)) for start, chunk in datum_chunks(torch.zeros(5, 3), 8, batch_size=2)]
        [(0, 2), (2, 2), (4, 1)]
    """
    if batch_size is None:
        batch_size = max(1, ELEMENTS_PER_CHUNK // max(1, datum_entries))
    else:
        check_positive_int(batch_size, "batch_size")
    for start in range(0, data_count(x), batch_size):
        yield start, data_rows(x, start, start + batch_size)


class Jacobian(LinearMap):
    """``J = ∂f/∂θ`` stacked over the data, as a map of shape ``(M, D)``.

    Row order: batch by batch, each output ``f(X_b)`` flattened row-major, so ``J @ v`` is
    ``torch.cat([jvp(f(X_b)).flatten() for b])``; ``M`` is the total number of output entries.
    ``J @ V`` runs one ``vmap``-ed ``jvp`` per batch for all columns of ``V``; ``J.T @ U`` one
    ``vjp`` per batch, pulled back column by column. The per-datum blocks ``J_n`` that GLM
    predictives (``J_n P^-1 J_n^T``) and the diagonal GGN need come from
    :func:`datum_jacobians` instead. Parameters are snapshotted by reference as for the
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
