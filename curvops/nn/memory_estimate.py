"""The bytes a Kronecker operator will hold, known before any pass over data.

:func:`memory_estimate` reads the layers the builders would find (:func:`~curvops.nn.layers.find_layers`,
as :func:`~curvops.nn.coverage` does) and counts, per layer, the tensors of its blocks: the
factors (``G``, ``A``; TKFAC's ``δΨ``, ``Φ`` and scaled ``G``; a normalization layer's exact
block), the eigendecompositions of the distinct factors, the damped inverse's own tensors, and
the largest transient of one ``eigh``. The factors' shapes follow from the layer alone:
``G`` is ``[g, n_out, n_out]`` (``g`` groups; no group axis for ``g = 1``), ``A`` is
``[g, n_in, n_in]`` (``n_in`` counting a joint bias's 1; a 1-D ``[n_in]`` for an embedding).

Not counted, as it depends on the data: during an EKFAC or TEKFAC build, the statistics pass's
layer inputs and output gradients kept for the corrections, at most
:data:`~curvops.nn.kronecker_pass.CORRECTION_CACHE_BYTES` (256 MiB; larger data pass twice).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..linalg import spectral
from ..linalg.factor import NOISE_CHUNK
from ..linalg.memory import _readable
from ..linalg.precision import computation_dtype
from .layers import KroneckerLayer, find_layers
from .options import KroneckerOptions
from .parameters import chosen_parameters

HEADER = ("layer", "block", "factors", "eigenbases", "inverse", "eigh peak")


@dataclass(frozen=True)
class MemoryRow:
    """One layer's bytes.

    Attributes:
        name: the layer's name (a module's, or ``"<module>.<part>"``).
        block: ``"kronecker"`` (``"kronecker ×g"`` for ``g`` groups), ``"exact"`` or ``"exact-diagonal"``.
        factors: the factors (KFAC's ``G`` once, for its weight and bias blocks). EKFAC and
            TEKFAC hold them during the build only.
        eigenbases: the eigenvectors and eigenvalues kept: KFAC's and TKFAC's cached ``(Q, e)`` of
            every distinct matrix factor with ``e``'s rounding bounds (``n² + 2n`` numbers per
            factor and group, computed by the first ``inverse`` or ``logdet``); EKFAC's and
            TEKFAC's eigenvectors and corrected eigenvalues (``Π n_i`` per block).
        inverse: the tensors of the exact damped inverse of its own: one eigenvalue per
            parameter (the eigenvectors are shared).
        corrected: EKFAC's or TEKFAC's corrected block (the operator keeps its eigenbases, not
            its factors).
        decomposition: the largest transient of one ``eigh`` of the layer's factors beyond the
            factor and its result: LAPACK's ``syevd`` workspace (``2n² + 6n + 1`` numbers) and the
            result in the decomposition dtype before its cast, which on the CPU is the factor's
            copy too (on a GPU the copy comes on top: ``n²`` numbers more).

    Not counted: a joint bias's index permutation (one integer per parameter of the layer).
    """

    name: str
    block: str
    factors: int
    eigenbases: int
    inverse: int
    decomposition: int
    corrected: bool = False

    @property
    def kept(self) -> int:
        """Bytes the operator keeps of this layer: eigenbases, and the factors unless corrected."""
        return self.eigenbases + (0 if self.corrected else self.factors)

    def cells(self) -> tuple[str, ...]:
        """The row's entries in the table."""
        sizes = (self.factors, self.eigenbases, self.inverse, self.decomposition)
        return (self.name, self.block, *map(_readable, sizes))


