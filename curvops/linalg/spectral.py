"""Spectral helpers shared by every operator that knows its eigenvalues.

One place decides when an eigenvalue counts as zero, when ``logdet`` is ``-inf`` and
when an inverse or a matrix power does not exist, so all structured operators answer these
alike.
"""

import math
import warnings

import torch
from torch import Tensor

from ..errors import NotPositiveDefiniteError, SingularOperatorError, SingularOperatorWarning
from .checks import all_finite

EIGH_DTYPE = torch.float64
"""The dtype eigendecompositions run in by default, whatever the operator's dtype."""
EIGH_EPS = torch.finfo(EIGH_DTYPE).eps
"""Its machine epsilon: an eigenvalue within ``EIGH_EPS · n · max|e|`` of zero is rounding noise."""
DECOMPOSITION_DTYPES = (torch.float64, torch.float32)
"""The dtypes an eigendecomposition may run in (``decomposition_dtype=``): float64, or float32 with
a float64 fallback (:func:`eigh`)."""
LOGDET_CHUNK = 2**22
"""Eigenvalues per float64 chunk of a log-determinant's sum (its temporaries stay small)."""
EIGH_CHECK_RTOL = 100.0
"""A float32 ``eigh`` is accepted within ``EIGH_CHECK_RTOL · ε_32 · √n`` (:func:`accurate_eigh`)."""


def eigh(matrix: Tensor, dtype: torch.dtype = EIGH_DTYPE) -> tuple[Tensor, Tensor]:
    """Eigendecomposition ``matrix = Q diag(e) Q^T`` of a symmetric matrix (or a batch of them).

    The decomposition runs in ``dtype`` (:data:`DECOMPOSITION_DTYPES`; float64 by default, for
    accuracy on float32 and lower inputs) and is cast back to the input's dtype. In float32
    (half the memory, faster) the result is checked (:func:`accurate_eigh`) and recomputed in
    float64 where ``eigh`` fails to converge or is not accurate enough; a float64 matrix's
    float32 eigenvectors are then made orthonormal in float64 (:func:`orthonormalised`), so
    they pass float64's checks while the decomposition has float32's accuracy.

    Args:
        matrix: symmetric ``[n, n]``, or ``[g, n, n]`` (every group's).
        dtype: ``torch.float64`` or ``torch.float32``.

    Returns:
        ``(e, Q)`` with ``e`` of shape ``[..., n]`` ascending and ``Q`` of shape ``[..., n, n]``.

    Example:
        >>> e, q = eigh(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        >>> e.tolist()
        [1.0, 2.0]
        >>> eigh(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.float32)[0].tolist()
        [1.0, 2.0]
    """
    check_decomposition_dtype(dtype)
    if dtype != EIGH_DTYPE:
        try:
            e, q = _lapack_eigh(matrix, dtype)
        except torch.linalg.LinAlgError:  # did not converge
            e = q = None
        if e is not None and accurate_eigh(matrix.to(dtype), e, q):
            wider = torch.finfo(matrix.dtype).eps < torch.finfo(dtype).eps
            return e.to(matrix.dtype), orthonormalised(q.to(matrix.dtype)) if wider else q.to(matrix.dtype)
        del e, q
    e, q = _lapack_eigh(matrix, EIGH_DTYPE)
    return e.to(matrix.dtype), q.to(matrix.dtype)


