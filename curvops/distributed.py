"""torch.distributed: each rank's ``data`` is a shard, and every rank gets the operator of their union.

With a process group initialized (``torch.distributed.is_initialized()``), the builders reduce
their sums over the default group, or the ``group=`` they are given; ``group="local"`` keeps a
builder in its own process. A curvature is a sum over loss terms divided by their count, so
the union's is ``(Σ_ranks Σ_batches s) / (Σ_ranks count)``: every rank adds its batches as it
would alone, and the sums and counts are all-reduced once per pass (:meth:`Shards.sum`), in a
few flat buffers rather than one collective per tensor or per batch.

A rank with fewer batches (or none) adds what it has: a statistic it never saw enters as
zeros of the shape the other ranks report (:meth:`Shards.sum_statistics`). Random draws
(``"mc"`` labels) are seeded per rank (:meth:`Shards.seed`), so the union is one fixed matrix.
Eigendecompositions are independent per factor: :meth:`Shards.decompose` gives each factor to
one rank (the largest first, to the least loaded rank, as KAISA does) and broadcasts the
results; :func:`decompose_blocks` does so for every distinct factor of a list of Kronecker
blocks (or whole operators) and fills their shared caches (:class:`~curvops.linalg.Factor`), so
their ``inverse``, ``logdet`` and EKFAC's eigenbases need no ``eigh`` afterwards.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from .linalg import CurvatureOperator, Factor, spectral
from .linalg.factor import factors_of

if TYPE_CHECKING:
    from .nn.statistics import Corrections, LayerStatistics

LOCAL = "local"
"""``group=LOCAL`` (``"local"``): no reduction; the operator of this process's data alone."""

BUCKET_NUMBERS = 2**24
"""The most numbers one collective carries (64 MiB of float32): larger sums go in several buckets,
so the flat copy a reduction makes stays small."""

_SEED_STRIDE = 0x9E3779B97F4A7C15  # odd, so seeds of different ranks never coincide mod 2**63


