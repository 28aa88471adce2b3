"""How well a curvature approximation ``B`` matches a reference ``A``: :func:`compare`.

The metrics researchers report when comparing, e.g., KFAC with the exact GGN: the relative
Frobenius error, the trace ratio, the relative log-determinant error of the damped
operators, the angle between damped inverse-vector products (natural-gradient directions),
and the top eigenvalues with the overlap of the top eigenvector subspaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import scipy.sparse.linalg
import torch
from torch import Tensor

from .linalg import computation_dtype, rademacher, spectral
from .linalg.base import CurvatureOperator
from .linalg.checks import check_bool, check_damping, check_generator, check_positive_int

EXACT_MAX_SIZE = 2048
"""``compare(exact=None)`` is exact up to this size ``D`` and estimates above it."""

NUM_VECTORS = 8
"""Standard normal vectors ``v`` drawn for the inverse angle when none are given."""


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare` (``A`` the reference, ``B`` the approximation).

    Attributes:
        frobenius_error: ``‖A - B‖_F / ‖A‖_F``.
        trace_ratio: ``tr(B) / tr(A)``.
        dampings: the dampings ``λ`` of :attr:`logdet_error`; the first is the inverse's.
        logdet_error: ``|logdet(B + λI) - logdet(A + λI)| / |logdet(A + λI)|``, one per ``λ``.
        inverse_angle: mean over the vectors ``v`` of the angle (radians, in ``[0, π]``)
            between ``(A + λI)^-1 v`` and ``(B + λI)^-1 v``, ``λ = dampings[0]``.
        top_eigenvalues_reference: the ``k`` largest eigenvalues of ``A``, descending.
        top_eigenvalues_approximation: the ``k`` largest eigenvalues of ``B``, descending.
        eigenvector_overlap: ``‖U_A^T U_B‖_F² / k`` for the ``[D, k]`` orthonormal top
            eigenvectors ``U``: ``1`` for the same subspace, ``0`` for orthogonal ones.
        exact: whether the metrics were computed exactly or estimated.
    """

    frobenius_error: float
    trace_ratio: float
    dampings: tuple[float, ...]
    logdet_error: tuple[float, ...]
    inverse_angle: float
    top_eigenvalues_reference: tuple[float, ...]
    top_eigenvalues_approximation: tuple[float, ...]
    eigenvector_overlap: float
    exact: bool


class _Quantities(NamedTuple):
    """What the metrics need of one operator ``M``."""

    trace: float
    logdets: tuple[float, ...]  # logdet(M + λI) per damping
    solves: Tensor  # (M + λ_0 I)^-1 V, [D, K]
    eigenvalues: Tensor  # top k, descending, [k]
    eigenvectors: Tensor  # orthonormal, [D, k]