@dataclass(frozen=True)
class MemoryEstimate:
    """What :func:`memory_estimate` finds: one row per layer, and totals in bytes.

    Attributes:
        approximation: ``"KFAC"``, ``"EKFAC"``, ``"TKFAC"`` or ``"TEKFAC"``.
        dtype: the factors' dtype (the model's computation dtype: float32 for bfloat16).
        decomposition_dtype: the dtype ``eigh`` runs in.
        rows: one :class:`MemoryRow` per layer, in the builders' order.
        others: the modules without a rule (their exact blocks, ``unsupported=``, are not counted).
    """

    approximation: str
    dtype: torch.dtype
    decomposition_dtype: torch.dtype
    rows: tuple[MemoryRow, ...]
    others: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[MemoryRow]:
        return iter(self.rows)

    def __getitem__(self, name: str) -> MemoryRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"No layer {name!r}; the layers are {[row.name for row in self.rows]}.")

    @property
    def factors(self) -> int:
        """Bytes of every layer's factors."""
        return sum(row.factors for row in self.rows)

    @property
    def eigenbases(self) -> int:
        """Bytes of every layer's eigenbases."""
        return sum(row.eigenbases for row in self.rows)

    @property
    def inverse(self) -> int:
        """Bytes of the damped inverse's own tensors."""
        return sum(row.inverse for row in self.rows)

    @property
    def decomposition(self) -> int:
        """The largest transient of one ``eigh`` (factors are decomposed one at a time)."""
        return max((row.decomposition for row in self.rows), default=0)

    @property
    def operator(self) -> int:
        """Bytes the operator holds (KFAC, TKFAC: its factors and, once decomposed, its eigenbases;
        EKFAC, TEKFAC: the eigenbases of its corrected blocks; :attr:`MemoryRow.kept`)."""
        return sum(row.kept for row in self.rows)

    @property
    def peak(self) -> int:
        """Factors, eigenbases and inverse at once, plus the largest ``eigh`` transient: the most
        the curvature's tensors take at one time (the model, its gradients and a batch's
        activations come on top)."""
        return self.factors + self.eigenbases + self.inverse + self.decomposition

    def table(self) -> str:
        """The rows and the totals as an aligned text table."""
        totals = (
            "total",
            "",
            *map(_readable, (self.factors, self.eigenbases, self.inverse, self.decomposition)),
        )
        lines = [HEADER, *(row.cells() for row in self.rows), totals]
        widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
        text = [
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines
        ]
        text.append(f"operator {_readable(self.operator)}, peak {_readable(self.peak)}")
        if self.others:
            text.append(f"not counted (no rule): {', '.join(self.others)}")
        return "\n".join(text)

    def __str__(self) -> str:
        return (
            f"{self.approximation} memory ({self.dtype}, eigh in {self.decomposition_dtype})\n" + self.table()
        )


def memory_estimate(
    model: nn.Module,
    approximation: str = "kfac",
    params: Sequence[nn.Parameter] | Mapping[str, nn.Parameter] | None = None,
    bias: str = "separate",
    kfac_approx: str = "expand",
    dtype: torch.dtype | None = None,
    decomposition_dtype: torch.dtype | None = None,
    inverse: bool = True,
) -> MemoryEstimate:
    """The bytes of :func:`~curvops.KFAC`'s (``approximation``: ``"ekfac"``, ``"tkfac"``,
    ``"tekfac"``) factors, eigenbases, damped inverse and ``eigh`` transients on ``model``,
    before any pass over data (see :class:`MemoryRow`).

    Args:
        model: the network.
        approximation: ``"kfac"``, ``"ekfac"``, ``"tkfac"`` or ``"tekfac"``.
        params, bias, kfac_approx, decomposition_dtype: the builders' options (``None``: as the
            builders decompose, float64 but for EKFAC's eigenbases).
        dtype: the model's dtype (default: its parameters'); the factors are in its
            computation dtype (float32 for bfloat16 and float16).
        inverse: count the eigendecompositions and the exact damped inverse (``inverse`` or
            ``logdet`` to be taken; EKFAC's eigenbases are counted either way: its build needs them).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
        >>> estimate = curvops.memory_estimate(model)
        >>> estimate["0"].factors == 4 * (512**2 + 1024**2)  # G and A in float32; the bias shares G
        True
        >>> print(estimate)  # doctest: +NORMALIZE_WHITESPACE
        KFAC memory (torch.float32, eigh in torch.float64)
        layer  block      factors  eigenbases  inverse   eigh peak
        0      kronecker  5.0 MiB  5.0 MiB     2.0 MiB   24.1 MiB
        2      kronecker  1.0 MiB  1.0 MiB     20.0 KiB  6.0 MiB
        total             6.0 MiB  6.0 MiB     2.0 MiB   24.1 MiB
        operator 12.0 MiB, peak 38.1 MiB
    """
    options = KroneckerOptions.checked(approximation, "type-2", kfac_approx, bias)
    if decomposition_dtype is not None:
        spectral.check_decomposition_dtype(decomposition_dtype)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    chosen, _ = chosen_parameters(model, params)
    factor_dtype = computation_dtype(dtype or (chosen[0].dtype if chosen else torch.float32))
    decomposition_dtype = decomposition_dtype or options.approximation.default_decomposition_dtype(
        factor_dtype
    )
    layers, others = find_layers(model, chosen, options.bias, options.kfac_approx) if chosen else ([], [])
    size = torch.empty((), dtype=factor_dtype).element_size()
    cpu = not chosen or chosen[0].device.type != "cuda"  # a meta-device model counts as on the CPU
    rows = tuple(_row(layer, options, size, decomposition_dtype, inverse, cpu) for layer in layers)
    return MemoryEstimate(
        options.approximation.label,
        factor_dtype,
        decomposition_dtype,
        rows,
        tuple(name for name, _, _ in others),
    )