@dataclass(frozen=True)
class Shards:
    """The ranks whose data shards make one data set: a process group, or this process alone.

    Attributes:
        group: the process group, or ``None`` for this process alone (nothing is reduced).

    Example:
        >>> shards = Shards.of("local")
        >>> shards.rank, shards.size, shards.active
        (0, 1, False)
        >>> shards.sum([torch.ones(2)])[0].tolist()
        [1.0, 1.0]
    """

    group: Any = None

    @classmethod
    def of(cls, group: Any = None) -> Shards:
        """The shards of ``group``: a ``torch.distributed`` process group; ``None`` for the default
        group when ``torch.distributed`` is initialized (this process alone otherwise); ``"local"``
        for this process alone. Raises ``ValueError`` for anything else."""
        if isinstance(group, str) and group == LOCAL:
            return cls(None)
        if group is None:
            return cls(dist.group.WORLD) if dist.is_available() and dist.is_initialized() else cls(None)
        if dist.is_available() and isinstance(group, dist.ProcessGroup):
            return cls(group)
        raise ValueError(
            f"group must be a torch.distributed ProcessGroup, None (the default group when "
            f"torch.distributed is initialized) or {LOCAL!r} (this process alone); got {group!r}."
        )

    @property
    def rank(self) -> int:
        """This process's rank in the group (``0`` alone)."""
        return 0 if self.group is None else dist.get_rank(self.group)

    @property
    def size(self) -> int:
        """The number of ranks (``1`` alone)."""
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def active(self) -> bool:
        """Whether there is anything to reduce: more than one rank."""
        return self.size > 1

    def seed(self, seed: int) -> int:
        """This rank's seed for random draws from the common ``seed``: ``seed`` itself on rank 0 (and
        alone), a different one on every other rank, so shards draw independent labels."""
        return (seed + self.rank * _SEED_STRIDE) % 2**63

    def global_rank(self, rank: int) -> int:
        """The global rank of the group's ``rank`` (what ``broadcast`` takes)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Every tensor summed over the ranks (new tensors; the inputs are left alone), with one
        collective per dtype and device, per :data:`BUCKET_NUMBERS` numbers. Every rank must pass
        tensors of the same shapes, dtypes and devices in the same order."""
        if not self.active:
            return list(tensors)
        results: list[Tensor | None] = [None] * len(tensors)
        for indices in _buckets(tensors):
            flat = torch.cat([tensors[i].reshape(-1) for i in indices])
            dist.all_reduce(flat, group=self.group)
            for i, part in zip(indices, flat.split([tensors[i].numel() for i in indices]), strict=True):
                results[i] = part.view(tensors[i].shape)
        return results

    def sum_numbers(self, numbers: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
        """Python numbers (counts, loss sums) summed over the ranks in float64 (one collective);
        ``device`` must suit the group's backend (a CUDA device for NCCL)."""
        if not self.active:
            return [float(n) for n in numbers]
        total = self.sum([torch.tensor([float(n) for n in numbers], dtype=torch.float64, device=device)])[0]
        return total.tolist()

    def together(self, run: Callable[[], Any], device: torch.device | str, what: str) -> Any:
        """``run()``'s result, with a failure on any rank raised on every rank: a rank whose ``run``
        raises still joins one small reduction that tells the others, which raise
        ``RuntimeError`` naming ``what``, so no rank waits in a later collective for it.

        Example:
            >>> Shards.of("local").together(lambda: 3, "cpu", "a pass")
            3
        """
        if not self.active:
            return run()
        failure = None
        try:
            result = run()
        except Exception as error:  # joins the reduction, then raises it
            failure, result = error, None
        (failed,) = self.sum_numbers([float(failure is not None)], device)
        if failure is not None:
            raise failure
        if failed:
            raise RuntimeError(
                f"{what}: {int(failed)} other rank(s) of {self.size} raised an error; see the error on "
                "those ranks."
            )
        return result

    def gather(self, value: Any) -> list[Any]:
        """Every rank's picklable ``value``, in rank order (``[value]`` alone)."""
        if not self.active:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def sum_statistics(self, statistics: Sequence[LayerStatistics]) -> list[LayerStatistics]:
        """Every layer's statistics sums (and ``input_count``) summed over the ranks; a statistic
        a rank has not seen (no batches, or none with loss terms) enters there as zeros.

        Raises ``ValueError`` if the ranks hold different layers, or a statistic of different
        shapes (a module called differently on different ranks)."""
        if not self.active:
            return list(statistics)
        device = _device_of(statistics)
        schemas = self.gather([_schema(s.layer.name, s.tensors()) for s in statistics])
        union = _union_schema(schemas, [s.layer.name for s in statistics])
        tensors = [
            s.tensors().get(name, torch.zeros(shape, dtype=dtype, device=device))
            for s, fields in zip(statistics, union, strict=True)
            for name, (shape, dtype) in fields.items()
        ]
        counts = self.sum_numbers([s.input_count for s in statistics], device)
        summed = iter(self.sum(tensors))
        return [
            s.replace(input_count=count, **{name: next(summed) for name in fields})
            for s, fields, count in zip(statistics, union, counts, strict=True)
        ]

    def sum_corrections(self, corrections: Sequence[Corrections], names: Sequence[str]) -> list[Corrections]:
        """EKFAC's eigenvalue sums summed over the ranks (zeros where a rank saw no loss terms);
        ``names``: the layers', for errors."""
        if not self.active:
            return list(corrections)
        device = _device_of(corrections)
        fields = [{"weight": c.weight, "bias": c.bias} for c in corrections]
        present = [{k: v for k, v in f.items() if v is not None} for f in fields]
        schemas = self.gather([_schema(i, p) for i, p in enumerate(present)])
        union = _union_schema(schemas, names)
        tensors = [
            p.get(name, torch.zeros(shape, dtype=dtype, device=device))
            for p, layer_fields in zip(present, union, strict=True)
            for name, (shape, dtype) in layer_fields.items()
        ]
        summed = iter(self.sum(tensors))
        return [
            type(c)(**{name: next(summed) for name in layer_fields})
            for c, layer_fields in zip(corrections, union, strict=True)
        ]

    def decompose(
        self, factors: Sequence[Tensor], dtypes: torch.dtype | Sequence[torch.dtype] = spectral.EIGH_DTYPE
    ) -> list[tuple[Tensor, Tensor]]:
        """:func:`~curvops.linalg.spectral.eigh` of every symmetric factor (``[n, n]``, or a batch
        ``[g, n, n]``), each computed on one rank and broadcast: the same factors on every rank give
        the same decompositions everywhere, in ``1/size`` of the time for many equal factors.

        ``dtypes``: the decomposition dtype of every factor, or one for all (float64; float32 falls
        back to float64 per factor on its rank, see :func:`~curvops.linalg.spectral.eigh`; the
        results are in the factors' dtypes either way, so the broadcast does not depend on it).

        Factors go largest first (cost ``g·n³``) to the rank with the least work so far (KAISA's
        assignment by size); every rank decomposes its share, then each broadcasts its results in
        one collective per bucket.
        """
        dtypes = [dtypes] * len(factors) if isinstance(dtypes, torch.dtype) else list(dtypes)
        if not self.active:
            return [spectral.eigh(f, dtype) for f, dtype in zip(factors, dtypes, strict=True)]
        owners = assignment([f.shape[-1] ** 3 * (f.numel() // f.shape[-1] ** 2) for f in factors], self.size)
        results: list[tuple[Tensor, Tensor] | None] = [None] * len(factors)
        for i, owner in enumerate(owners):  # every rank decomposes its own first, all at once
            if owner == self.rank:  # contiguous as the broadcast copies, so products round alike
                results[i] = tuple(t.contiguous() for t in spectral.eigh(factors[i], dtypes[i]))
        for i, owner in enumerate(owners):
            if owner != self.rank:
                f = factors[i]
                results[i] = (f.new_empty(f.shape[:-1]), torch.empty_like(f))
        for rank in range(self.size):
            mine = [i for i, owner in enumerate(owners) if owner == rank]
            parts = [t for i in mine for t in results[i]]
            for indices in _buckets(parts):
                flat = torch.cat([parts[i].reshape(-1) for i in indices])
                dist.broadcast(flat, src=self.global_rank(rank), group=self.group)
                for i, piece in zip(indices, flat.split([parts[i].numel() for i in indices]), strict=True):
                    parts[i].copy_(piece.view(parts[i].shape))
        return results


def decompose_blocks(blocks: Sequence[CurvatureOperator], shards: Shards | None = None) -> int:
    """Decompose every distinct factor of ``blocks`` once, spread over ``shards``' ranks, and fill
    the factors' shared caches: afterwards the blocks' ``inverse``, ``logdet``, ``eigen`` and
    ``factor_inverse`` (and EKFAC's eigenbases) run no ``eigh``.

    ``blocks``: Kronecker blocks (:class:`~curvops.Kronecker`, :class:`~curvops.Dense`,
    :class:`~curvops.linalg.GroupedKronecker`) or operators holding them (a
    :class:`~curvops.BlockDiagonal`, ``Permuted``, ``Cast``: searched through their
    sub-operators); other operators are skipped. A :class:`~curvops.linalg.Factor` shared by several
    blocks (KFAC's ``G`` in a layer's weight and bias blocks) is decomposed once, one already
    decomposed or diagonal not at all, each in its own ``decomposition_dtype``. Every rank must
    pass blocks with the same factors in the same order (what every builder gives once the
    statistics are reduced); ``shards=None`` is this process alone (:meth:`Shards.decompose`).
    Returns the number of factors decomposed.

    Example:
        >>> g = curvops.linalg.Factor(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> blocks = [curvops.Kronecker(g, torch.eye(2)), curvops.Dense(g)]
        >>> decompose_blocks(blocks), decompose_blocks(blocks), g.decomposed  # G and I_2 once
        (2, 0, True)
    """
    pending: dict[int, Factor] = {}
    for factor in factors_of(blocks):
        if not factor.decomposed:
            pending.setdefault(id(factor), factor)
    factors = list(pending.values())
    matrices, dtypes = [f.matrix for f in factors], [f.decomposition_dtype for f in factors]
    results = (shards or Shards()).decompose(matrices, dtypes)
    for factor, (e, q) in zip(factors, results, strict=True):
        factor.fill(e, q)
    return len(factors)


def assignment(costs: Sequence[float], ranks: int) -> list[int]:
    """The rank of each job: the costliest first, each to the rank with the least cost so far
    (ties to the lower rank).

    Example:
        >>> assignment([1.0, 8.0, 1.0, 1.0], 2)
        [1, 0, 1, 1]
    """
    loads = [(0.0, rank) for rank in range(ranks)]
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        load, rank = heapq.heappop(loads)
        owners[job] = rank
        heapq.heappush(loads, (load + costs[job], rank))
    return owners


def _buckets(tensors: Sequence[Tensor]) -> list[list[int]]:
    """The indices of ``tensors`` in groups of one dtype and device and at most
    :data:`BUCKET_NUMBERS` numbers (a larger tensor alone)."""
    groups: dict[tuple, list[list[int]]] = {}
    for i, t in enumerate(tensors):
        buckets = groups.setdefault((t.dtype, t.device), [[]])
        if buckets[-1] and sum(tensors[j].numel() for j in buckets[-1]) + t.numel() > BUCKET_NUMBERS:
            buckets.append([])
        buckets[-1].append(i)
    return [bucket for buckets in groups.values() for bucket in buckets if bucket]


def _device_of(values: Sequence[Any]) -> torch.device:
    for value in values:
        for t in value.tensors().values() if hasattr(value, "tensors") else (value.weight, value.bias):
            if t is not None:
                return t.device
    return torch.device("cpu")


def _schema(key: Any, tensors: dict[str, Tensor]) -> tuple[Any, dict[str, tuple[tuple[int, ...], str]]]:
    return key, {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()}


def _union_schema(schemas: list[list[tuple]], names: Sequence[str]) -> list[dict[str, tuple]]:
    """Per layer, every statistic some rank holds, ``{name: (shape, dtype)}`` in the first rank's
    order; raises if the ranks hold different layers or shapes."""
    keys = [[key for key, _ in schema] for schema in schemas]
    if any(k != keys[0] for k in keys):
        raise ValueError(
            "The ranks collect different layers (a module called differently on different ranks, "
            "such as self- against cross-attention, or a rank without data before a module's first "
            "call): call every module the same way on every rank's data."
        )
    union: list[dict[str, tuple]] = []
    for layer, name in enumerate(names):
        fields: dict[str, tuple] = {}
        for rank, schema in enumerate(schemas):
            for field, (shape, dtype) in schema[layer][1].items():
                if fields.setdefault(field, (shape, dtype)) != (shape, dtype):
                    raise ValueError(
                        f"Layer {name!r}: rank {rank} holds {field} of shape {list(shape)} ({dtype}), "
                        f"another rank {list(fields[field][0])} ({fields[field][1]}); every rank must run "
                        "the same model."
                    )
        union.append({field: (shape, getattr(torch, dtype)) for field, (shape, dtype) in fields.items()})
    return union