def compare(
    reference: CurvatureOperator,
    approximation: CurvatureOperator,
    damping: float | Sequence[float] = 1e-3,
    vectors: Tensor | None = None,
    k: int = 5,
    exact: bool | None = None,
    num_samples: int = 64,
    generator: torch.Generator | None = None,
) -> Comparison:
    """Metrics of how well ``approximation`` ``B`` matches ``reference`` ``A`` (both ``D x D``).

    - ``frobenius_error = ‖A - B‖_F / ‖A‖_F``;
    - ``trace_ratio = tr(B) / tr(A)``;
    - ``logdet_error = |logdet(B + λI) - logdet(A + λI)| / |logdet(A + λI)|`` for each ``λ``;
    - ``inverse_angle = mean_j ∠((A + λ_0 I)^-1 v_j, (B + λ_0 I)^-1 v_j)`` over the columns
      ``v_j`` of ``vectors``, ``λ_0`` the first damping, computed as
      ``2 atan2(‖x̂ - ŷ‖, ‖x̂ + ŷ‖)`` for the unit vectors ``x̂, ŷ`` (accurate near 0);
    - ``top_eigenvalues_reference``, ``top_eigenvalues_approximation``: the ``k`` largest
      eigenvalues, descending, and ``eigenvector_overlap = ‖U_A^T U_B‖_F² / k`` for the
      ``[D, k]`` top eigenvectors (``1``: the same subspace; ill-defined where the
      ``k``-th and ``(k+1)``-th eigenvalues coincide).

    ``exact=True`` computes all of them from ``to_dense()``: one float64
    ``torch.linalg.eigh`` per operator gives the log-determinants, the damped inverses
    and the eigenpairs (with the conventions of :mod:`curvops.linalg.spectral`: ``-inf``
    and a warning for a singular ``logdet``, an error for a singular inverse).

    ``exact=False`` estimates them from products, for operators too large to densify:

    - the Frobenius norms by ``‖(A - B) Z‖_F² / m`` and ``‖A Z‖_F² / m`` with one set of
      ``m = num_samples`` Rademacher probes ``Z`` (unbiased, as ``E[Z Z^T] = m I``; each a
      relative standard deviation of at most ``sqrt(2/m)``);
    - the traces by each operator's exact ``trace()`` (structure), except for matrix-free
      model operators (:class:`~curvops.nn.ModelCurvature`), whose exact trace costs ``D``
      products: Hutch++ with ``num_samples`` products;
    - the log-determinants and inverses by each operator's own ``logdet(λ)`` and
      ``inverse(λ)`` with its default method (exact for structured operators, SLQ and CG for
      model operators);
    - the top eigenpairs by ``scipy.sparse.linalg.eigsh(op.to_scipy(), k, which="LA")``.

    Args:
        reference: ``A``, e.g. the exact :class:`~curvops.GGN`.
        approximation: ``B``, e.g. :func:`~curvops.KFAC`; same shape, dtype and device.
        damping: ``λ >= 0``, or a non-empty sequence of them; the first one damps the inverse.
        vectors: ``[D]`` or ``[D, K]`` non-zero vectors ``v`` of the operators' dtype and device
            for the inverse angle (default: ``8`` standard normal vectors from ``generator``).
        k: how many top eigenpairs, ``1 <= k < D``.
        exact: exact or estimated metrics (default: exact for ``D <= 2048``).
        num_samples: probes of the estimates (``exact=False``).
        generator: random source of the default vectors and the estimators' probes. For
            operators over :mod:`curvops.distributed` shards pass one seeded the same on every
            rank: every rank then multiplies the same vectors and gets the same comparison.

    Returns:
        A :class:`Comparison` of Python floats.

    Raises:
        TypeError: an operand is not a :class:`~curvops.CurvatureOperator`, or the dtypes differ.
        ValueError: shapes or devices differ, ``k``, ``damping``, ``vectors`` or ``num_samples``
            is invalid, or a metric's denominator (``‖A‖_F``, ``tr(A)``, ``logdet(A + λI)``) is 0.

    Example:
        >>> a = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
        >>> diagonal = curvops.Diagonal(a.diagonal())  # the diagonal approximation of A
        >>> c = curvops.compare(curvops.Dense(a), diagonal, damping=[0.1, 1.0], k=1)
        >>> round(c.frobenius_error, 4), c.trace_ratio  # ‖offdiag‖_F / ‖A‖_F = 2 / sqrt(18)
        (0.4714, 1.0)
        >>> c.dampings, [round(e, 3) for e in c.logdet_error]
        ((0.1, 1.0), [0.814, 0.1])
        >>> [round(e, 4) for e in c.top_eigenvalues_reference], c.top_eigenvalues_approximation  # 2 + sqrt(3)
        ([3.7321], (3.0,))
        >>> round(c.eigenvector_overlap, 4), 0 < c.inverse_angle < math.pi / 2  # overlap (e_1^T u_A)^2
        (0.6220, True)
    """
    size = _check_operators(reference, approximation)
    reference, approximation = (
        _widened(op, name) for op, name in ((reference, "reference"), (approximation, "approximation"))
    )
    dampings = tuple(check_damping(d) for d in (damping if isinstance(damping, Sequence) else [damping]))
    if not dampings:
        raise ValueError("damping must be a number or a non-empty sequence of numbers.")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < size:
        raise ValueError(f"k must be an integer with 1 <= k < D = {size}, got {k!r}.")
    check_positive_int(num_samples, "num_samples")
    check_generator(generator)
    if vectors is None:
        vectors = torch.randn(
            size, NUM_VECTORS, generator=generator, dtype=reference.dtype, device=reference.device
        )
    vectors = _check_vectors(vectors, reference)
    exact = size <= EXACT_MAX_SIZE if exact is None else check_bool(exact, "exact")
    if not exact and num_samples < 3:
        raise ValueError(f"num_samples must be >= 3 for Hutch++ (exact=False), got {num_samples}.")

    if exact:
        a, b = (_dense(op) for op in (reference, approximation))
        difference, norm = _frobenius_squared(a - b, a)
        ref, app = (
            _exact(dense, op, dampings, vectors, k) for dense, op in ((a, reference), (b, approximation))
        )
    else:
        z = rademacher(size, reference.dtype, reference.device, generator)(num_samples)
        az = reference @ z
        difference, norm = _frobenius_squared(az - approximation @ z, az)
        ref, app = (
            _estimated(op, dampings, vectors, k, num_samples, generator) for op in (reference, approximation)
        )

    if ref.trace == 0:
        raise ValueError("The reference has trace 0, so the trace ratio tr(B) / tr(A) is undefined.")
    for value, logdet in zip(dampings, ref.logdets, strict=True):
        if logdet == 0:
            raise ValueError(
                f"logdet(A + {value}*I) = 0, so the relative logdet error is undefined; "
                "choose another damping."
            )
    return Comparison(
        frobenius_error=(difference / norm) ** 0.5,
        trace_ratio=app.trace / ref.trace,
        dampings=dampings,
        logdet_error=tuple(abs(lb - la) / abs(la) for la, lb in zip(ref.logdets, app.logdets, strict=True)),
        inverse_angle=_mean_angle(ref.solves, app.solves),
        top_eigenvalues_reference=tuple(ref.eigenvalues.tolist()),
        top_eigenvalues_approximation=tuple(app.eigenvalues.tolist()),
        eigenvector_overlap=(ref.eigenvectors.T @ app.eigenvectors).square().sum().item() / k,
        exact=exact,
    )