def _row(
    layer: KroneckerLayer,
    options: KroneckerOptions,
    size: int,
    decomposition_dtype: torch.dtype,
    inverse: bool,
    cpu: bool,
) -> MemoryRow:
    """One layer's bytes from the shapes of its factors (``[g, n, n]``, or ``[n]`` for a diagonal)."""
    corrected = options.approximation.corrects(layer)
    if layer.rule.exact:
        matrices, diagonals, spectra = _exact_factors(layer)
        block = "exact" if matrices else "exact-diagonal"
        distinct = matrices
    else:
        distinct, diagonals, spectra = _kronecker_factors(layer, options.approximation.trace_restricted)
        matrices = distinct
        block = "kronecker" if layer.groups == 1 else f"kronecker ×{layer.groups}"
    factors = sum(g * n * n for g, n in matrices) + sum(diagonals)
    decomposed = inverse or corrected
    if corrected:  # eigenvectors (one per distinct factor) and the corrected eigenvalues
        eigenbases = sum(g * n * n for g, n in distinct) + sum(spectra)
    else:
        eigenbases = sum(g * (n * n + 2 * n) for g, n in distinct) if decomposed else 0
    peak = max((_eigh_transient(g, n, size, decomposition_dtype, cpu) for g, n in distinct), default=0)
    return MemoryRow(
        layer.name,
        block,
        factors * size,
        eigenbases * size,
        sum(spectra) * size if inverse else 0,
        peak if decomposed else 0,
        corrected,
    )


def _kronecker_factors(layer: KroneckerLayer, trace_restricted: bool) -> tuple[list, list, list]:
    """The layer's distinct matrix factors ``(g, n)``, its diagonal factors' sizes, and the number
    of eigenvalues of each block (its parameters)."""
    n_out, n_in = layer.sizes
    g = layer.groups
    matrices, diagonals, spectra = [], [], []
    if layer.weight is not None or not trace_restricted:
        matrices.append((g, n_out))  # G (δΨ for TKFAC), shared with KFAC's bias block
    if layer.weight is not None:
        if layer.rule.diagonal_input:
            diagonals.append(g * n_in)
        else:
            matrices.append((g, n_in))
        spectra.append(g * n_out * n_in)
    if layer.separate_bias:
        if trace_restricted:
            matrices.append((g, n_out))  # TKFAC's scaled G: a factor of its own
        spectra.append(g * n_out)
    return matrices, diagonals, spectra


def _exact_factors(layer: KroneckerLayer) -> tuple[list, list, list]:
    """A normalization layer's exact blocks: dense ``[D_p, D_p]`` (or 1-D ``[D_p]`` above the rule's
    ``dense_limit``) per parameter block (one for a joint bias)."""
    sizes = [p.numel() for p in (layer.weight, layer.bias) if p is not None]
    sizes = [sum(sizes)] if layer.joint else sizes
    if len(layer.rule.block_shape(layer)) == 1:
        return [], sizes, sizes
    return [(1, n) for n in sizes], [], sizes


def _eigh_transient(groups: int, n: int, size: int, decomposition_dtype: torch.dtype, cpu: bool) -> int:
    """Bytes the decomposition of a ``[g, n, n]`` factor of ``size``-byte entries allocates beyond
    the factor and its result: in ``eigh``, LAPACK ``syevd``'s workspace and the result before its
    cast back (none if in the factor's dtype), which on the CPU is the factor's copy too (a GPU's
    ``eigh`` copies the factor first: :func:`~curvops.linalg.spectral.eigh`); then QR's two
    matrices to orthonormalise float32 eigenvectors of a float64 factor, and ``|Q|`` with its row
    chunks for the rounding bounds (:meth:`~curvops.linalg.Factor.noise`)."""
    d = torch.empty((), dtype=decomposition_dtype).element_size()
    matrix = groups * n * n
    copy, result = (0 if cpu else matrix * d, groups * (n * n + n) * d) if d != size else (0, 0)
    during = copy + (2 * n * n + 6 * n + 1) * d + result
    widening = 2 * matrix * size if d < size else 0
    rows = min(n, max(1, NOISE_CHUNK // max(n, 1)))
    noise = matrix * size + 3 * groups * rows * n * size
    return max(during, widening, noise)
