"""The posterior ``N(θ*, P^-1)``, ``P = K/T + τ I``, block by block over the blocks of ``K``.

``K`` is taken apart with :func:`~curvops.linalg.block_layout`; every block with one prior
precision ``τ_b`` is shifted by it (``K_b/T + τ_b I``, exact through the block's structure), a
block that spans parameter tensors with precisions of their own is made dense. The damped
blocks are put back together as ``K`` was.
"""

from __future__ import annotations

import math
import warnings
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from ..errors import NotPositiveDefiniteError
from ..linalg import BlockLayout, CurvatureOperator, Dense, Diagonal, Sum, block_layout
from ..linalg.checks import check_positive

_MAX_DENSE_BLOCK = 10_000  # the largest block that mixes prior precisions and is made dense


def check_prior_precision(value: Any, names: list[str], place: dict[str, Any]) -> Tensor:
    """``τ`` as a 0-dim tensor or one value per parameter tensor ``[G]`` (``names``), checked;
    on ``place`` (``{"dtype": ..., "device": ...}``)."""
    if isinstance(value, Real) or (isinstance(value, Tensor) and value.ndim == 0):
        return torch.tensor(check_positive(value, "prior_precision"), **place)
    if isinstance(value, Tensor) and value.ndim != 1:
        raise ValueError(f"prior_precision must be a number or 1-D, got shape {list(value.shape)}.")
    message = f"prior_precision must be a number > 0 or one per parameter tensor, got {value!r}."
    if isinstance(value, (str, bytes)) or (isinstance(value, Tensor) and not value.is_floating_point()):
        raise TypeError(message)
    try:
        values = torch.as_tensor(value, **place).detach().clone()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(message) from error
    if values.ndim != 1 or values.numel() != len(names):
        raise ValueError(
            f"prior_precision needs one number, or one per parameter tensor ({len(names)}: "
            f"{names}); got {values.numel()} values."
        )
    for name, tau in zip(names, values.tolist(), strict=True):
        check_positive(tau, f"prior_precision of {name!r}")
    return values


class _Block:
    """One diagonal block of ``K``: its operator and where its coordinates sit in ``θ``.

    ``index[j]`` is the flat parameter index of the block's coordinate ``j``; ``groups[j]``
    the parameter tensor it belongs to (the prior-precision group).
    """

    def __init__(self, op: CurvatureOperator, index: Tensor, groups: Tensor) -> None:
        self.op = op
        self.index = index
        self.groups = groups
        self.single_group = bool((groups == groups[0]).all()) if groups.numel() else True
        self._eigenvalues: Tensor | None = None
        self._dense: Tensor | None = None

    @property
    def group(self) -> int:
        return int(self.groups[0])

    def eigenvalues(self) -> Tensor:
        """``K_b``'s eigenvalues (computed once), with rounding noise below zero clipped."""
        if self._eigenvalues is None:
            values = self.op.eigenvalues().reshape(-1)
            scale = values.abs().max() if values.numel() else values.new_zeros(())
            tolerance = math.sqrt(torch.finfo(values.dtype).eps) * scale
            if values.numel() and bool(values.min() < -tolerance):
                raise NotPositiveDefiniteError(
                    f"The curvature has an eigenvalue {values.min().item():.3e} < 0; a Laplace "
                    "approximation needs a positive semi-definite curvature (a GGN or Fisher)."
                )
            self._eigenvalues = values.clamp(min=0)
        return self._eigenvalues

    def damped_dense(self, taus: Tensor, temperature: float) -> Tensor:
        """``K_b/T + diag(τ)`` dense, ``τ`` per coordinate from ``taus`` (``[G]``), for a block
        that mixes prior precisions; ``K_b`` symmetrised and made dense once."""
        if self._dense is None:
            matrix = self.op.to_dense()
            self._dense = 0.5 * (matrix + matrix.T)
        return self._dense / temperature + torch.diag(taus[self.groups])


def _scale(op: CurvatureOperator, factor: float) -> CurvatureOperator:
    return op if factor == 1.0 else op * factor