def _check_operators(reference: CurvatureOperator, approximation: CurvatureOperator) -> int:
    """``D``, after checking both are curvature operators of one shape, dtype and device."""
    for name, op in (("reference", reference), ("approximation", approximation)):
        if not isinstance(op, CurvatureOperator):
            raise TypeError(f"{name} must be a curvops.CurvatureOperator, got {type(op).__name__}.")
    if reference.shape != approximation.shape:
        raise ValueError(f"Shapes differ: reference {reference.shape}, approximation {approximation.shape}.")
    if reference.dtype != approximation.dtype:
        raise TypeError(f"Dtypes differ: reference {reference.dtype}, approximation {approximation.dtype}.")
    if reference.device != approximation.device:
        raise ValueError(
            f"Devices differ: reference {reference.device}, approximation {approximation.device}."
        )
    return reference.shape[0]


def _widened(op: CurvatureOperator, name: str) -> CurvatureOperator:
    """``op``, or a bfloat16 / float16 ``op`` in float64: its float32 structure converted (the
    precision policy), since ``eps · D`` of bf16 would zero the small eigenvalues that
    ``logdet_error`` and ``inverse_angle`` depend on. A matrix-free model operator of such a
    model has only bf16 products (no structure to convert): refused."""
    if computation_dtype(op.dtype) == op.dtype:
        return op
    try:
        return op.to(dtype=torch.float64)
    except TypeError as error:
        raise TypeError(
            f"The {name} is a {op.dtype} operator defined by a model ({type(op).__name__}): its products "
            f"carry {op.dtype}'s 2-3 digits, which swamp the small eigenvalues behind logdet_error and "
            "inverse_angle. Compare the model in float64 instead: build both operators on "
            "copy.deepcopy(model).double()."
        ) from error


