"""Sums and sums of squares as cheap fingerprints of tensors.

A tensor's ``(Σ t, Σ t²)`` changes when its values change (up to rounding and permutations
of its entries). The pass checks (:mod:`curvops.nn.passes`) and the stale-parameter checks
(:mod:`curvops.nn.staleness`) compare them, with :func:`same_sums`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

SUM_TOLERANCE = 1e-5
"""Relative tolerance of floating-point :func:`value_sums`: they may round apart in another order."""


def tensor_leaves(tree: Any) -> list[Tensor]:
    """The tensors of ``tree`` (a tensor, or nested tuples, lists and dicts of them).

    Example:
        >>> x = torch.zeros(2)
        >>> len(tensor_leaves({"a": x, "b": (x, "text", [x])}))
        3
    """
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, Tensor)]


def value_sums(tensors: Sequence[Tensor]) -> Tensor:
    """``[L, 2]`` float64 on the first tensor's device: each tensor's ``Σ t`` and ``Σ t²``.

    Integers (and bools) exactly, in float64; floating-point tensors by native reductions in
    their own precision (half types in float32), with no float64 copy. No device sync.

    Example:
        >>> value_sums([torch.tensor([1, 2, 3]), torch.tensor([0.5, -0.5])]).tolist()
        [[6.0, 14.0], [0.0, 0.5]]
    """
    rows = []
    for tensor in tensors:
        values = tensor.detach()
        values = torch.view_as_real(values) if values.is_complex() else values
        if not values.is_floating_point():
            values = values.to(torch.float64)
            row = torch.stack([values.sum(), values.square().sum()])
        else:
            values = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
            row = torch.stack([values.sum(), torch.linalg.vector_norm(values).square()])
        rows.append(row.to(device=tensors[0].device, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)


def same_sums(first: Sequence[float], second: Sequence[float], elements: int, exact: bool) -> bool:
    """Whether two ``(Σ t, Σ t²)`` of ``elements`` entries agree: exactly for integers; for floats
    up to :data:`SUM_TOLERANCE` of ``√(n Σ t²) >= Σ |t|`` (sums) and of ``Σ t²`` (squares).
    NaNs agree with NaNs.

    Example:
        >>> same_sums((3.0, 5.0), (3.0 + 1e-9, 5.0), elements=2, exact=False)
        True
        >>> same_sums((3.0, 5.0), (4.0, 5.0), elements=2, exact=True)
        False
    """
    if all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(first, second, strict=True)):
        return True
    if exact:
        return False
    (total, squares), (total_b, squares_b) = first, second
    return abs(total - total_b) <= SUM_TOLERANCE * math.sqrt(elements * abs(squares)) and abs(
        squares - squares_b
    ) <= SUM_TOLERANCE * abs(squares)
