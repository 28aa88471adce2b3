"""Closed-form output gradients of the likelihood losses, for ``"mc"`` and ``"empirical"`` columns.

A statistics pass needs, per batch, ``∇_f Σ_n ℓ(f_n, y_n)`` at drawn (or true) labels. Autodiff
through the loss (a ``vmap`` over the drawn labels of ``torch.func.grad``) costs more than the
layer products on small outputs; for the likelihood losses the gradient is a closed form:

- ``CrossEntropyLoss`` (no class weights, no label smoothing): ``softmax(f) - onehot(y)`` at
  class indices (zero at ``ignore_index``), ``softmax(f) Σ_k y_k - y`` at probabilities;
- ``MSELoss``: ``2 (f - y)``;
- ``BCEWithLogitsLoss`` (no ``weight``, no ``pos_weight``): ``σ(f) - y``.

Other losses (and these with weights or smoothing) have no closed form here: autodiff.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def summed_loss_gradient(loss_fn: object, output: Tensor, target: Tensor) -> Tensor | None:
    """``∇_f Σ ℓ(f, y)`` of the summed loss (``reduction="sum"``'s gradient) in closed form, or
    ``None`` where there is none (see the module docstring). ``target`` may carry leading axes of
    draws (``[M, *target_shape]``): the result is then ``[M, *output.shape]``.

    Example:
        >>> f, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
        >>> truth = torch.func.grad(lambda o: torch.nn.functional.cross_entropy(o, y, reduction="sum"))(f)
        >>> torch.allclose(summed_loss_gradient(torch.nn.CrossEntropyLoss(), f, y), truth)
        True
    """
    if type(loss_fn) is nn.MSELoss:
        return 2.0 * (output - target)
    if type(loss_fn) is nn.BCEWithLogitsLoss and loss_fn.weight is None and loss_fn.pos_weight is None:
        return torch.sigmoid(output) - target
    if type(loss_fn) is not nn.CrossEntropyLoss or loss_fn.weight is not None or loss_fn.label_smoothing:
        return None
    if output.ndim < 2:
        return None
    probabilities = torch.softmax(output, dim=1)
    if target.is_floating_point():  # probabilities [*draws, N, C, ...]
        class_axis = target.ndim - output.ndim + 1
        return probabilities * target.sum(dim=class_axis, keepdim=True) - target
    class_axis = target.ndim - output.ndim + 2
    valid = target != loss_fn.ignore_index
    onehot = nn.functional.one_hot(torch.where(valid, target, 0), output.shape[1]).movedim(-1, class_axis)
    return (probabilities - onehot.to(output.dtype)) * valid.unsqueeze(class_axis).to(output.dtype)


def mean_divisor(loss_fn: object, output: Tensor, target: Tensor) -> float | Tensor:
    """What ``reduction="mean"`` divides one draw's summed loss by, for the losses of
    :func:`summed_loss_gradient`: the target's elements (MSE, BCE), its positions (cross-entropy
    at probabilities) or its targets that are not ``ignore_index`` (class indices: a tensor, one
    count per draw shaped to divide the gradient, so that no value leaves a ``torch.func``
    transform); ``target`` may carry leading axes of draws."""
    if type(loss_fn) is not nn.CrossEntropyLoss:
        return float(output.numel())
    if target.is_floating_point():
        return float(output.numel() // output.shape[1])
    draws = target.ndim - output.ndim + 1
    kept = (target != loss_fn.ignore_index).flatten(draws).sum(-1).to(output.dtype)
    return kept.reshape(*kept.shape, *[1] * output.ndim)
