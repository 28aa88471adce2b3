"""Batches ``(X, y)`` of a data set: what counts as one, each checked and put on the parameters' device."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from ..linalg.checks import all_finite
from .tensor_sums import tensor_leaves


def as_batches(data: Any) -> Any:
    """The rule for a bare pair: a tuple ``(X, y)`` whose ``X`` is a tensor is one batch,
    ``[(X, y)]``; anything else is a re-iterable of batches.

    Example:
        >>> x, y = torch.zeros(4, 3), torch.zeros(4)
        >>> len(as_batches((x, y))), len(as_batches([(x, y), (x, y)]))
        (1, 2)
    """
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        return [data]
    return data


def check_reiterable(data: Iterable) -> None:
    """Refuse a one-shot iterator or generator: every product passes over the data again.

    Example:
        >>> check_reiterable(iter([]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: data must be re-iterable ...
    """
    if iter(data) is data:
        raise TypeError(
            "data must be re-iterable (a list of (X, y) batches or a DataLoader), not a one-shot "
            "iterator or generator: curvops passes over it once per product."
        )


def is_empty(x: Any) -> bool:
    """Whether a batch's inputs have no rows: every tensor of ``x`` has a first axis of size 0.

    Example:
        >>> is_empty(torch.zeros(0, 3)), is_empty({"a": torch.zeros(2, 3)})
        (True, False)
    """
    leaves = tensor_leaves(x)
    return bool(leaves) and all(t.ndim > 0 and t.shape[0] == 0 for t in leaves)


def data_count(x: Any) -> int:
    """The number of data of a batch's inputs: the first axis of its first tensor.

    Example:
        >>> data_count({"input_ids": torch.zeros(4, 7), "attention_mask": torch.ones(4, 7)})
        4
    """
    return tensor_leaves(x)[0].shape[0]


def data_rows(x: Any, start: int, stop: int) -> Any:
    """The data ``start:stop`` of a batch's inputs: every tensor's rows (a tree keeps its shape).

    Example:
        >>> data_rows({"input_ids": torch.arange(8).reshape(4, 2)}, 1, 3)["input_ids"].tolist()
        [[2, 3], [4, 5]]
    """
    return tree_map(lambda t: t[start:stop] if isinstance(t, Tensor) else t, x)


def _placed(tensor: Any, what: str, where: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A detached tensor on ``device``, floats in ``dtype`` and refused when not finite; anything
    else unchanged."""
    if not isinstance(tensor, Tensor):
        return tensor
    tensor = tensor.detach()
    if not tensor.is_floating_point():
        return tensor.to(device)
    tensor = tensor.to(device=device, dtype=dtype)
    if not all_finite(tensor):
        raise ValueError(f"{where}: {what} contains NaN or inf.")
    return tensor


def checked_batch(
    batch: Any, index: int, device: torch.device, dtype: torch.dtype, label: str = ""
) -> tuple[Any, Any]:
    """Batch ``index`` of the data set ``label`` as ``(X, y)`` on ``device`` (floating-point
    tensors in ``dtype``; every tensor of a tuple, list or mapping ``X``), refused unless it is
    a pair whose floats are finite.

    Example:
        >>> batch = (torch.ones(2, 3), torch.tensor([0, 1]))
        >>> x, y = checked_batch(batch, 0, torch.device("cpu"), torch.float64)
        >>> x.dtype, y.dtype
        (torch.float64, torch.int64)
        >>> checked_batch((torch.tensor([math.nan]), None), 3, "cpu", torch.float32, "query_data")
        Traceback (most recent call last):
        ...
        ValueError: Batch 3 of query_data: X contains NaN or inf.
    """
    if isinstance(batch, Mapping):
        raise TypeError(
            f"Batch {index} must be an (X, y) pair, got a mapping with keys {list(batch)}: wrap the data "
            "in curvops.nn.mapping_batches(data, target=...) to say which entry is the target."
        )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"Batch {index} must be an (X, y) pair, got {type(batch).__name__}.")
    where = f"Batch {index} of {label}" if label else f"Batch {index}"

    def placed(part: Any, what: str) -> Any:
        return tree_map(lambda t: _placed(t, what, where, device, dtype), part)

    return placed(batch[0], "X"), placed(batch[1], "y")
