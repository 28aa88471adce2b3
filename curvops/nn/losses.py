"""What curvops needs to know about a loss function: how it reduces, and its likelihood.

A curvature operator represents the loss over the whole data set as the loss's own
``reduction`` defines it. With ``reduction="sum"`` that is ``Σ_batches loss(f(X_b), y_b)``;
with ``"mean"`` each batch's mean is weighted by the number of terms it averages over,
``count_b / Σ count``, so the result never depends on the batching:

- ``MSELoss``, ``BCEWithLogitsLoss``: every element of the output (``y.numel()``);
- ``CrossEntropyLoss``: every target that is not ``ignore_index`` (weighted by the class
  ``weight`` when one is set), over all extra axes (``[N, C, d1, ...]`` outputs);
- any other callable ``loss(output, target)``: the batch's first axis (``len(target)``),
  unless it has an attribute ``reduction == "sum"``.

A *datum* is one row (first axis) of the model output; per-datum losses ``ℓ_n`` sum over
the row's other axes (tokens, pixels, output units). The Fisher types need a likelihood:
``MSELoss`` is ``N(f, ½ I)`` (``Σ (f - y)²`` is ``-log p`` up to a constant), ``CrossEntropyLoss``
a categorical over axis 1, ``BCEWithLogitsLoss`` independent Bernoullis.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

LIKELIHOOD_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)


class LossAdapter:
    """A loss function with its reduction rule and, for the supported losses, its likelihood.

    Args:
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss`` (reduction
            ``"mean"`` or ``"sum"``) or any ``torch.func``-differentiable ``loss(output, target)``.
        likelihood: require one of the three likelihood losses (for the Fisher types).
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
        if isinstance(self.loss_fn, nn.MSELoss):
            # the same value as nn.MSELoss, written out: its fused kernel has no
            # forward-over-reverse derivative under torch.func
            squares = (output - target).square()
            return squares.mean() if self.reduction == "mean" else squares.sum()
        return self.loss_fn(output, target)

    def batch_scale(self, count: float) -> float:
        """``s`` with ``s · loss(f(X_b), y_b) = Σ_{n in b} ℓ_n`` for a batch of ``count`` loss terms."""
        return count if self.reduction == "mean" else 1.0

    def datum_gradients(self, output: Tensor, target: Tensor, count: float) -> Tensor:
        """``∇_f ℓ_n`` for every datum of a batch: the gradient of its summed loss w.r.t. ``output``."""
        scale = self.batch_scale(count)
        return torch.func.grad(lambda o: scale * self(o, target))(output)

    def count(self, target: Tensor) -> float:
        """The number of terms the ``mean`` reduction divides a batch's summed loss by."""
        loss = self.loss_fn
        if isinstance(loss, (nn.MSELoss, nn.BCEWithLogitsLoss)):
            return float(target.numel())
        if isinstance(loss, nn.CrossEntropyLoss):
            if target.is_floating_point():
                return float(target.numel() // target.shape[1])
            kept = target[target != loss.ignore_index]
            return float(kept.numel() if loss.weight is None else loss.weight[kept].sum().item())
        return float(len(target))

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
        generator = torch.Generator(device=output.device).manual_seed(seed * 1_000_003 + index)
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
