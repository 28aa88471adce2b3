"""Products along the axes of a Kronecker-structured tensor, shared by the Kronecker operators.

Convention: for matrices ``M_1, ..., M_k`` a vector of length ``Π n_i`` is a row-major
``[n_1, ..., n_k]`` tensor, and ``(M_1 ⊗ ... ⊗ M_k) vec(X)`` applies ``M_i`` along axis ``i``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import opt_einsum
import torch
from torch import Tensor


def mode_product(matrices: Sequence[Tensor | None], x: Tensor, transpose: bool = False) -> Tensor:
    """Apply ``matrices[i]`` (or its transpose) along axis ``i`` of ``x``.

    The dense matrices go through one opt_einsum contraction (its order found once per
    shapes and cached); a 1-D entry ``d`` is ``diag(d)`` and scales axis ``i`` elementwise, and
    ``None`` is the identity, so neither is ever materialised as a matrix.

    Args:
        matrices: ``k`` entries: ``[m_i, n_i]`` matrices, ``[n_i]`` diagonals or ``None``.
        x: ``[n_1, ..., n_k, ...]``; trailing axes are carried along.
        transpose: apply ``M_i^T`` instead of ``M_i``.

    Returns:
        ``[m_1, ..., m_k, ...]`` (``[n_i]`` axes when transposed).

    Example:
        >>> g, a, v = torch.randn(2, 2), torch.randn(3, 3), torch.randn(2, 3)
        >>> torch.allclose(mode_product([g, a], v), g @ v @ a.T, atol=1e-6)
        True
        >>> d = torch.tensor([1.0, 2.0, 3.0])
        >>> torch.allclose(mode_product([g, d], v), g @ v @ torch.diag(d), atol=1e-6)
        True
    """
    for axis, m in enumerate(matrices):
        if m is not None and m.ndim == 1:
            x = x * m.reshape(-1, *[1] * (x.ndim - axis - 1))
    dense = [(axis, m) for axis, m in enumerate(matrices) if m is not None and m.ndim == 2]
    if not dense:
        return x
    symbols = [opt_einsum.get_symbol(i) for i in range(x.ndim)]
    outs = list(symbols)
    terms = []
    for axis, _ in dense:
        outs[axis] = opt_einsum.get_symbol(x.ndim + axis)
        terms.append(symbols[axis] + outs[axis] if transpose else outs[axis] + symbols[axis])
    expr = f"{','.join(terms)},{''.join(symbols)}->{''.join(outs)}"
    matrices = [m for _, m in dense]
    return _contraction(expr, *(tuple(t.shape) for t in (*matrices, x)))(*matrices, x)


@functools.lru_cache(maxsize=256)
def _contraction(expr: str, *shapes: tuple[int, ...]) -> opt_einsum.contract.ContractExpression:
    """opt_einsum's contraction order for ``expr`` on these shapes, found once and reused."""
    return opt_einsum.contract_expression(expr, *shapes)


def kron(matrices: Sequence[Tensor]) -> Tensor:
    """``M_1 ⊗ ... ⊗ M_k`` (``torch.kron`` on contiguous copies: it fails on some mixed strides).

    Example:
        >>> kron([torch.eye(2), torch.ones(1, 3)]).shape
        torch.Size([2, 6])
    """
    return functools.reduce(torch.kron, [m.contiguous() for m in matrices])


def outer(vectors: Sequence[Tensor]) -> Tensor:
    """``v_1 ∘ ... ∘ v_k`` of shape ``[n_1, ..., n_k]``: the Kronecker product's eigenvalues.

    Example:
        >>> outer([torch.tensor([1.0, 2.0]), torch.tensor([1.0, 10.0, 100.0])]).tolist()
        [[1.0, 10.0, 100.0], [2.0, 20.0, 200.0]]
    """
    return functools.reduce(lambda acc, v: acc.unsqueeze(-1) * v, vectors[1:], vectors[0])
