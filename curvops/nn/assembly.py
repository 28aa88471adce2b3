"""Where each block of a block-diagonal curvature lies in the flat parameter vector, and
putting the blocks together as one operator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..linalg import BlockDiagonal, Cast, CurvatureOperator, Permuted
from .layers.rule import KroneckerLayer

Entry = tuple[str, CurvatureOperator, Tensor]
"""``(label, block, flat indices)``."""


class Layout:
    """Where each parameter's entries sit in the flat parameter vector."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.offsets, start = {}, 0
        for p in params:
            self.offsets[id(p)] = start
            start += p.numel()
        self.size = start

    def indices(self, p: nn.Parameter, device: torch.device, rows: tuple[int, int] | None = None) -> Tensor:
        """The flat indices of ``p``'s entries (of its rows ``[start, stop)`` only, with ``rows``)."""
        where = self.offsets[id(p)] + torch.arange(p.numel(), device=device)
        return where if rows is None else where.reshape(p.shape[0], -1)[rows[0] : rows[1]].flatten()

    def joint(self, layer: KroneckerLayer, device: torch.device) -> Tensor:
        """``vec([W b])`` order: each output row's weights, then its bias (for a transposed weight
        ``[n_in, n_out]``: the bias as one more input row; for an exact block ``[vec W; b]``)."""
        weight, bias = layer.weight, layer.bias
        if layer.rule.exact:
            return torch.cat([self.indices(weight, device), self.indices(bias, device)])
        if layer.rule.transposed:
            rows = self.indices(weight, device).reshape(-1, weight.shape[-1])
            return torch.cat([rows, self.indices(bias, device).unsqueeze(0)], dim=0).flatten()
        rows = self.indices(weight, device, layer.weight_rows).reshape(layer.groups * layer.sizes[0], -1)
        return torch.cat([rows, self.indices(bias, device, layer.bias_rows).unsqueeze(1)], dim=1).flatten()

    def place(
        self, layer: KroneckerLayer, blocks: list[CurvatureOperator | None], device: torch.device
    ) -> list[Entry]:
        """The entries of a layer's blocks (weight, or weight+bias if joint; then a separate bias),
        on the rows of the parameters the layer covers (``weight_rows``, ``bias_rows``); a ``None``
        block is placed by another layer (a tied weight's, :mod:`curvops.nn.tied`)."""
        name = layer.name or type(layer.module).__name__
        if layer.joint:
            return [(name, blocks[0], self.joint(layer, device))]
        params = [
            (kind, p, rows)
            for kind, p, rows in (
                ("weight", layer.weight, layer.weight_rows),
                ("bias", layer.bias, layer.bias_rows),
            )
            if p is not None
        ]
        return [
            (f"{name}.{kind}", block, self.indices(p, device, rows))
            for (kind, p, rows), block in zip(params, blocks, strict=True)
            if block is not None
        ]


def assemble(entries: list[Entry], dtype: torch.dtype | None = None) -> CurvatureOperator:
    """``(label, block, flat indices)`` entries as one operator on the flat parameter vector,
    in the order of their first index.

    A block whose indices are a contiguous range (a layer's weight and bias next to each
    other in ``params``) is permuted within that range, so the result is a labelled
    ``BlockDiagonal``; otherwise the whole block-diagonal is permuted at once. With ``dtype``
    (the model's) every block of another dtype (float32 statistics of a bf16 model) becomes a
    :class:`~curvops.linalg.Cast` to it: the precision policy.
    """
    entries = sorted(entries, key=lambda entry: int(entry[2].min()))
    if dtype is not None:
        entries = [
            (label, block if block.dtype == dtype else Cast(block, dtype), where)
            for label, block, where in entries
        ]
    labels = [label for label, _, _ in entries]
    local = []
    for _, block, where in entries:
        start = int(where.min())
        if int(where.max()) - start + 1 != where.numel():  # the indices are distinct: not a range
            permutation = torch.cat([where for _, _, where in entries])
            return Permuted(BlockDiagonal([block for _, block, _ in entries], labels), permutation)
        in_order = bool((where[1:] > where[:-1]).all())
        local.append(block if in_order else Permuted(block, where - start))
    return BlockDiagonal(local, labels)
