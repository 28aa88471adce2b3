"""The top-level blocks of an operator, seen through a permutation: ``P^T BlockDiagonal P``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from .base import CurvatureOperator
from .composite import BlockDiagonal
from .permuted import Permuted


@dataclass(frozen=True)
class BlockLayout:
    """An operator as ``Permuted(BlockDiagonal(blocks, labels), permutation)``.

    Attributes:
        blocks: the diagonal blocks, in order (one block for an operator without blocks).
        labels: the block-diagonal's labels, or ``None``.
        permutation: ``Permuted``'s permutation (block order to the flat parameter vector), or
            ``None`` when the blocks lie in order.
        block_diagonal: whether the blocks came from a ``BlockDiagonal`` (else ``op`` is the one block).
    """

    blocks: tuple[CurvatureOperator, ...]
    labels: tuple[str, ...] | None
    permutation: Tensor | None
    block_diagonal: bool

    def assemble(self, blocks: Sequence[CurvatureOperator]) -> CurvatureOperator:
        """New blocks (same sizes, same order) put together as the original operator was."""
        if len(blocks) != len(self.blocks):
            raise ValueError(f"The layout has {len(self.blocks)} blocks; got {len(blocks)}.")
        op = BlockDiagonal(list(blocks), self.labels) if self.block_diagonal else blocks[0]
        return op if self.permutation is None else Permuted(op, self.permutation)


def block_layout(op: CurvatureOperator) -> BlockLayout:
    """The blocks of ``op``: a ``BlockDiagonal``'s, a ``Permuted(BlockDiagonal)``'s, else ``op`` alone.

    Example:
        >>> op = curvops.Permuted(
        ...     curvops.BlockDiagonal([curvops.Diagonal(torch.ones(2)), curvops.Dense(torch.eye(1))]),
        ...     torch.tensor([2, 0, 1]),
        ... )
        >>> layout = block_layout(op)
        >>> [b.shape[0] for b in layout.blocks], layout.permutation.tolist()
        ([2, 1], [2, 0, 1])
        >>> torch.equal(layout.assemble(layout.blocks).to_dense(), op.to_dense())
        True
    """
    permutation = None
    if isinstance(op, Permuted):
        op, permutation = op.op, op.permutation
    if isinstance(op, BlockDiagonal):
        return BlockLayout(tuple(op.blocks), op.labels, permutation, block_diagonal=True)
    return BlockLayout((op,), None, permutation, block_diagonal=False)
