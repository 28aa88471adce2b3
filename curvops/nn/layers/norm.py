"""Normalization layers: the exact block of their affine parameters, from the statistics pass.

A normalization layer computes ``y_ns = γ ⊙ x̂_ns + β`` at positions ``s`` (tokens, pixels) of
datum ``n``, with ``x̂`` its normalised input (``nn.LayerNorm``, ``nn.RMSNorm``: over the trailing
``normalized_shape``; ``nn.GroupNorm``: per group of channels; ``nn.BatchNorm1d/2d/3d`` in eval
mode: with the running statistics). Its parameters are few, so their block of the Fisher / GGN is
taken exactly, from the output gradients ``g_nsc`` the pass already backpropagates: per datum and
output-space column ``c``

    ``∇_γ ℓ_nc = Σ_s x̂_ns ⊙ g_nsc``,  ``∇_β ℓ_nc = Σ_s g_nsc``,

and the block is ``(1/Z) Σ_{n,c} v_nc v_nc^T`` with ``v = [vec ∇_γ; ∇_β]`` (the chosen ones):
the empirical Fisher's for ``"empirical"``, ``FisherMC``'s (same draws) for ``"mc"``, and the
GGN's for ``"type-2"``, whose columns factor each datum's loss Hessian exactly (a cross-entropy
over positions takes one column per class and position:
:func:`~curvops.nn.losses.loss_hessian_factor`).

``bias="joint"`` gives one block over ``[vec γ; β]``, with the cross terms; ``"separate"`` one
block per parameter. ``kfac_approx`` plays no part (the block is exact), and EKFAC, TKFAC and
TEKFAC take the same block: there is nothing to correct.

A layer whose chosen parameters number more than ``dense_limit`` (:data:`DENSE_LIMIT` unless
the rule is registered with another) gets the diagonal of that block instead. With
``fisher_type="forward-only"`` (no output gradients) the block is the identity, the counterpart
of the Kronecker layers' ``G = I``.

Like every rule, the first axis is the datum's. Builders refuse batch normalisation in train mode
(:func:`~curvops.nn.forward_checks.check_batch_statistics`); the optimizer, which sees a training
loop, normalises with the batch's statistics as the layer does, so ``v_n`` are the terms of the
batch gradient.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..statistics import LayerStatistics
from .rule import KroneckerLayer, LayerRule

DENSE_LIMIT = 2048
"""The most chosen parameters of one normalization layer with dense blocks; above it, diagonal."""


class NormRule(LayerRule):
    """The exact block of a normalization layer's ``γ`` and ``β`` (see the module docstring).

    Subclasses say how the captured input becomes ``x̂`` as ``[N, S, P]`` (:meth:`normalised`)
    and the output gradients ``[K, N, S, P]``, ``P`` the entries of ``γ``.

    Args:
        dense_limit: the most chosen parameters of a layer with dense blocks (else diagonal).

    Example:
        >>> rule = LayerNormRule(dense_limit=4)  # register_layer_rule(nn.LayerNorm, rule) to use it
        >>> norm = torch.nn.LayerNorm(3)
        >>> rule.block_shape(KroneckerLayer("ln", norm, rule, norm.weight, None, False))
        (3, 3)
        >>> rule.block_shape(KroneckerLayer("ln", norm, rule, norm.weight, norm.bias, True))  # 6 > 4
        (6,)
    """

    exact: ClassVar[bool] = True

    def __init__(self, dense_limit: int = DENSE_LIMIT) -> None:
        if isinstance(dense_limit, bool) or not isinstance(dense_limit, int) or dense_limit < 0:
            raise ValueError(f"dense_limit must be an integer >= 0, got {dense_limit!r}.")
        self.dense_limit = dense_limit

    @abstractmethod
    def normalised(self, module: nn.Module, inputs: Tensor) -> Tensor:
        """``x̂`` at every position, ``[N, S, P]``, in the dtype of ``inputs``."""

    def block_shape(self, layer: KroneckerLayer) -> tuple[int, ...]:
        """``(D, D)`` for the block of the layer's ``D`` chosen parameters, ``(D,)`` for its diagonal."""
        size = sum(p.numel() for p in (layer.weight, layer.bias) if p is not None)
        return (size,) if size > self.dense_limit else (size, size)

    def statistics(
        self,
        layer: KroneckerLayer,
        inputs: Tensor,
        gradients: Tensor | None,
        weight: float,
        kfac_approx: str,
        trace_restricted: bool,
        dtype: torch.dtype,
        valid: Tensor | None = None,
        total: LayerStatistics | None = None,
    ) -> LayerStatistics:
        """``Σ_{n,c} v_nc v_nc^T`` (its diagonal above ``dense_limit``), ``v = [vec ∇_γ; ∇_β]``; a
        zero block without gradients (no loss terms, or ``"forward-only"``). ``valid`` needs no
        mask here: the output gradients at positions without loss terms are zero."""
        shape = self.block_shape(layer)
        if gradients is None:
            batch = LayerStatistics(layer, exact_block=inputs.new_zeros(shape, dtype=dtype))
            return batch if total is None else total.accumulate(batch)
        normalised = self.normalised(layer.module, inputs.to(dtype))
        parts = []
        if layer.weight is not None:
            parts.append(torch.einsum("knsp,nsp->knp", gradients, normalised))
        if layer.bias is not None:
            parts.append(gradients.sum(dim=2))
        vectors = torch.cat(parts, dim=-1).flatten(0, 1)  # [K·N, D]
        block = vectors.square().sum(0) if len(shape) == 1 else vectors.T @ vectors
        batch = LayerStatistics(layer, exact_block=block)
        return batch if total is None else total.accumulate(batch)

    def correction(
        self,
        layer: KroneckerLayer,
        inputs: Tensor,
        rotated: Tensor,
        q_in: Tensor | None,
        correction: str,
        valid: Tensor | None = None,
    ) -> Tensor:
        raise TypeError(f"{layer.name!r} has an exact block: it has no eigenvalues to correct.")


