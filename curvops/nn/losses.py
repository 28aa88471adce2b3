"""What curvops needs to know about a loss function: how it reduces, and its likelihood.

A curvature operator represents the loss over the whole data set as the loss's own
``reduction`` defines it. With ``reduction="sum"`` that is ``Σ_batches loss(f(X_b), y_b)``;
with ``"mean"`` each batch's mean is weighted by the number of terms it averages over,
``count_b / Σ count``, so the result never depends on the batching (:meth:`LossAdapter.count`):

- ``MSELoss``, ``BCEWithLogitsLoss`` and the other element-wise losses of ``torch.nn``
  (``L1Loss``, ``SmoothL1Loss``, ``HuberLoss``, ``PoissonNLLLoss``, ``BCELoss``,
  ``SoftMarginLoss``, ``HingeEmbeddingLoss``, ``KLDivLoss``): every element of the target;
- ``CrossEntropyLoss``, ``NLLLoss`` with class indices: every target that is not
  ``ignore_index`` (weighted by the class ``weight`` when one is set, with or without label
  smoothing), over all extra axes (``[N, C, d1, ...]`` outputs); ``CrossEntropyLoss`` with
  probabilities: every position ``[N, d1, ...]``, unweighted (as torch averages);
- any other callable ``loss(output, target)``: the batch's first axis (``len(target)``),
  unless it has an attribute ``reduction == "sum"``.

Targets equal to ``ignore_index`` are no loss terms (:meth:`LossAdapter.valid_terms`): the
Kronecker factors leave them out (:mod:`curvops.nn.layers.rule`).

A *datum* is one row (first axis) of the model output; per-datum losses ``ℓ_n`` sum over
the row's other axes (tokens, pixels, output units). The Fisher types ``"mc"`` and
``"empirical"`` need a likelihood: ``MSELoss`` is ``N(f, ½ I)`` (``Σ (f - y)²`` is ``-log p``
up to a constant), ``CrossEntropyLoss`` a categorical over axis 1, ``BCEWithLogitsLoss``
independent Bernoullis. ``"type-2"`` needs only ``∇²_f ℓ_n`` (:func:`loss_hessian_factor`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .loss_gradients import mean_divisor, summed_loss_gradient
from .loss_hessians import generic_hessian_factor

LIKELIHOOD_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)

MAX_FACTOR_NUMBERS = 2**26
"""The most numbers of one batch's loss-Hessian columns (:func:`loss_hessian_factor`)."""
CLASS_INDEX_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)
"""Losses of class indices with an ``ignore_index`` and class weights that their mean divides by."""
ELEMENTWISE_LOSSES = (
    nn.MSELoss,
    nn.BCEWithLogitsLoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.PoissonNLLLoss,
    nn.BCELoss,
    nn.SoftMarginLoss,
    nn.HingeEmbeddingLoss,
    nn.KLDivLoss,
)
"""Losses whose mean is over every element of the target."""


def _class_axis_hint(shape: list[int], given: list[int]) -> str:
    """A fix for class indices that do not match an output with classes on axis 1."""
    if given == [*shape[:1], 1, *shape[2:]]:
        return " Drop the extra axis: y.squeeze(1)."
    if len(shape) >= 3 and given == shape[:-1]:
        batch, *positions, classes = shape
        flat = [batch * math.prod(positions), classes]
        return (
            f" The output looks like [B, S, C] = {shape}: torch wants the classes on axis 1, "
            f"output.movedim(-1, 1) of shape {[batch, classes, *positions]}, or a flattened output "
            f"{flat} with targets [{flat[0]}] (a model that ends in output.flatten(0, -2))."
        )
    return ""


