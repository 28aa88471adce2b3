"""Preconditioned query gradients ``P = (F + Λ)^-1 [∇m_1, ..., ∇m_K]`` as the training pass dots
them: exact (:class:`ExactQueries`), or compressed to rank ``r`` per Kronecker block (as kronfluence's
``query_gradient_low_rank``): each query's block ``P_t,b = (F_b + Λ_b)^-1 ∇m_t,b`` is a matrix of
the block's factor sizes (``[n_out, n_in]``, per group for a grouped block), kept as its top ``r``
singular triplets, ``P_t,b ≈ U_r S_r V_r^T``; a training gradient's block ``G_n,b`` then scores
``Σ_j s_j u_j^T G_n,b v_j``. A query block holds ``r (n_out + n_in)`` numbers instead of
``n_out n_in``, so more queries fit in one pass over the training data; blocks without matrix
structure (a norm layer's exact block, a diagonal), and blocks where ``r (n_out + n_in) >=
n_out n_in`` (no saving), stay exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..linalg import CurvatureOperator, Permuted, block_layout
from ..linalg.checks import check_positive_int

CHUNK = 2**24
"""Numbers of the queries' block matrices made again at once while scoring."""


def _matrix_shape(block: CurvatureOperator) -> tuple[int, ...] | None:
    """``(n_out, n_in)``, or ``(g, n_out, n_in)`` for a grouped block, where the block is a
    two-factor Kronecker product; else ``None``."""
    sizes = getattr(block, "sizes", None)
    if sizes is None or len(sizes) != 2:
        return None
    groups = getattr(block, "groups", None)
    shape = tuple(sizes) if groups is None else (groups, *sizes)
    return shape if math.prod(shape) == block.shape[0] else None


class ExactQueries:
    """``K`` preconditioned query columns ``[D, K]`` as they are.

    Args:
        preconditioned: ``[D, K]``.
        parts: flat indices of the parts whose scores are kept apart (``per_module``), or ``None``.

    Example:
        >>> p, train = torch.randn(5, 2), torch.randn(5, 3)
        >>> torch.allclose(ExactQueries(p).scores(train), p.T @ train)
        True
    """

    def __init__(self, preconditioned: Tensor, parts: list[Tensor] | None = None) -> None:
        self.preconditioned, self.parts = preconditioned, parts

    def scores(self, train: Tensor) -> Tensor:
        """``[K, B]`` scores with the training gradient columns ``train`` ``[D, B]``; ``[parts, K, B]``
        with ``parts``: the products over each part's coordinates."""
        if self.parts is None:
            return self.preconditioned.T @ train
        return torch.stack([self.preconditioned[index].T @ train[index] for index in self.parts])


class CompressedQueries:
    """``K`` preconditioned query columns ``[D, K]``, each Kronecker block's at rank ``rank``.

    Args:
        preconditioned: ``[D, K]``, ``(F + Λ)^-1`` times the query gradients.
        op: ``F``, whose blocks give the matrices.
        rank: ``r >= 1``.
        parts: flat indices of the parts whose scores are kept apart (``per_module``), or ``None``.

    Example:
        >>> g, a = torch.eye(3, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
        >>> op = curvops.BlockDiagonal([curvops.Kronecker(g, a)], ["layer"])
        >>> p, train = torch.randn(12, 2, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64)
        >>> torch.allclose(CompressedQueries(p, op, rank=3).scores(train), p.T @ train)  # full rank
        True
    """

    def __init__(
        self, preconditioned: Tensor, op: CurvatureOperator, rank: int, parts: list[Tensor] | None = None
    ):
        check_positive_int(rank, "query_rank")
        layout = block_layout(op)
        order = torch.arange(op.shape[0], device=preconditioned.device)
        order = order if layout.permutation is None else layout.permutation.to(preconditioned.device)
        self.blocks, self.exact, start, compressed = [], [], 0, False
        for block in layout.blocks:
            index = order[start : start + block.shape[0]]
            start += block.shape[0]
            inner = block.op if isinstance(block, Permuted) else block  # a joint bias's [W b] order
            shape = _matrix_shape(inner)
            if shape is not None:
                compressed = True  # a Kronecker block: at rank r unless that holds more numbers
                if rank * sum(shape[-2:]) >= math.prod(shape[-2:]):
                    shape = None
            if shape is None:
                self.exact.append((index, preconditioned[index]))
                continue
            if isinstance(block, Permuted):
                index = index[block.permutation.to(index.device)]  # the Kronecker's coordinates, in order
            matrices = preconditioned[index].T.reshape(-1, *shape)  # [K, (g,) n_out, n_in]
            u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
            r = min(rank, s.shape[-1])
            self.blocks.append((index, shape, u[..., :r] * s[..., None, :r], vh[..., :r, :]))
        if not compressed:
            raise ValueError(
                "query_rank compresses the Kronecker blocks' query gradients, and this curvature has "
                "none (a dense or diagonal F): leave query_rank=None."
            )
        self.parts = parts

    def _block_scores(self, train: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(flat indices, [K, B] scores)`` of every block: the queries' rank-``r`` matrices made
        again a chunk of queries at a time (at most :data:`CHUNK` numbers) and dotted."""
        results = []
        for index, shape, left, right in self.blocks:
            rows = max(1, CHUNK // math.prod(shape))
            parts = [
                (left[k : k + rows] @ right[k : k + rows]).reshape(-1, math.prod(shape)) @ train[index]
                for k in range(0, left.shape[0], rows)
            ]
            results.append((index, torch.cat(parts)))
        results.extend((index, columns.T @ train[index]) for index, columns in self.exact)
        return results

    def scores(self, train: Tensor) -> Tensor:
        """``[K, B]`` scores with the ``B`` training gradient columns ``train`` ``[D, B]``
        (``[parts, K, B]`` with ``parts``: a block's scores go to the part holding its first entry)."""
        results = self._block_scores(train)
        if self.parts is None:
            return sum(part for _, part in results)
        owner = torch.empty(train.shape[0], dtype=torch.long, device=train.device)
        for number, index in enumerate(self.parts):
            owner[index.to(train.device)] = number
        total = train.new_zeros(len(self.parts), results[0][1].shape[0], train.shape[1])
        for index, part in results:
            total[int(owner[index[0]])] += part
        return total
