"""Sums over every datum's weight gradient ``∇_W ℓ_n = Σ_s g_ns a_ns^T`` without storing more than a
chunk of them: TKFAC's trace ``Σ ‖∇_W ℓ_n‖²`` and the memory-saving choice EKFAC's corrections
make between per-example gradients and position Gramians (:mod:`curvops.nn.layers.rule`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

CORRECTION_CHUNK = 2**22
"""Numbers per intermediate of a gradient-norm sum or an eigenvalue correction: data are
processed in chunks below it (16 MiB in float32: bounded memory, and on a CPU twice as fast
as chunks of 2**26 numbers, which leave the cache)."""


def input_rotated(gradients: Tensor, q_in: Tensor) -> Tensor:
    """Per-datum weight gradients ``[K, N, n_out, n_in]`` times ``Q_in`` (``[K, N, g, n_out, n_in]``
    times every group's ``[g, n_in, n_in]``)."""
    return gradients @ q_in if q_in.ndim == 2 else torch.einsum("kngoi,gij->kngoj", gradients, q_in)


def correction_strategy(
    correction: str, columns: int, data: int, positions: int, outputs: int, inputs: int
) -> str:
    """``"per-example"`` or ``"gramian"``: ``"auto"`` picks the one with less memory.

    Per-example rotated gradients take ``K·N·n_out·n_in`` numbers for ``K`` columns and ``N``
    data; the Gramians ``N·S²·(n_out + n_in)`` for ``S`` positions.

    Example:
        >>> correction_strategy("auto", 1, 512, 1, 1024, 1024)  # no weight sharing: tiny Gramians
        'gramian'
        >>> correction_strategy("auto", 1, 8, 64, 256, 256)  # 64 tokens per datum
        'per-example'
    """
    if correction != "auto":
        return correction
    per_example = columns * data * outputs * inputs
    gramian = data * positions * positions * (outputs + inputs)
    return "per-example" if per_example <= gramian else "gramian"


def chunks(data: int, per_datum: int, limit: int = CORRECTION_CHUNK) -> list[slice]:
    """The rows of ``data`` data of ``per_datum`` numbers each in chunks of at most ``limit``
    numbers (at least one datum a chunk).

    Example:
        >>> chunks(5, 3, limit=6)
        [slice(0, 2, None), slice(2, 4, None), slice(4, 6, None)]
    """
    rows = max(1, limit // max(per_datum, 1))
    return [slice(start, start + rows) for start in range(0, data, rows)]


def gradient_norms(gradients: Tensor, features: Tensor) -> Tensor:
    """``Σ_{k,n} ‖Σ_s g_kns a_ns^T‖_F²``: the squared norms of every datum's (and column's)
    weight gradient, from ``[K, N, S, n_out]`` output gradients and ``[N, S, n_in]`` inputs;
    per group (``[g]``) for ``[K, N, S, g, n_out]`` and ``[N, S, g, n_in]``.

    TKFAC's ``δ`` is their mean, so its block's trace is the true block's, with or without
    weight sharing. The gradients are formed explicitly or through position Gramians,
    ``Σ_{s,t} (g_kns · g_knt)(a_ns · a_nt)``, whichever takes less memory
    (:func:`correction_strategy`), in chunks of data.

    Example:
        >>> g, a = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
        >>> truth = torch.einsum("knso,nsi->knoi", g, a).square().sum()
        >>> torch.allclose(gradient_norms(g, a), truth)
        True
    """
    columns, data, positions, outputs = *gradients.shape[:3], gradients.shape[-1]
    groups = math.prod(gradients.shape[3:-1])
    strategy = correction_strategy("auto", columns, data, positions, outputs, features.shape[-1])
    per_datum = columns * outputs * features.shape[-1] if strategy == "per-example" else positions * positions
    total = gradients.new_zeros(gradients.shape[3:-1])
    for block in chunks(data, per_datum * groups):
        g, a = gradients[:, block], features[block]
        if strategy == "per-example":
            total = total + torch.einsum("kns...o,ns...i->kn...oi", g, a).square().sum(dim=(0, 1, -2, -1))
        else:
            output_gram = torch.einsum("kns...o,knt...o->n...st", g, g)
            total = total + (output_gram * torch.einsum("ns...i,nt...i->n...st", a, a)).sum(dim=(0, -2, -1))
    return total