def _blocks(layout: BlockLayout, scale: float, sizes: list[int], device: torch.device) -> list[_Block]:
    """``scale ·`` the layout's blocks, each with its flat indices and parameter groups."""
    size = sum(sizes)
    order = torch.arange(size, device=device) if layout.permutation is None else layout.permutation
    groups = torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
    )
    blocks, start = [], 0
    for op in layout.blocks:
        index = order[start : start + op.shape[0]]
        blocks.append(_Block(_scale(op, scale), index, groups[index]))
        start += op.shape[0]
    return blocks


class Posterior:
    """The blocks of ``K`` with their parameter groups, and ``P = K/T + τ I`` from them.

    Args:
        curvature: an operator of the right size; ``scale · curvature`` is ``K``.
        scale: the factor to ``K`` of the summed negative log-likelihood.
        theta: ``θ*`` per parameter tensor, ``{name: tensor}`` in the order of ``θ``.
        loss: ``L_sum(θ*)``.

    Attributes:
        curvature: ``K``, put back together from its scaled blocks.
    """

    def __init__(
        self, curvature: CurvatureOperator, scale: float, theta: dict[str, Tensor], loss: Tensor
    ) -> None:
        self.names = list(theta)
        sizes = [t.numel() for t in theta.values()]
        device = curvature.device
        self._layout = block_layout(curvature)
        self.blocks = _blocks(self._layout, scale, sizes, device)
        self.curvature = self._layout.assemble([block.op for block in self.blocks])
        self._group_sizes = torch.tensor(sizes, dtype=curvature.dtype, device=device)
        self._group_squares = torch.stack([t.square().sum() for t in theta.values()])
        self.loss = loss

    def _taus(self, prior_precision: Tensor) -> Tensor:
        """``τ`` per parameter tensor, ``[G]``."""
        count = len(self.names)
        return prior_precision.expand(count) if prior_precision.ndim == 0 else prior_precision

    def _mixed(self, block: _Block, prior_precision: Tensor) -> bool:
        """Whether a block spans parameter tensors with their own ``τ`` (then it goes dense)."""
        if prior_precision.ndim == 0 or block.single_group:
            return False
        size = block.op.shape[0]
        if size > _MAX_DENSE_BLOCK:
            names = [self.names[g] for g in block.groups.unique().tolist()]
            raise ValueError(
                f"A curvature block of size {size} spans the parameters {names}, which have prior "
                f"precisions of their own; blocks over {_MAX_DENSE_BLOCK} entries are not made dense. "
                "Build the curvature with bias='separate', or give these parameters one precision."
            )
        return True

    def _damped_blocks(
        self, prior_precision: Tensor, temperature: float
    ) -> list[tuple[CurvatureOperator, float | None]]:
        """Per block ``(K_b/T, τ_b)``, or ``(Dense(K_b/T + diag τ), None)`` for a mixed block."""
        taus = self._taus(prior_precision)
        result = []
        for block in self.blocks:
            if self._mixed(block, prior_precision):
                result.append((Dense(block.damped_dense(taus, temperature)), None))
            else:
                result.append((_scale(block.op, 1.0 / temperature), float(taus[block.group])))
        return result

    def precision(self, prior_precision: Tensor, temperature: float) -> CurvatureOperator:
        """``P = K/T + τ I``: ``Sum([K_b/T], shift=τ_b)`` per block, dense for a mixed block."""
        ops = [
            op if tau is None else Sum([op], shift=tau)
            for op, tau in self._damped_blocks(prior_precision, temperature)
        ]
        return self._layout.assemble(ops)

    def covariance(self, prior_precision: Tensor, temperature: float) -> CurvatureOperator:
        """``P^-1`` block by block, exact through each block's structure."""
        ops = [
            op.inverse() if tau is None else op.inverse(damping=tau)
            for op, tau in self._damped_blocks(prior_precision, temperature)
        ]
        return self._layout.assemble(ops)

    def power(self, exponent: float, prior_precision: Tensor, temperature: float) -> CurvatureOperator:
        """``P^p`` block by block, exact through each block's eigenvalues."""
        ops = [
            op.power(exponent, damping=0.0 if tau is None else tau)
            for op, tau in self._damped_blocks(prior_precision, temperature)
        ]
        return self._layout.assemble(ops)

    def logdet(self, prior_precision: Tensor, temperature: float) -> Tensor:
        """``logdet P``, differentiable in ``prior_precision`` (0-dim or ``[G]``).

        A block with one ``τ_b``: the logdet of ``Diagonal(λ_b/T + τ_b)`` over the block's
        eigenvalues ``λ_b`` (computed once, so ``O(D_b)`` per ``τ``); a mixed block:
        ``logdet(K_b/T + diag τ)`` by a Cholesky factorisation (``O(D_b³)`` per ``τ``).
        """
        taus = self._taus(prior_precision)
        total = taus.new_zeros(())
        for block in self.blocks:
            if self._mixed(block, prior_precision):
                total = total + _cholesky_logdet(block.damped_dense(taus, temperature))
            else:
                total = total + Diagonal(block.eigenvalues() / temperature + taus[block.group]).logdet()
        return total

    def log_marginal_likelihood(
        self,
        prior_precision: Tensor,
        temperature: float,
        noise_ratio: float | Tensor = 1.0,
        loss: Tensor | None = None,
    ) -> Tensor:
        """``-L_sum/T - ½ (logdet P - Σ_l D_l log τ_l) - ½ Σ_l τ_l ‖θ*_l‖²``, differentiable in
        ``prior_precision`` (0-dim or ``[G]``), ``noise_ratio`` (``K`` divided by it: a Gaussian's
        ``σ²/σ₀²``, :mod:`curvops.laplace.noise`) and ``loss`` (``L_sum``; default the one given)."""
        taus = self._taus(prior_precision)
        logdet = self.logdet(prior_precision, temperature * noise_ratio)
        log_prior = (self._group_sizes * taus.log()).sum()
        penalty = (taus * self._group_squares).sum()
        data = self.loss if loss is None else loss
        return -data / temperature - 0.5 * (logdet - log_prior) - 0.5 * penalty