class LossAdapter:
    """A loss function with its reduction rule and, for the supported losses, its likelihood.

    Args:
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss`` (reduction
            ``"mean"`` or ``"sum"``) or any ``torch.func``-differentiable ``loss(output, target)``.
        likelihood: require one of the three likelihood losses (for the Fisher types "mc" and
            "empirical").
        what: the operator's name, for error messages.

    Example:
        >>> loss = LossAdapter(torch.nn.CrossEntropyLoss(ignore_index=-1))
        >>> loss.count(torch.tensor([0, 2, -1]))
        2.0
    """

    def __init__(
        self, loss_fn: Callable[[Tensor, Tensor], Tensor], likelihood: bool = False, what: str = ""
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
        reduction = getattr(loss_fn, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"loss_fn has reduction={reduction!r}; curvops needs 'mean' or 'sum' "
                "(the curvature of the reduced loss over the whole data set)."
            )
        if likelihood and not isinstance(loss_fn, LIKELIHOOD_LOSSES):
            names = ", ".join(f"nn.{cls.__name__}" for cls in LIKELIHOOD_LOSSES)
            raise ValueError(
                f"{what} needs a loss that is a negative log-likelihood: one of {names}; "
                f"got {type(loss_fn).__name__}. Use curvops.GGN or curvops.Hessian for other losses."
            )
        self.loss_fn = loss_fn
        self.reduction = reduction

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        if isinstance(self.loss_fn, (nn.MSELoss, nn.HuberLoss, nn.SmoothL1Loss)):
            # the same value as the torch loss, written out: its fused kernel has no
            # forward-over-reverse derivative under torch.func
            terms = _residual_terms(self.loss_fn, output - target)
            return terms.mean() if self.reduction == "mean" else terms.sum()
        return self.loss_fn(output, target)

    def check_target(self, output: Tensor, target: Any, index: int) -> None:
        """Raise a ``ValueError`` naming batch ``index`` and the expected shape unless ``target``
        fits ``output`` (only its shape is read, so ``output`` may be a transformed tensor).

        - ``MSELoss``, ``BCEWithLogitsLoss``: a target of exactly the output's shape (no
          broadcasting), float for ``BCEWithLogitsLoss``;
        - ``CrossEntropyLoss`` on an output ``[N, C, d1, ...]``: ``int64`` class indices
          ``[N, d1, ...]`` in ``0 .. C-1`` (or ``ignore_index``), or float probabilities of the
          output's shape;
        - any other loss: not checked.

        Example:
            >>> loss = LossAdapter(torch.nn.MSELoss())
            >>> loss.check_target(torch.zeros(4, 3), torch.zeros(4, 1), index=2)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: Batch 2: MSELoss needs a target of the output's shape [4, 3], got [4, 1] ...
        """
        if not isinstance(self.loss_fn, LIKELIHOOD_LOSSES):
            return
        name = type(self.loss_fn).__name__
        if not isinstance(target, Tensor):
            raise TypeError(f"Batch {index}: {name} needs a tensor target, got {type(target).__name__}.")
        shape, given = list(output.shape), list(target.shape)
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            self._check_classes(shape, target, index)
            return
        if given != shape:
            raise ValueError(
                f"Batch {index}: {name} needs a target of the output's shape {shape}, got {given} "
                "(it would be broadcast)."
            )
        if isinstance(self.loss_fn, nn.BCEWithLogitsLoss) and not target.is_floating_point():
            raise ValueError(
                f"Batch {index}: {name} needs a float target, got {target.dtype}; use y.float()."
            )

    def _check_classes(self, shape: list[int], target: Tensor, index: int) -> None:
        """:meth:`check_target` for ``CrossEntropyLoss``: classes on axis 1 of the output."""
        if len(shape) < 2:
            raise ValueError(
                f"Batch {index}: CrossEntropyLoss needs an output [N, C] (classes on axis 1), got {shape}."
            )
        labels, given = shape[:1] + shape[2:], list(target.shape)
        if target.is_floating_point():
            if given == shape:
                return  # class probabilities
            hint = "; class indices must be int64: use y.long()" if given == labels else ""
            raise ValueError(
                f"Batch {index}: CrossEntropyLoss on an output {shape} needs int64 class indices of shape "
                f"{labels} or float probabilities of shape {shape}, got a {target.dtype} target of shape "
                f"{given}{hint}."
            )
        if given != labels:
            raise ValueError(
                f"Batch {index}: CrossEntropyLoss on an output {shape} (classes on axis 1) needs class "
                f"indices of shape {labels}, got {given}.{_class_axis_hint(shape, given)}"
            )
        if target.dtype != torch.int64:
            raise ValueError(
                f"Batch {index}: CrossEntropyLoss needs int64 class indices, got {target.dtype}; "
                "use y.long()."
            )
        classes, ignored = shape[1], self.loss_fn.ignore_index
        bad = target[(target != ignored) & ((target < 0) | (target >= classes))]
        if bad.numel():
            raise ValueError(
                f"Batch {index}: class index {int(bad[0])} is out of range for {classes} classes "
                f"(0 .. {classes - 1}, or ignore_index={ignored})."
            )

    def batch_scale(self, count: float) -> float:
        """``s`` with ``s · loss(f(X_b), y_b) = Σ_{n in b} ℓ_n`` for a batch of ``count`` loss terms."""
        return count if self.reduction == "mean" else 1.0

    def datum_gradients(self, output: Tensor, target: Tensor, count: float, draws: bool = False) -> Tensor:
        """``∇_f ℓ_n`` for every datum of a batch: the gradient of its summed loss w.r.t. ``output``,
        ``s ∇_f loss(f, y)`` with ``s`` the :meth:`batch_scale` of ``count`` loss terms. ``draws``:
        ``target`` carries a leading axis of drawn labels (``[M, *target_shape]``, ``"mc"``), and so
        does the result (``[M, *output.shape]``).

        In closed form for the likelihood losses (:mod:`curvops.nn.loss_gradients`), else by autodiff.
        """
        scale = self.batch_scale(count)
        closed = summed_loss_gradient(self.loss_fn, output, target)
        if closed is not None:
            if self.reduction == "sum":
                return closed * scale
            return closed * (scale / mean_divisor(self.loss_fn, output, target))
        gradient = torch.func.grad(lambda o, t: scale * self(o, t))
        if draws:
            return torch.func.vmap(gradient, in_dims=(None, 0))(output, target)
        return gradient(output, target)

    def count(self, target: Tensor) -> float:
        """The number of terms the ``mean`` reduction divides a batch's summed loss by (see the
        module docstring).

        Example:
            >>> LossAdapter(torch.nn.HuberLoss()).count(torch.zeros(4, 3))
            12.0
        """
        loss = self.loss_fn
        if isinstance(loss, ELEMENTWISE_LOSSES):
            return float(target.numel())
        if isinstance(loss, CLASS_INDEX_LOSSES):
            if target.is_floating_point():  # probabilities [N, C, ...] (other shapes: check_target)
                return float(target.numel() // target.shape[1] if target.ndim > 1 else len(target))
            kept = target[target != loss.ignore_index]
            if loss.weight is None:
                return float(kept.numel())
            classes = loss.weight.numel()
            outside = kept[(kept < 0) | (kept >= classes)]
            if outside.numel():
                raise ValueError(
                    f"A class index is out of range for the {classes} class weights (0 .. {classes - 1}, "
                    f"or ignore_index={loss.ignore_index}): {outside[:5].tolist()}."
                )
            return float(loss.weight[kept].sum().item())
        return float(len(target))

    def valid_terms(self, target: Any) -> Tensor | None:
        """Which targets are loss terms, ``[N, d1, ...]`` booleans (class indices that are not
        ``ignore_index``); ``None`` when all are (and for losses without an ``ignore_index``).

        Example:
            >>> LossAdapter(torch.nn.CrossEntropyLoss(ignore_index=-1)).valid_terms(torch.tensor([0, -1]))
            tensor([ True, False])
        """
        if not isinstance(self.loss_fn, CLASS_INDEX_LOSSES) or target.is_floating_point():
            return None
        valid = target != self.loss_fn.ignore_index
        return None if bool(valid.all()) else valid

    def check_sampling(self, what: str) -> None:
        """Raise unless labels sampled from the model give the Fisher of this loss."""
        loss = self.loss_fn
        if getattr(loss, "weight", None) is not None or getattr(loss, "pos_weight", None) is not None:
            raise ValueError(f"{what}: a weighted loss is not a negative log-likelihood; drop `weight`.")
        if getattr(loss, "label_smoothing", 0.0):
            raise ValueError(f"{what}: label smoothing is not a likelihood; set label_smoothing=0.")

    def sample_batch(self, output: Tensor, target: Tensor, count: int, seed: int, index: int) -> Tensor:
        """:meth:`sample` for batch ``index`` from a generator seeded with ``(seed, index)``: every
        pass over the data, and every operator with the same ``seed``, draws the same labels."""
        generator = torch.Generator(device=output.device).manual_seed((seed * 1_000_003 + index) % 2**64)
        return self.sample(output, target, count, generator)

    def sample(self, output: Tensor, target: Tensor, count: int, generator: torch.Generator) -> Tensor:
        """``count`` targets drawn from the model's predictive distribution, ``[count, *target.shape]``.

        ``MSELoss``: ``f + ε/√2``; ``CrossEntropyLoss``: a class per position from
        ``softmax`` over axis 1, kept at ``ignore_index`` where the true target is;
        ``BCEWithLogitsLoss``: ``Bernoulli(sigmoid(f))``.
        """
        loss = self.loss_fn
        shape = (count, *output.shape)
        if isinstance(loss, nn.MSELoss):
            noise = torch.randn(shape, generator=generator, device=output.device, dtype=output.dtype)
            return output + noise / math.sqrt(2.0)
        if isinstance(loss, nn.BCEWithLogitsLoss):
            uniform = torch.rand(shape, generator=generator, device=output.device, dtype=output.dtype)
            return (uniform < torch.sigmoid(output)).to(output.dtype)
        probabilities = torch.softmax(output, dim=1).movedim(1, -1)
        flat = probabilities.reshape(-1, probabilities.shape[-1])
        classes = torch.multinomial(flat, count, replacement=True, generator=generator).T
        classes = classes.reshape(count, *probabilities.shape[:-1])
        if target.is_floating_point():
            return nn.functional.one_hot(classes, output.shape[1]).movedim(-1, 2).to(output.dtype)
        return torch.where(target == loss.ignore_index, target, classes)


def _residual_terms(loss_fn: nn.Module, residual: Tensor) -> Tensor:
    """The unreduced terms of ``MSELoss``, ``HuberLoss`` (``delta``) and ``SmoothL1Loss`` (``beta``)."""
    if isinstance(loss_fn, nn.MSELoss):
        return residual.square()
    size = residual.abs()
    width = loss_fn.delta if isinstance(loss_fn, nn.HuberLoss) else loss_fn.beta
    if width == 0:
        return size
    if isinstance(loss_fn, nn.HuberLoss):
        return torch.where(size < width, 0.5 * residual.square(), width * (size - 0.5 * width))
    return torch.where(size < width, 0.5 * residual.square() / width, size - 0.5 * width)


def loss_hessian_factor(
    loss: LossAdapter, output: Tensor, targets: Tensor, count: float | None = None, where: str = "This batch"
) -> Tensor:
    """Columns ``S`` with ``Σ_c S_c S_c^T = ∇²_f ℓ`` per datum and position, ``[K, *output.shape]``.

    Closed forms:

    - ``MSELoss``: ``√2 e_j`` for every output element;
    - ``BCEWithLogitsLoss``: ``√h e_j`` with ``h = w (1 + (p_w - 1) y) σ(1-σ)`` (``w`` the
      ``weight``, ``p_w`` the ``pos_weight``, both 1 when unset);
    - ``CrossEntropyLoss``: ``√(c p_c) (e_c - p)`` for every class ``c`` and, with outputs
      ``[N, C, d_1, ...]``, every one of the ``P = d_1 ···`` positions on its own (``C·P``
      columns, each zero at the other positions: a datum's Hessian is block-diagonal over its
      positions, and a column spanning them all would add products between positions that it
      does not have), with ``c = (1-ε) w_y + (ε/C) Σ_k w_k`` for a class index ``y`` (``0`` at
      ``ignore_index``) and ``c = Σ_k w_k q̃_k``, ``q̃ = (1-ε) q + ε/C``, for probabilities ``q``
      (``ε`` the ``label_smoothing``, ``w`` the class ``weight``, 1 when unset): the Hessian of
      torch's ``-Σ_k w_k q̃_k log p_k`` is ``c (diag p - p p^T)``, whatever the targets. More than
      :data:`MAX_FACTOR_NUMBERS` numbers of columns raise ``ValueError`` (beginning with
      ``where``) naming ``fisher_type="mc"``, whose labels are drawn per position.

    Any other loss: each datum's Hessian of ``s · loss`` (``s`` its :meth:`LossAdapter.batch_scale`
    for ``count`` loss terms, by default counted from ``targets``), factorised
    (:func:`~curvops.nn.loss_hessians.generic_hessian_factor`, which raises ``ValueError``
    beginning with ``where`` for a loss that is not convex in the outputs or a row too large).

    Example:
        >>> output = torch.randn(2, 3, dtype=torch.float64)
        >>> s = loss_hessian_factor(LossAdapter(torch.nn.CrossEntropyLoss()), output, torch.tensor([0, 2]))
        >>> p = torch.softmax(output[0], 0)
        >>> torch.allclose(torch.einsum("ki,kj->ij", s[:, 0], s[:, 0]), torch.diag(p) - torch.outer(p, p))
        True
    """
    loss_fn = loss.loss_fn
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        probabilities = torch.softmax(output, dim=1)
        classes = output.shape[1]
        eye = torch.eye(classes, dtype=output.dtype, device=output.device)
        eye = eye.reshape(classes, 1, classes, *([1] * (output.ndim - 2)))
        per_class = probabilities.movedim(1, 0).unsqueeze(2)  # [C, N, 1, ...]: p_c at every position
        columns = per_class.sqrt() * (eye - probabilities.unsqueeze(0))
        columns = columns * _cross_entropy_scale(loss_fn, output, targets).sqrt().unsqueeze(1)
        return _positions_apart(columns, where)
    if not isinstance(loss_fn, (nn.MSELoss, nn.BCEWithLogitsLoss)):
        scale = loss.batch_scale(loss.count(targets) if count is None else count)
        return generic_hessian_factor(lambda f: scale * loss(f, targets), output, where)
    curvature = (
        2.0 * torch.ones_like(output)
        if isinstance(loss_fn, nn.MSELoss)
        else _binary_curvature(loss_fn, output, targets)
    )
    per_datum = math.prod(output.shape[1:])
    eye = torch.eye(per_datum, dtype=output.dtype, device=output.device).reshape(
        per_datum, 1, *output.shape[1:]
    )
    return eye * curvature.sqrt()


def _positions_apart(columns: Tensor, where: str) -> Tensor:
    """``[K, N, C, d_1, ...]`` columns that hold every position at once as ``[K·P, N, C, d_1, ...]``
    columns of one position each (``P = d_1 ···``; unchanged for ``[K, N, C]``)."""
    positions = columns.shape[3:]
    count = math.prod(positions)
    if count == 1:
        return columns
    numbers = columns.numel() * count
    if numbers > MAX_FACTOR_NUMBERS:
        raise ValueError(
            f"{where}: fisher_type='type-2' with a cross-entropy over {count} positions takes "
            f"{columns.shape[0]}·{count} output-space columns (one per class and position), "
            f"{numbers:,} numbers for this batch, over the {MAX_FACTOR_NUMBERS:,} curvops allows: use "
            "fisher_type='mc' (labels drawn per position) or 'empirical', or smaller batches."
        )
    eye = torch.eye(count, dtype=columns.dtype, device=columns.device).reshape(1, count, 1, 1, *positions)
    return (columns.unsqueeze(1) * eye).flatten(0, 1)


def _nonnegative(curvature: Tensor, loss_fn: nn.Module, what: str) -> Tensor:
    """``curvature``, checked to be ``>= 0`` (it is under a square root)."""
    if bool((curvature < 0).any()):
        raise ValueError(
            f"{type(loss_fn).__name__}: {what} give a negative curvature {float(curvature.min()):.4g}; "
            "fisher_type='type-2' needs a loss convex in the outputs (weights and targets >= 0)."
        )
    return curvature


def _cross_entropy_scale(loss_fn: nn.CrossEntropyLoss, output: Tensor, targets: Tensor) -> Tensor:
    """``c`` per position (``[N, d1, ...]``) with ``∇²_f ℓ = c (diag p - p p^T)`` (see
    :func:`loss_hessian_factor`)."""
    classes, smoothing = output.shape[1], loss_fn.label_smoothing
    weight = loss_fn.weight
    weight = output.new_ones(classes) if weight is None else weight.to(output.dtype)
    if targets.is_floating_point():
        smoothed = targets.to(output.dtype) * (1 - smoothing) + smoothing / classes
        weighted = smoothed * weight.reshape(classes, *([1] * (output.ndim - 2)))
        return _nonnegative(weighted.sum(dim=1), loss_fn, "class weights or target probabilities")
    valid = targets != loss_fn.ignore_index
    per_target = (1 - smoothing) * weight[torch.where(valid, targets, 0)] + smoothing / classes * weight.sum()
    scale = per_target * valid.to(output.dtype)
    return scale if loss_fn.weight is None else _nonnegative(scale, loss_fn, "class weights")


def _binary_curvature(loss_fn: nn.BCEWithLogitsLoss, output: Tensor, targets: Tensor) -> Tensor:
    """``w (1 + (p_w - 1) y) σ(1-σ)``: the second derivative of torch's
    ``-w [p_w y log σ + (1 - y) log(1 - σ)]`` in the logit."""
    sigmoid = torch.sigmoid(output)
    curvature = sigmoid * (1 - sigmoid)
    if loss_fn.pos_weight is None and loss_fn.weight is None:
        return curvature
    if loss_fn.pos_weight is not None:
        curvature = curvature * (1 + (loss_fn.pos_weight.to(output.dtype) - 1) * targets)
    if loss_fn.weight is not None:
        curvature = curvature * loss_fn.weight.to(output.dtype)
    return _nonnegative(curvature, loss_fn, "weight, pos_weight or targets")