def _eps(module: nn.Module, inputs: Tensor) -> float:
    """The module's ``eps``; ``nn.RMSNorm``'s ``None`` is the machine epsilon of its input."""
    return torch.finfo(inputs.dtype).eps if module.eps is None else module.eps


class LayerNormRule(NormRule):
    """``nn.LayerNorm`` and ``nn.RMSNorm``: ``x̂`` over the trailing ``normalized_shape``; every
    leading axis after the first is a position (a token).

    Example:
        >>> LayerNormRule().normalised(torch.nn.LayerNorm(4), torch.randn(2, 5, 4)).shape
        torch.Size([2, 5, 4])
    """

    def normalised(self, module: nn.Module, inputs: Tensor) -> Tensor:
        shape = tuple(module.normalized_shape)
        if isinstance(module, nn.RMSNorm):
            normalised = F.rms_norm(inputs, shape, eps=_eps(module, inputs))
        else:
            normalised = F.layer_norm(inputs, shape, eps=module.eps)
        return normalised.reshape(inputs.shape[0], -1, math.prod(shape))

    def output_gradients(self, module: nn.Module, gradients: Tensor) -> Tensor:
        return gradients.reshape(*gradients.shape[:2], -1, math.prod(module.normalized_shape))


class ChannelNormRule(NormRule):
    """``nn.GroupNorm`` and ``nn.BatchNorm1d/2d/3d`` (eval mode): channels on axis 1, every
    spatial location a position.

    Example:
        >>> ChannelNormRule().normalised(torch.nn.GroupNorm(2, 4), torch.randn(3, 4, 5, 5)).shape
        torch.Size([3, 25, 4])
    """

    def normalised(self, module: nn.Module, inputs: Tensor) -> Tensor:
        if isinstance(module, nn.GroupNorm):
            normalised = F.group_norm(inputs, module.num_groups, eps=module.eps)
        else:
            batch = module.training or module.running_mean is None  # only a training loop's batch
            mean, var = (None, None) if batch else (module.running_mean, module.running_var)
            normalised = F.batch_norm(
                inputs,
                None if mean is None else mean.to(inputs.dtype),
                None if var is None else var.to(inputs.dtype),
                training=batch,
                eps=module.eps,
            )
        return normalised.reshape(*normalised.shape[:2], -1).transpose(1, 2)

    def output_gradients(self, module: nn.Module, gradients: Tensor) -> Tensor:
        return gradients.reshape(*gradients.shape[:3], -1).transpose(2, 3)