def _cholesky_logdet(matrix: Tensor) -> Tensor:
    """``logdet`` of a symmetric positive definite matrix, ``2 Σ log diag(L)``; differentiable."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info):
        raise NotPositiveDefiniteError("K/T + diag(τ) is not positive definite.")
    return 2 * factor.diagonal().log().sum()


def warn_unless_minimum(covariance: CurvatureOperator, gradient: Tensor, mean: Tensor) -> None:
    """Warn unless ``θ*`` minimises ``L_sum/T + (c/2) ‖θ‖²`` for some ``c >= 0``, up to ``√D`` std devs.

    With ``g = ∇L_sum(θ*)/T`` (``gradient``) and ``P^-1 = covariance`` at the initial ``τ``, the
    damped Newton step of ``L_sum/T + (c/2) ‖θ‖²`` is ``s_c = P^-1 (g + c θ*)``; its length in
    the posterior's metric, ``δ_c² = (g + c θ*)^T P^-1 (g + c θ*)``, minimised over ``c >= 0``
    in closed form. The warning points at the caller of the caller (``Laplace(...)``).
    """
    solved = covariance @ torch.stack([gradient, mean], dim=1)
    along_gradient, along_theta = float(gradient @ solved[:, 0]), float(mean @ solved[:, 1])
    cross = float(mean @ solved[:, 0])
    decay = max(0.0, -cross / along_theta) if along_theta > 0 else 0.0
    decrement = along_gradient + 2 * decay * cross + decay**2 * along_theta
    size = mean.numel()
    if decrement > size:
        warnings.warn(
            f"The parameters are not at a minimum of the loss (with any weight decay): a damped Newton "
            f"step on it, P^-1 (∇L/T + cθ), is {math.sqrt(decrement):.3g} posterior standard deviations "
            f"long at best, more than √D = {math.sqrt(size):.3g}. The Laplace approximation expands the "
            "loss around a minimum; train longer.",
            UserWarning,
            stacklevel=3,
        )
