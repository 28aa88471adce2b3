"""Sums over this rank's batches, reduced over the shards in one step: the union's on every rank.

An exact operator's product and the summed GGN diagonal are sums over batches (and a count of
loss terms). Over :mod:`curvops.distributed` shards every rank adds its own batches, and
:func:`union_sums` all-reduces the sums and the numbers together, in one
:meth:`~curvops.distributed.Shards.sum` (one collective per dtype). It keeps the ranks in step:

- a rank whose own part raises still joins the reduction (with zeros) before it re-raises, so
  the other ranks raise too instead of waiting in the next collective;
- the input of a product (``[D, K]`` vectors) goes in as a :func:`fingerprint`: ranks that
  multiply different vectors (random probes from unsynchronised generators) would sum parts of
  different products, so every rank raises instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..distributed import Shards

Part = tuple[list[Tensor], list[float]]
"""This rank's sums (tensors of the same shapes on every rank) and numbers (counts)."""

FINGERPRINT_MODULUS = 1_048_573
"""A prime below ``2**20``: fingerprints, their squares and their sums over ranks are exact in float64."""

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_WEIGHTS = 61  # entry (d, k) weighted by (d mod 61) + 1 + 61 (k mod 61): moved entries change the fingerprint


def fingerprint(x: Tensor) -> Tensor:
    """An integer in ``[0, p)`` (``p`` = :data:`FINGERPRINT_MODULUS``) of the bits of a ``[D, K]``
    (or ``[D]``) tensor, weighted by the positions: a 0-dim float64 tensor on ``x``'s device.

    Example:
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> bool(fingerprint(x) == fingerprint(x.clone())), bool(fingerprint(x) == fingerprint(x.T))
        (True, False)
    """
    matrix = x.detach().reshape(x.shape[0], -1).contiguous()
    bits = matrix.view(_BITS[matrix.element_size()]).to(torch.int64).remainder(FINGERPRINT_MODULUS)
    rows = torch.arange(matrix.shape[0], device=x.device).remainder(_WEIGHTS).add(1)
    columns = torch.arange(matrix.shape[1], device=x.device).remainder(_WEIGHTS).mul(_WEIGHTS)
    weighted = (bits * (rows[:, None] + columns[None, :])).remainder(FINGERPRINT_MODULUS)
    return weighted.sum().remainder(FINGERPRINT_MODULUS).to(torch.float64)


def union_sums(
    shards: Shards,
    local: Callable[[], Part],
    empty: Callable[[], Part],
    device: torch.device,
    inputs: Tensor | None = None,
    what: str = "sum",
) -> Part:
    """``local()``'s tensors and numbers summed over the ranks of ``shards`` (``local()`` itself
    alone): every rank gets the sums of the union of the shards.

    Args:
        shards: the ranks (:meth:`~curvops.distributed.Shards.of`).
        local: this rank's part: its sums over its batches and its numbers.
        empty: zeros of ``local()``'s shapes, what a rank sends when its own part raised.
        device: where the numbers travel (the parameters' device, which suits the backend).
        inputs: the vectors a product multiplies, which must be the same on every rank.
        what: the sum's name in errors (``"GGN product"``).

    Raises:
        RuntimeError: another rank's part raised (this rank's own error is raised as it is).
        ValueError: the ranks multiply different ``inputs``.

    Example:
        >>> part = union_sums(Shards.of("local"), lambda: ([torch.ones(2)], [3.0]), None, "cpu")
        >>> part[0][0].tolist(), part[1]
        ([1.0, 1.0], [3.0])
    """
    if not shards.active:
        return local()
    failure = None
    try:
        tensors, numbers = local()
    except Exception as error:  # joins the reduction, then raises it
        failure = error
        tensors, numbers = empty()
    check = fingerprint(inputs) if inputs is not None else torch.zeros((), dtype=torch.float64, device=device)
    header = torch.cat(
        [
            torch.tensor([float(failure is not None), *numbers], dtype=torch.float64, device=device),
            check[None],
        ]
    )
    *summed, header = shards.sum([*tensors, torch.cat([header, check[None].square()])])
    failed, *totals, check_sum, square_sum = header.tolist()
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(
            f"{what}: {int(failed)} other rank(s) of {shards.size} raised an error in their part; "
            "see the error on those ranks."
        )
    mine = check.item()
    if check_sum != shards.size * mine or square_sum != shards.size * mine**2:
        raise ValueError(
            f"{what}: the ranks multiply different vectors, so the sum of their products is no "
            "product of the union. Give every rank the same vectors: draw them from a "
            "torch.Generator seeded the same on every rank (generator=...), or broadcast them."
        )
    return summed, totals
