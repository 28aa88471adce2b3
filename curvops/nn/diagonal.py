"""The exact diagonal of the GGN of a summed loss, from per-datum Jacobians.

Used by :class:`~curvops.laplace.Laplace` (``curvature="diagonal"``); it is the diagonal of the
*summed* loss ``Σ_n ℓ_n`` whatever the loss's reduction, so it is not exported as a builder.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

from ..distributed import Shards
from ..linalg import BlockDiagonal, Diagonal
from .batches import data_count, is_empty
from .forward_checks import fixed_forward
from .jacobian import datum_chunks, datum_jacobians
from .losses import LossAdapter, loss_hessian_factor
from .model import ModelData
from .shard_sums import union_sums


def summed_ggn_diagonal(model: ModelData, loss: LossAdapter, group: Any = None) -> BlockDiagonal:
    """``diag(Σ_n J_n^T ∇²ℓ_n J_n)`` of the summed loss, one labelled ``Diagonal`` per parameter.

    Per datum ``Σ_k (J_n^T s_nk)²`` over the columns ``s_nk`` of ``∇²ℓ_n = S_n S_n^T``
    (:func:`~curvops.nn.losses.loss_hessian_factor`), with ``J_n`` from
    :func:`~curvops.nn.jacobian.datum_jacobians` in bounded chunks; one pass over the data
    (in any batch order). Over shards the ``[D]`` sums of the ranks are all-reduced once.

    Args:
        model: the model, its chosen parameters (the diagonal is at their values) and the data
            (with ``allow_empty`` for a rank's empty shard).
        loss: a likelihood loss (``MSELoss``, ``CrossEntropyLoss`` on ``[N, C]`` outputs,
            ``BCEWithLogitsLoss``).
        group: the process group whose ranks hold shards of the data (``None``: the default
            group when torch.distributed is initialized); ``"local"`` keeps this process's data
            alone. Every rank gets the diagonal of the union.

    Example:
        >>> model = ModelData(torch.nn.Linear(2, 1), [(torch.ones(3, 2), torch.zeros(3, 1))])
        >>> diagonal = summed_ggn_diagonal(model, LossAdapter(torch.nn.MSELoss()))
        >>> diagonal.labels, diagonal.diagonal().tolist()  # 2 Σ_n x_n² per weight, 2 N for the bias
        (('weight', 'bias'), [6.0, 6.0, 6.0])
    """
    (total,), _ = union_sums(
        Shards.of(group),
        lambda: ([_local_diagonal(model, loss)], []),
        lambda: ([torch.zeros(model.size, dtype=model.dtype, device=model.device)], []),
        model.device,
        what="the GGN diagonal",
    )
    offsets = list(itertools.accumulate([p.numel() for p in model.params], initial=0))
    blocks = [Diagonal(total[a:b]) for a, b in itertools.pairwise(offsets)]
    return BlockDiagonal(blocks, model.names)


def _local_diagonal(model: ModelData, loss: LossAdapter) -> Tensor:
    """``Σ_n diag(J_n^T ∇²ℓ_n J_n)`` over this process's batches, ``[D]``."""
    params = model.param_dict()
    total = torch.zeros(model.size, dtype=model.dtype, device=model.device)
    for index, inputs, targets in model.batches("diagonal GGN", any_order=True):
        _add_batch_diagonal(total, model, loss, params, index, inputs, targets)
    return total


def _add_batch_diagonal(
    total: Tensor,
    model: ModelData,
    loss: LossAdapter,
    params: dict[str, Tensor],
    index: int,
    inputs: Tensor,
    targets: Tensor,
) -> None:
    """Add batch ``index``'s ``Σ_n diag(J_n^T ∇²ℓ_n J_n)`` to ``total`` (``[D]``), chunk by chunk."""
    if is_empty(inputs):
        return
    with fixed_forward():
        output = model.forward(params, inputs)
    model.check_output(index, output)
    loss.check_target(output, targets, index)
    factor = loss_hessian_factor(loss, output, targets, where=f"Batch {index}")
    factor = factor.reshape(factor.shape[0], output.shape[0], -1)  # [K, N, C·positions]
    for start, chunk in datum_chunks(inputs, factor.shape[2] * model.size):
        jac = datum_jacobians(model, params, chunk)  # [B, C, D]
        columns = factor[:, start : start + data_count(chunk)]
        total += torch.einsum("bcd,kbc->kbd", jac, columns).square().sum(dim=(0, 1))
