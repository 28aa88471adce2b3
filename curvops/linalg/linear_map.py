"""``LinearMap``: a (rectangular) linear map known through its products, and its transpose.

It holds what every curvops map shares: checked products with torch tensors (on the map's
device and of its dtype) and NumPy arrays, the transpose, the dense matrix and the SciPy
view. :class:`~curvops.CurvatureOperator` is the square symmetric case.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor

from .memory import check_dense


class LinearMap(ABC):
    """A linear map ``A`` of shape ``(m, n)``: ``[n]`` or ``[n, K]`` in, ``[m]`` or ``[m, K]`` out.

    Subclasses implement ``_matmat`` (``A X``) and ``_rmatmat`` (``A^T Y``) on checked
    ``[*, K]`` tensors.

    Example:
        >>> j = curvops.Jacobian(torch.nn.Linear(3, 2), [(torch.randn(4, 3), None)])
        >>> j.shape, j.T.shape, (j.T @ torch.ones(8)).shape
        ((8, 8), (8, 8), torch.Size([8]))
    """

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"

    @abstractmethod
    def _matmat(self, x: Tensor) -> Tensor:
        """``A @ x`` for a checked ``[n, K]`` tensor on the map's device and dtype."""

    @abstractmethod
    def _rmatmat(self, y: Tensor) -> Tensor:
        """``A^T @ y`` for a checked ``[m, K]`` tensor on the map's device and dtype."""

    def _check_tensor(self, x: Tensor, rows: int) -> None:
        if x.ndim not in (1, 2) or x.shape[0] != rows:
            raise ValueError(
                f"{type(self).__name__} of shape {self.shape} takes a tensor of shape [{rows}] or "
                f"[{rows}, K], got {list(x.shape)}."
            )
        if x.device != self.device:
            raise ValueError(
                f"Input is on {x.device} but the operator is on {self.device}; "
                f"move it with x.to({str(self.device)!r})."
            )
        if x.dtype != self.dtype:
            raise TypeError(
                f"Input has dtype {x.dtype} but the operator has dtype {self.dtype}; "
                f"cast it with x.to({self.dtype})."
            )

    def _apply(self, x: Tensor | np.ndarray, transpose: bool) -> Tensor | np.ndarray:
        if isinstance(x, np.ndarray):
            if np.iscomplexobj(x):
                raise TypeError(
                    f"{type(self).__name__} is a real operator and got a complex array ({x.dtype}); "
                    "apply it to the real and imaginary parts separately: op @ x.real + 1j * (op @ x.imag)."
                )
            tensor = torch.as_tensor(np.ascontiguousarray(x), device=self.device).to(self.dtype)
            return self._apply(tensor, transpose).cpu().numpy()
        if not isinstance(x, Tensor):
            raise TypeError(f"Expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}.")
        self._check_tensor(x, self.shape[0] if transpose else self.shape[1])
        if x.ndim == 2 and x.shape[1] == 0:  # no columns: nothing to compute
            return x.new_zeros(self.shape[1] if transpose else self.shape[0], 0)
        product = self._rmatmat if transpose else self._matmat
        return product(x.unsqueeze(1)).squeeze(1) if x.ndim == 1 else product(x)

    def __matmul__(self, x: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """``A @ x``; see :meth:`matmat`."""
        if isinstance(x, (Tensor, np.ndarray)):
            return self.matmat(x)
        return NotImplemented

    def matmat(self, x: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """``A @ x`` for ``x`` of shape ``[n]`` or ``[n, K]``, giving ``[m]`` or ``[m, K]``.

        A torch tensor must be on the map's device and of its dtype (else a clear error); a
        NumPy array is cast to the map's dtype and device and the result returned as NumPy,
        so SciPy can call this method.

        Example:
            >>> op = curvops.Dense(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
            >>> op.matmat(np.array([1.0, 0.0])).tolist()
            [2.0, 1.0]
        """
        return self._apply(x, transpose=False)

    def rmatmat(self, y: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """``A^T @ y`` for ``y`` of shape ``[m]`` or ``[m, K]``; torch or NumPy as :meth:`matmat`."""
        return self._apply(y, transpose=True)

    matvec = matmat
    rmatvec = rmatmat

    @property
    def T(self) -> LinearMap:
        """The transpose ``A^T`` as a map of shape ``(n, m)``."""
        return Transposed(self)

    def _unit_blocks(self, size: int) -> Iterator[tuple[int, Tensor]]:
        """``(start, [e_start, ..., e_stop-1])``: unit vectors of length ``size``, ``[size, c]`` at a time."""
        width = max(1, min(size, 2**22 // max(size, 1)))
        for start in range(0, size, width):
            stop = min(start + width, size)
            block = torch.zeros(size, stop - start, dtype=self.dtype, device=self.device)
            block[start:stop].fill_diagonal_(1.0)
            yield start, block

    def _to_dense(self) -> Tensor:
        return torch.cat([self._matmat(block) for _, block in self._unit_blocks(self.shape[1])], dim=1)

    def to_dense(self) -> Tensor:
        """The ``[m, n]`` matrix, from products with unit vectors unless structure is known.

        A matrix over the memory budget raises :class:`~curvops.errors.MemoryBudgetError`
        before anything is computed (see :mod:`curvops.linalg.memory`).

        Example:
            >>> curvops.Identity(2, dtype=torch.float32).to_dense().tolist()
            [[1.0, 0.0], [0.0, 1.0]]
        """
        check_dense(self.shape, self.dtype, f"to_dense of {type(self).__name__}")
        return self._to_dense()

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """This map as a ``scipy.sparse.linalg.LinearOperator`` (NumPy in, NumPy out).

        Example:
            >>> from scipy.sparse.linalg import eigsh
            >>> op = curvops.Diagonal(torch.arange(1.0, 6.0, dtype=torch.float64))
            >>> sorted(eigsh(op.to_scipy(), k=2)[0].round(6).tolist())
            [4.0, 5.0]
        """
        numpy_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return scipy.sparse.linalg.LinearOperator(
            self.shape,
            matvec=self.matmat,
            rmatvec=self.rmatmat,
            matmat=self.matmat,
            rmatmat=self.rmatmat,
            dtype=numpy_dtype,
        )


class Transposed(LinearMap):
    """``A^T`` of a :class:`LinearMap` ``A``, sharing its products; ``Transposed(A).T`` is ``A``."""

    def __init__(self, inner: LinearMap) -> None:
        super().__init__((inner.shape[1], inner.shape[0]), inner.dtype, inner.device)
        self.inner = inner

    def _matmat(self, x: Tensor) -> Tensor:
        return self.inner._rmatmat(x)

    def _rmatmat(self, y: Tensor) -> Tensor:
        return self.inner._matmat(y)

    @property
    def T(self) -> LinearMap:
        return self.inner
