"""The pass over the training data at ``θ*``, and the curvature ``K`` of the summed negative
log-likelihood: a named curvature built here, or a prebuilt operator checked. Over shards
(``group``) both are the union's: the pass's sums are reduced over the ranks, and the builders
get the group."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value

from ..distributed import Shards
from ..linalg import CurvatureOperator, computation_dtype
from ..nn.approximations import KRONECKER_APPROXIMATIONS
from ..nn.curvature import GGN, computation_copy, dense_operator
from ..nn.diagonal import summed_ggn_diagonal
from ..nn.forward_checks import fixed_forward
from ..nn.kfac import kronecker_approximation
from ..nn.losses import LossAdapter
from ..nn.model import ModelData
from ..nn.shard_sums import Part, union_sums
from ..nn.staleness import check_built_from

CURVATURES = (*KRONECKER_APPROXIMATIONS, "diagonal", "full")


@dataclass(frozen=True)
class DataFit:
    """One pass over the training data at ``θ*`` with the loss as given (``σ`` not applied), over
    the union of the shards (:func:`read_data`).

    Attributes:
        loss: ``L_sum(θ*) = Σ_n ℓ_n``, a 0-dim tensor.
        gradient: ``∇L_sum(θ*)``, ``[D]``.
        num_terms: ``N``, the number of loss terms.
        output_shape: one datum's output shape.
        input_example: the first batch's input shape (``None`` for non-tensor inputs), for errors.
    """

    loss: Tensor
    gradient: Tensor
    num_terms: float
    output_shape: tuple[int, ...]
    input_example: tuple[int, ...] | None


def likelihood_of(loss_fn: Any) -> str:
    """``"regression"`` (``MSELoss``), ``"classification"`` (``CrossEntropyLoss``) or ``"binary"``."""
    if isinstance(loss_fn, nn.MSELoss):
        return "regression"
    return "classification" if isinstance(loss_fn, nn.CrossEntropyLoss) else "binary"


def read_data(model: ModelData, loss: LossAdapter, theta: dict[str, Tensor], shards: Shards) -> DataFit:
    """``L_sum(θ*)``, ``∇L_sum(θ*)``, ``N`` and the output shape, in one pass over the data: this
    rank's sums, then summed over the ranks of ``shards`` (a rank without loss terms adds zeros;
    an error on one rank is raised on every rank)."""
    shapes: list[tuple] = []  # of this rank's first batch with loss terms

    def zeros() -> Part:
        place = {"dtype": model.dtype, "device": model.device}
        return [torch.zeros((), **place), torch.zeros(model.size, **place)], [0.0]

    def local() -> Part:
        (total, gradient), (count,) = zeros()
        for index, inputs, targets in model.batches("Laplace: loss at the trained parameters"):
            batch_count = loss.count(targets)
            if not batch_count:
                continue
            value, grads, output = _batch_loss(model, loss, theta, index, inputs, targets, batch_count)
            if not shapes:
                shapes.append(
                    (tuple(output.shape[1:]), tuple(inputs.shape) if isinstance(inputs, Tensor) else None)
                )
            total = total + value
            gradient = gradient + torch.cat([grads[name].reshape(-1) for name in model.names])
            count += batch_count
        return [total, gradient], [count]

    (total, gradient), (count,) = union_sums(shards, local, zeros, model.device, what="Laplace: the data fit")
    if not count:
        where = " on any rank" if shards.active else ""
        raise ValueError(f"The data has no loss terms{where} (every target is ignored).")
    own = shapes[0] if shapes else None
    ranks = shards.gather(own)  # every rank joins: a rank without loss terms takes another's
    return DataFit(total, gradient, count, *(own or next(s for s in ranks if s is not None)))


def _batch_loss(
    model, loss, theta, index, inputs, targets, count
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Batch ``index``'s summed loss ``Σ_{n in b} ℓ_n``, its gradient ``{name: tensor}`` and output."""
    scale = loss.batch_scale(count)

    def summed(params: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        output = model.forward(params, inputs)
        loss.check_target(output, targets, index)
        return scale * loss(output, targets), output

    with fixed_forward():
        grads, (value, output) = grad_and_value(summed, has_aux=True)(theta)
    model.check_output(index, output)
    if not bool(torch.isfinite(value)):
        raise ValueError(f"Batch {index}: the loss is {value.item()} (NaN or inf).")
    return value.detach(), grads, output


def summed_negative_log_likelihood(fit: DataFit, sigma_noise: float | None) -> Tensor:
    """``L_sum(θ*)``; for a Gaussian ``N(f, σ² I)`` ``Σ (f - y)² / (2σ²) + (N/2) log(2πσ²)``."""
    if sigma_noise is None:
        return fit.loss
    variance = sigma_noise**2
    return fit.loss / (2 * variance) + 0.5 * fit.num_terms * math.log(2 * math.pi * variance)


def likelihood_scale(sigma_noise: float | None) -> float:
    """The factor from ``Σ (f - y)²`` to the Gaussian's ``Σ (f - y)² / (2σ²)`` (1 without ``σ``)."""
    return 1.0 if sigma_noise is None else 1.0 / (2.0 * sigma_noise**2)


def curvature_scale(
    curvature: str | CurvatureOperator, loss: LossAdapter, num_terms: float, sigma_noise: float | None
) -> float:
    """The factor turning the operator of :func:`build_curvature` into ``K`` of the summed NLL.

    An operator of ``loss_fn`` has the loss's reduction (``N`` for ``"mean"``); the diagonal
    is of the summed loss already.
    """
    summed = isinstance(curvature, str) and curvature == "diagonal"
    reduction = num_terms if loss.reduction == "mean" and not summed else 1.0
    return likelihood_scale(sigma_noise) * reduction


def build_curvature(
    curvature: str | CurvatureOperator,
    model: ModelData,
    loss: LossAdapter,
    options: dict[str, Any] | None,
    group: Any,
) -> CurvatureOperator:
    """The curvature operator of ``loss_fn`` (as it reduces), or the summed GGN's diagonal, over
    the union of the shards of ``group``; checked to match the parameters (size, dtype, device)."""
    options = dict(options or {})
    if "group" in options:
        raise ValueError("curvature_options['group']: pass group= to Laplace itself.")
    if not isinstance(curvature, str):
        op = _prebuilt(curvature, options)
    else:
        op = _named(curvature, model, loss, options, group)
    if op.shape[0] != model.size:
        raise ValueError(
            f"The curvature operator has size {op.shape[0]}, but the parameters have {model.size} "
            "entries; build it from the same model and params."
        )
    if op.dtype != model.dtype or op.device != model.device:
        raise ValueError(
            f"The curvature operator is {op.dtype} on {op.device}, the parameters {model.dtype} on "
            f"{model.device}."
        )
    return op


def _prebuilt(curvature: CurvatureOperator, options: dict[str, Any]) -> CurvatureOperator:
    """A user's operator: fresh, without options; a matrix-free one made dense once."""
    check_built_from(curvature)
    if options:
        raise ValueError("curvature_options apply to named curvatures, not to a prebuilt operator.")
    if not curvature.matrix_free:
        return curvature
    if computation_dtype(curvature.dtype) != curvature.dtype:
        raise TypeError(
            f"curvature is a {curvature.dtype} {type(curvature).__name__}: its dense matrix from "
            f"{curvature.dtype} products swamps the small eigenvalues of the posterior. Pass "
            "curvature='full', which computes the GGN on a float32 copy of the model."
        )
    return dense_operator(curvature)


def _named(
    curvature: str, model: ModelData, loss: LossAdapter, options: dict[str, Any], group: Any
) -> CurvatureOperator:
    """One of :data:`CURVATURES`, over the data of ``model`` (its passes checked against the first)
    and of the other ranks of ``group``."""
    if curvature in ("diagonal", "full") and options:
        raise ValueError(f"curvature={curvature!r} takes no curvature_options (it is the exact GGN's).")
    if curvature == "diagonal":
        return summed_ggn_diagonal(model, loss, group=group)
    data = model.checked_data("Laplace curvature")
    if curvature == "full":
        copy, params = computation_copy(model)
        return dense_operator(GGN(copy, loss.loss_fn, data, params=params, group=group), model.dtype)
    options.setdefault("fisher_type", "type-2")
    return kronecker_approximation(
        curvature, model.model, loss.loss_fn, data, params=model.params, group=group, **options
    )
