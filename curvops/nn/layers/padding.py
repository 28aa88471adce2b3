"""Padding: which positions of a layer hold loss terms.

Targets equal to ``ignore_index`` are no loss terms, and a layer's positions that belong to
none are left out of every sum (``A``, its count, ``reduce``'s means over positions,
TKFAC's terms, EKFAC's corrections; their output gradients too), by :func:`kept_positions`
from the batch's mask of valid targets (:meth:`~curvops.nn.losses.LossAdapter.valid_terms`,
``T`` targets in all):

- a layer whose positions ``[N, S]`` line up with the targets (``N S = T``: a token-wise
  layer on ``[N, S, d]`` inputs with targets ``[N, S]``, or with a model that ends in
  ``output.flatten(0, -2)`` and targets ``[N·S]``) drops its positions of ignored targets;
- any other layer (a convolution before pooling, a layer after a sequence reduction) drops
  a datum (row ``n``) whose targets are all ignored, and keeps the rest: row ``n`` holds the
  targets ``n T/N .. (n+1) T/N - 1`` when ``N`` divides ``T``, or the target ``⌊n T/N⌋``
  when ``T`` divides ``N``; a layer whose rows match the targets in neither way keeps all.
"""

from __future__ import annotations

from torch import Tensor


def kept_positions(valid: Tensor | None, data: int, positions: int) -> Tensor | None:
    """Which of a layer's ``[data, positions]`` positions hold loss terms, from the mask ``valid``
    of the batch's targets (see the module docstring); ``None`` keeps all.

    Example:
        >>> valid = torch.tensor([[True, False, False], [False, False, False]])  # targets [N, S]
        >>> kept_positions(valid, 2, 3).tolist()  # a token-wise layer: its positions line up
        [[True, False, False], [False, False, False]]
        >>> kept_positions(valid, 2, 5).tolist()  # another layer: datum 1 has no loss term
        [[True, True, True, True, True], [False, False, False, False, False]]
        >>> kept_positions(torch.tensor([True, False]), 4, 2).tolist()  # rows 2n, 2n+1 of target n
        [[True, True], [True, True], [False, False], [False, False]]
    """
    if valid is None:
        return None
    flat = valid.reshape(-1)
    if data * positions == flat.numel():
        return flat.reshape(data, positions)
    if data and flat.numel() % data == 0:
        rows = flat.reshape(data, -1).any(dim=1)
    elif flat.numel() and data % flat.numel() == 0:
        rows = flat.repeat_interleave(data // flat.numel())
    else:
        return None
    return rows.unsqueeze(1).expand(data, positions)


def masked(values: Tensor | None, kept: Tensor | None, trailing: int = 1) -> Tensor | None:
    """``values`` (``[..., N, S, d]``, or ``[..., N, S, g, d]`` with ``trailing=2`` axes after the
    positions) with the vectors at positions not ``kept`` (``[N, S]``) zero."""
    if values is None or kept is None:
        return values
    return values * kept.reshape(*kept.shape, *[1] * trailing).to(values.dtype)
