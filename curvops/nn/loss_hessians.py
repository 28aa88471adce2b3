"""The loss-Hessian factor of a loss without a closed form, from per-datum Hessians.

For a loss that is a sum (or mean) of per-datum terms, ``Σ_n ℓ_n(f_n)`` with ``f_n`` the
datum's output row of ``D`` numbers, the Hessian in the outputs is block-diagonal: one
``H_n = ∇²_{f_n} ℓ_n`` (``D × D``) per datum. Its columns for all data at once are ``D``
Hessian-vector products (reverse over reverse, batched with ``torch.func.vmap``) with the
vectors ``e_j`` in every row. Type-2 needs ``H_n = S_n S_n^T``:
``S_n = U_n diag(√λ_n)`` from ``H_n = U_n diag(λ_n) U_n^T``. A loss that is not convex in
the outputs (a negative ``λ`` beyond rounding) has an indefinite GGN, which no such factor
gives: it is refused. So is a loss that couples the data (a contrastive loss), whose
Hessian is not block-diagonal: one more product with a random vector checks it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

MAX_DATUM_OUTPUTS = 1024
"""The largest output row ``D`` (``output[0].numel()``) whose per-datum Hessians are formed: they
take ``N · D²`` numbers per batch, and ``D`` columns are backpropagated."""


def datum_hessians(
    summed_loss: Callable[[Tensor], Tensor], output: Tensor, where: str = "This batch"
) -> Tensor:
    """``H_n = ∇²_{f_n} Σ_m ℓ_m`` for every datum (row ``n`` of ``output``), ``[N, D, D]``.

    One more Hessian-vector product with a random vector checks that the Hessian is
    block-diagonal over data; a loss that couples them raises ``ValueError`` beginning with
    ``where``.

    Example:
        >>> output = torch.randn(3, 2, dtype=torch.float64)
        >>> hessians = datum_hessians(lambda f: f.pow(4).sum(), output)
        >>> torch.allclose(hessians, torch.diag_embed(12 * output.square()))
        True
    """
    data, per_datum = output.shape[0], math.prod(output.shape[1:])
    eye = torch.eye(per_datum, dtype=output.dtype, device=output.device)
    directions = eye.reshape(per_datum, 1, *output.shape[1:]).expand(per_datum, *output.shape)
    _, product = torch.func.vjp(torch.func.grad(summed_loss), output)
    (columns,) = torch.func.vmap(product)(directions)  # [D, N, ...]: column j of every H_n
    hessians = columns.reshape(per_datum, data, per_datum).transpose(0, 1)
    generator = torch.Generator(device=output.device).manual_seed(0)
    probe = torch.randn(output.shape, generator=generator, dtype=output.dtype, device=output.device)
    (full,) = product(probe)
    blockwise = torch.einsum("nij,nj->ni", hessians, probe.reshape(data, per_datum))
    tolerance = math.sqrt(torch.finfo(output.dtype).eps)
    if not bool((full.reshape(data, -1) - blockwise).norm() <= tolerance * (full.norm() + blockwise.norm())):
        raise ValueError(
            f"{where}: the loss couples the data of the batch (its Hessian in the model outputs is not "
            "block-diagonal over the output's rows, as for a contrastive loss); fisher_type='type-2' "
            "needs a sum or mean of per-datum terms. Use curvops.GGN or curvops.Hessian for this loss."
        )
    return hessians


def psd_factor(hessians: Tensor, where: str) -> Tensor:
    """``S_n = U_n diag(√λ_n)`` with ``S_n S_n^T = H_n`` for symmetric ``[N, D, D]`` Hessians.

    Eigenvalues down to ``-√ε · max_n max|λ_n|`` (rounding, relative to the batch's largest)
    count as zero; a more negative one raises ``ValueError`` naming the datum of ``where``
    (the batch).

    Example:
        >>> h = torch.tensor([[[2.0, 1.0], [1.0, 2.0]]], dtype=torch.float64)
        >>> s = psd_factor(h, "batch 0")
        >>> torch.allclose(s @ s.transpose(1, 2), h)
        True
    """
    if not len(hessians):  # no data
        return hessians
    symmetric = (hessians + hessians.transpose(1, 2)) / 2
    eigenvalues, vectors = torch.linalg.eigh(symmetric)
    tolerance = math.sqrt(torch.finfo(eigenvalues.dtype).eps)
    negative = eigenvalues[:, 0] < -tolerance * eigenvalues.abs().amax()
    if bool(negative.any()):
        datum = int(negative.nonzero()[0, 0])
        raise ValueError(
            f"{where}: the loss's Hessian in the model output of datum {datum} has the eigenvalue "
            f"{float(eigenvalues[datum, 0]):.4g} < 0: the loss is not convex in the outputs there, so its "
            "GGN is indefinite and fisher_type='type-2' (which needs ∇²ℓ_n = S_n S_n^T) does not exist. "
            "Use a loss convex in the outputs, or curvops.GGN / curvops.Hessian for the exact matrix."
        )
    return vectors * eigenvalues.clamp(min=0).sqrt().unsqueeze(1)


def generic_hessian_factor(summed_loss: Callable[[Tensor], Tensor], output: Tensor, where: str) -> Tensor:
    """Columns ``S`` with ``Σ_k S_k S_k^T = ∇²_{f_n} ℓ_n`` per datum, ``[D, *output.shape]``, for
    ``summed_loss(f) = Σ_n ℓ_n(f_n)``; ``where`` names the batch in errors.

    Raises ``ValueError`` when a row holds more than :data:`MAX_DATUM_OUTPUTS` numbers, or for
    a loss that is not convex in the outputs (:func:`psd_factor`).

    Example:
        >>> output = torch.randn(3, 2, dtype=torch.float64)
        >>> huber = torch.nn.HuberLoss(reduction="sum")
        >>> s = generic_hessian_factor(lambda f: huber(f, torch.zeros_like(f)), output, "batch 0")
        >>> s.shape  # D = 2 columns per datum
        torch.Size([2, 3, 2])
    """
    per_datum = math.prod(output.shape[1:])
    if per_datum > MAX_DATUM_OUTPUTS:
        raise ValueError(
            f"{where}: a model output row of {per_datum} numbers (output shape {list(output.shape)}) is "
            f"too large for the per-datum loss Hessians of fisher_type='type-2' with this loss (at most "
            f"{MAX_DATUM_OUTPUTS}: they take N·D² numbers). Use nn.MSELoss, nn.CrossEntropyLoss or "
            "nn.BCEWithLogitsLoss (closed forms), fisher_type='empirical' or 'mc' with one of them, or "
            "curvops.GGN (matrix-free)."
        )
    factor = psd_factor(datum_hessians(summed_loss, output, where), where)  # [N, D, K]
    return factor.permute(2, 0, 1).reshape(factor.shape[2], *output.shape)