def _check_vectors(vectors: Tensor, op: CurvatureOperator) -> Tensor:
    """``vectors`` as ``[D, K]``, after checking shape, dtype, device and that no column is 0."""
    size = op.shape[0]
    if not isinstance(vectors, Tensor) or vectors.ndim not in (1, 2) or vectors.shape[0] != size:
        shape = list(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
        raise ValueError(f"vectors must be a tensor of shape [{size}] or [{size}, K], got {shape}.")
    if vectors.dtype != op.dtype or vectors.device != op.device:
        raise ValueError(
            f"vectors must have the operators' dtype {op.dtype} and device {op.device}, "
            f"got {vectors.dtype} on {vectors.device}."
        )
    vectors = vectors.reshape(size, -1)
    if vectors.shape[1] == 0 or bool((vectors.norm(dim=0) == 0).any()):
        raise ValueError("vectors must have at least one column and no zero column.")
    return vectors


def _frobenius_squared(difference: Tensor, reference: Tensor) -> tuple[float, float]:
    """``(‖difference‖_F², ‖reference‖_F²)``, raising if the reference is zero."""
    norm = reference.square().sum().item()
    if norm == 0:
        raise ValueError("The reference is zero (‖A‖_F = 0), so the relative Frobenius error is undefined.")
    return difference.square().sum().item(), norm


def _dense(op: CurvatureOperator) -> Tensor:
    """The symmetrised float64 dense matrix of ``op``."""
    dense = op.to_dense().to(torch.float64)
    return 0.5 * (dense + dense.T)


def _exact(
    dense: Tensor, op: CurvatureOperator, dampings: tuple[float, ...], vectors: Tensor, k: int
) -> _Quantities:
    """The quantities of ``op`` from one float64 eigendecomposition of its ``dense`` matrix."""
    rtol = torch.finfo(op.dtype).eps * op.shape[0]  # when an eigenvalue counts as zero, as op's own
    eigenvalues, eigenvectors = torch.linalg.eigh(dense)
    inverse = spectral.inverse_eigenvalues(eigenvalues, dampings[0], rtol)
    return _Quantities(
        trace=dense.trace().item(),
        logdets=tuple(spectral.logdet_from_eigenvalues(eigenvalues, d, rtol).item() for d in dampings),
        solves=eigenvectors @ (inverse[:, None] * (eigenvectors.T @ vectors.to(torch.float64))),
        eigenvalues=eigenvalues[-k:].flip(0),
        eigenvectors=eigenvectors[:, -k:].flip(1),
    )


def _estimated(
    op: CurvatureOperator,
    dampings: tuple[float, ...],
    vectors: Tensor,
    k: int,
    num_samples: int,
    generator: torch.Generator | None,
) -> _Quantities:
    """The quantities of ``op`` from products: its own trace, logdet and inverse, and ``eigsh``."""
    if op.matrix_free:
        trace = op.trace(method="hutch++", num_samples=num_samples, generator=generator)
    else:
        trace = op.trace()
    start = rademacher(op.shape[0], op.dtype, op.device, generator)(1)[:, 0].cpu().numpy()
    eigenvalues, eigenvectors = scipy.sparse.linalg.eigsh(op.to_scipy(), k=k, which="LA", v0=start)
    eigenvalues, order = torch.from_numpy(eigenvalues).to(torch.float64).sort(descending=True)
    return _Quantities(
        trace=trace.item(),
        logdets=tuple(op.logdet(d, generator=generator).item() for d in dampings),
        solves=op.inverse(dampings[0]) @ vectors,
        eigenvalues=eigenvalues,
        eigenvectors=torch.from_numpy(eigenvectors).to(torch.float64)[:, order],
    )


def _mean_angle(x: Tensor, y: Tensor) -> float:
    """Mean over columns of the angle between ``x[:, j]`` and ``y[:, j]``: ``2 atan2(‖x̂ - ŷ‖, ‖x̂ + ŷ‖)``."""
    x, y = x / x.norm(dim=0), y / y.norm(dim=0)
    return (2 * torch.atan2((x - y).norm(dim=0), (x + y).norm(dim=0))).mean().item()