def _lapack_eigh(matrix: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of ``matrix`` in ``dtype``, its copy made straight into the column-major
    buffer LAPACK overwrites with ``Q`` (``out=``): one ``n x n`` copy less than
    ``eigh(matrix.to(dtype))`` (128 MiB for a float64 4096 x 4096 factor), the same numbers. On the
    CPU only (on a GPU: ``eigh(matrix.to(dtype))``, whose aliasing of ``out`` is not checked here)."""
    if matrix.device.type != "cpu":
        return torch.linalg.eigh(matrix.to(dtype))
    q = torch.empty(matrix.shape, dtype=dtype, device=matrix.device).mT
    q.copy_(matrix)
    e = torch.empty(matrix.shape[:-1], dtype=dtype, device=matrix.device)
    torch.linalg.eigh(q, out=(e, q))
    return e, q


def orthonormalised(q: Tensor) -> Tensor:
    """The orthonormal matrix nearest ``q`` column by column (QR with ``diag(R) > 0``), or every
    group's for ``[g, n, n]``.

    Example:
        >>> orthonormalised(torch.tensor([[2.0, 0.0], [0.0, -1.0]])).tolist()
        [[1.0, 0.0], [0.0, -1.0]]
    """
    basis, r = torch.linalg.qr(q)
    return basis * torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype).unsqueeze(-2)


def check_decomposition_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if it is one of :data:`DECOMPOSITION_DTYPES`, else ``ValueError``.

    Example:
        >>> check_decomposition_dtype(torch.float32)
        torch.float32
    """
    if dtype not in DECOMPOSITION_DTYPES:
        raise ValueError(
            f"decomposition_dtype must be torch.float64 or torch.float32 (float64 recomputes a factor "
            f"whose float32 eigh is not accurate enough), got {dtype!r}."
        )
    return dtype


def accurate_eigh(matrix: Tensor, e: Tensor, q: Tensor, probes: int = 4) -> bool:
    """Whether ``(e, Q)`` is an accurate eigendecomposition of ``matrix`` in its dtype: finite, with
    the relative backward error ``‖F - Q diag(e) Q^T‖_F / ‖F‖_F`` and the loss of orthonormality
    ``‖Q Q^T - I‖_F / √n`` within ``EIGH_CHECK_RTOL · ε · √n`` (``ε`` of the dtype), in every group.

    Both are measured on ``probes`` fixed Gaussian vectors ``X`` (``E‖E X‖_F² = probes ·
    ‖E‖_F²``): ``O(n² probes)``, negligible beside the ``O(n³)`` of ``eigh``. LAPACK's float32
    ``eigh`` of KFAC-like factors stays below ``ε √n``.

    Example:
        >>> f = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> e, q = torch.linalg.eigh(f)
        >>> accurate_eigh(f, e, q), accurate_eigh(f, e + 1e-3, q)
        (True, False)
    """
    if not (all_finite(e) and all_finite(q)):
        return False
    n = matrix.shape[-1]
    generator = torch.Generator(matrix.device).manual_seed(0)
    x = torch.randn(n, probes, dtype=matrix.dtype, device=matrix.device, generator=generator)
    rotated = q.mT @ x
    residual = matrix @ x - q @ (e.unsqueeze(-1) * rotated)
    orthonormality = q @ rotated - x
    scale = math.sqrt(n) / x.norm()
    size = matrix.norm(dim=(-2, -1)).clamp_min(torch.finfo(matrix.dtype).tiny)
    backward = residual.norm(dim=(-2, -1)) * scale / size
    lost = orthonormality.norm(dim=(-2, -1)) / x.norm()
    tol = EIGH_CHECK_RTOL * torch.finfo(matrix.dtype).eps * math.sqrt(n)
    return bool((backward <= tol).all()) and bool((lost <= tol).all())


def damped_eigenvalues(
    eigenvalues: Tensor, damping: float, rtol: float, scale: float | Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``e + λ`` with rounding noise removed, and which of the results are zero.

    An eigenvalue within ``tol = rtol * scale`` of zero (``scale`` the size of the numbers
    whose rounding errors ``e`` carries: one number, by default ``max|e|``, or one per
    eigenvalue, a tensor of ``e``'s shape) is rounding noise and is set
    to exactly zero before the (exact) damping is added. ``e + λ`` is then zero where it
    is exactly ``0`` (a zero eigenvalue, no damping) or within ``tol`` of zero for a
    negative ``e`` (damping that cancels a negative eigenvalue).

    Returns:
        ``(values, singular)``: ``e + λ`` and a boolean mask of its zeros.
    """
    if eigenvalues.numel() == 0:
        return eigenvalues + damping, eigenvalues.new_zeros(0, dtype=torch.bool)
    tol = eigenvalues.abs().max() if scale is None else scale
    tol = tol if rtol == 1.0 else rtol * tol
    values = eigenvalues.masked_fill(eigenvalues.abs() <= tol, 0)  # in place from here: few copies of e
    negative = values < 0
    values += damping
    singular = values == 0
    singular |= negative & (values.abs() <= tol)
    return values, singular


def logdet_from_eigenvalues(
    eigenvalues: Tensor, damping: float, rtol: float, scale: float | Tensor | None = None
) -> Tensor:
    """``Σ_i log(e_i + λ)`` for the eigenvalues ``e`` of a positive semi-definite operator.

    Zeros of ``e + λ`` (see :func:`damped_eigenvalues`) make the operator singular: a
    :class:`~curvops.errors.SingularOperatorWarning` is issued and ``-inf`` returned, never
    NaN. A negative ``e + λ`` raises :class:`~curvops.errors.NotPositiveDefiniteError`.
    The sum is accumulated in float64 and returned in the eigenvalues' dtype.

    Example:
        >>> round(logdet_from_eigenvalues(torch.tensor([1.0, 3.0]), 1.0, 0.0).item(), 4)  # log 8
        2.0794
    """
    eigenvalues, total, singular = eigenvalues.flatten(), 0.0, False
    if scale is None and eigenvalues.numel():
        scale = eigenvalues.abs().max()
    for start in range(0, eigenvalues.numel(), LOGDET_CHUNK):  # float64 copies of a chunk at a time
        part = slice(start, start + LOGDET_CHUNK)
        chunk_scale = scale.flatten()[part] if isinstance(scale, Tensor) and scale.numel() > 1 else scale
        values, zeros = damped_eigenvalues(eigenvalues[part].to(torch.float64), damping, rtol, chunk_scale)
        if bool(((values < 0) & ~zeros).any()):
            raise NotPositiveDefiniteError(
                f"logdet needs a positive semi-definite operator, but an eigenvalue of op + {damping}*I "
                f"is {values.min().item():.3e}; logdet is undefined (use a larger damping)."
            )
        singular = singular or bool(zeros.any())
        if not singular:
            total = total + values.log_().sum()
    if singular:
        warnings.warn(
            "logdet of a singular operator is -inf; pass damping > 0 "
            "for a finite, exact log-determinant of op + damping*I.",
            SingularOperatorWarning,
            stacklevel=3,
        )
        return torch.tensor(-torch.inf, dtype=eigenvalues.dtype, device=eigenvalues.device)
    return torch.as_tensor(total, dtype=torch.float64, device=eigenvalues.device).to(eigenvalues.dtype)


def power_eigenvalues(
    eigenvalues: Tensor, p: float, damping: float, rtol: float, scale: float | Tensor | None = None
) -> Tensor:
    """``(e + λ)^p``: the eigenvalues of ``(op + λI)^p`` from those of ``op``.

    Zeros of ``e + λ`` are found as in :func:`damped_eigenvalues` and set to exactly ``0``
    (so ``0^p = 0`` for ``p > 0``). For ``p < 0`` a zero raises
    :class:`~curvops.errors.SingularOperatorError`, saying to pass ``damping > 0``. A
    non-integer ``p`` of a negative ``e + λ`` (an indefinite operator, e.g. a Hessian) has no
    real value and raises :class:`~curvops.errors.NotPositiveDefiniteError` (a ``ValueError``);
    integer powers of negative eigenvalues are fine.

    Example:
        >>> power_eigenvalues(torch.tensor([0.0, 3.0]), 0.5, 1.0, 0.0).tolist()
        [1.0, 2.0]
    """
    values, singular = damped_eigenvalues(eigenvalues, damping, rtol, scale)
    if p < 0 and bool(singular.any()):
        raise SingularOperatorError(
            f"op + {damping}*I is singular (an eigenvalue is {values[singular].abs().max().item():.3e}), "
            f"so (op + {damping}*I)^{p:g} does not exist; pass damping > 0."
        )
    if not float(p).is_integer() and bool(((values < 0) & ~singular).any()):
        raise NotPositiveDefiniteError(
            f"op + {damping}*I has a negative eigenvalue {values.min().item():.3e} (it is indefinite), so "
            f"(op + {damping}*I)^{p:g} is not real; pass a larger damping or an integer power."
        )
    return values.masked_fill_(singular, 0).pow_(p)


def inverse_eigenvalues(
    eigenvalues: Tensor, damping: float, rtol: float, scale: float | Tensor | None = None
) -> Tensor:
    """``1 / (e + λ)``: :func:`power_eigenvalues` with ``p = -1``.

    A zero of ``e + λ`` raises :class:`~curvops.errors.SingularOperatorError`, saying to pass
    ``damping > 0``.

    Example:
        >>> inverse_eigenvalues(torch.tensor([1.0, 3.0]), 1.0, 0.0).tolist()
        [0.5, 0.25]
    """
    return power_eigenvalues(eigenvalues, -1.0, damping, rtol, scale)
