"""A weight tied between layers (the token embedding ``E [V, d]`` used as the output head's
``Linear(d, V).weight``): one Kronecker block from the blocks of its uses.

Each use ``u`` gives its KFAC block in the weight's own row-major layout, ``X_u ⊗ Y_u`` (the
embedding's ``A_e ⊗ G_e`` with a diagonal ``A_e``, the head's ``G_h ⊗ A_h``). The tied block is
the nearest Kronecker product, in Frobenius norm, to their sum (Van Loan & Pitsianis 1993):
``min ‖Σ_u X_u ⊗ Y_u − B ⊗ C‖_F`` is the top singular pair of the rearrangement
``R = Σ_u vec(X_u) vec(Y_u)^T``, a matrix of rank ``≤ U``. With the Gram matrices
``Γ_X = [⟨X_u, X_v⟩_F]`` and ``Γ_Y`` (``U x U``), ``R = Q_X Γ_X^{1/2} Γ_Y^{1/2} Q_Y^T`` with
orthonormal ``Q``, so the top singular pair ``(σ, p, q)`` of ``Γ_X^{1/2} Γ_Y^{1/2}`` gives
``B = √σ Σ_u α_u X_u``, ``C = √σ Σ_u β_u Y_u`` with ``α = Γ_X^{-1/2} p``, ``β = Γ_Y^{-1/2} q``:
no ``V² x d²`` matrix is formed. For PSD terms ``B`` and ``C`` are PSD up to a common sign, chosen
positive. Only KFAC has such blocks; EKFAC and TKFAC refuse a tied weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import CurvatureOperator, Kronecker
from .approximations import KroneckerApproximation
from .layers.rule import KroneckerLayer

PSD_TOLERANCE = 1e-10
"""Relative to the largest eigenvalue: how negative an eigenvalue of a nearest factor may be."""


def _inner(x: Tensor, y: Tensor) -> Tensor:
    """``⟨X, Y⟩_F`` of two factors, each a matrix or a 1-D diagonal."""
    if x.ndim == y.ndim:
        return (x * y).sum()
    diagonal, matrix = (x, y) if x.ndim == 1 else (y, x)
    return (diagonal * torch.diagonal(matrix)).sum()


def _combination(factors: list[Tensor], weights: Tensor) -> Tensor:
    """``Σ_u w_u X_u`` as a matrix (1-D diagonals made matrices)."""
    return sum(w * (torch.diag(x) if x.ndim == 1 else x) for w, x in zip(weights, factors, strict=True))


def _root_and_pseudo_inverse(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``Γ^{1/2}`` and ``Γ^{-1/2}`` (pseudo-inverse: directions of a zero eigenvalue dropped)."""
    eigenvalues, vectors = torch.linalg.eigh(gram)
    root = eigenvalues.clamp(min=0).sqrt()
    kept = eigenvalues > eigenvalues.max() * 1e-14
    inverse = torch.where(kept, root.clamp(min=torch.finfo(root.dtype).tiny).reciprocal(), 0.0)
    return vectors @ torch.diag(root) @ vectors.T, vectors @ torch.diag(inverse) @ vectors.T


def nearest_kronecker(terms: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``(B, C)`` minimising ``‖Σ_u X_u ⊗ Y_u − B ⊗ C‖_F`` over the ``(X_u, Y_u)`` of ``terms``
    (matrices, or 1-D diagonals), from ``U x U`` Gram matrices (see the module docstring), in
    float64; PSD factors (``tr B, tr C > 0``) for PSD terms, checked.

    Example:
        >>> x, y = torch.eye(2, dtype=torch.float64), torch.ones(3, 3, dtype=torch.float64)
        >>> b, c = nearest_kronecker([(x, y), (2 * x, y)])  # 3 x ⊗ y is a Kronecker product already
        >>> torch.allclose(torch.kron(b, c), 3 * torch.kron(x, y))
        True
    """
    xs = [x.double() for x, _ in terms]
    ys = [y.double() for _, y in terms]
    gram_x = torch.stack([torch.stack([_inner(a, b) for b in xs]) for a in xs])
    gram_y = torch.stack([torch.stack([_inner(a, b) for b in ys]) for a in ys])
    root_x, inverse_x = _root_and_pseudo_inverse(gram_x)
    root_y, inverse_y = _root_and_pseudo_inverse(gram_y)
    left, singular, right = torch.linalg.svd(root_x @ root_y)
    scale = singular[0].sqrt()
    b = scale * _combination(xs, inverse_x @ left[:, 0])
    c = scale * _combination(ys, inverse_y @ right[0])
    if b.trace() < 0:  # B ⊗ C = (-B) ⊗ (-C)
        b, c = -b, -c
    for factor in (b, c):
        eigenvalues = torch.linalg.eigvalsh(factor)
        if eigenvalues[0] < -PSD_TOLERANCE * eigenvalues[-1].abs():
            raise ValueError(f"The nearest Kronecker factor has eigenvalue {float(eigenvalues[0])} < 0.")
    return b, c


def tie_groups(layers: list[KroneckerLayer]) -> list[list[int]]:
    """The indices of the layers that share one weight, for every weight shared by several (the
    parts of one module on other rows of a parameter, an attention's q, k and v, are no tie)."""
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        if layer.weight is not None:
            groups.setdefault((id(layer.weight), layer.weight_rows), []).append(i)
    return [group for group in groups.values() if len(group) > 1]


def check_ties(layers: list[KroneckerLayer], approximation: KroneckerApproximation) -> None:
    """Raise ``ValueError`` naming a tied weight's layers unless ``approximation`` is KFAC's."""
    for group in tie_groups(layers):
        if approximation.trace_restricted or approximation.corrected:
            names = " and ".join(repr(f"{layers[i].name}.weight") for i in group)
            raise ValueError(
                f"One weight is tied as {names}: its block is KFAC's nearest Kronecker product of its "
                f"uses' blocks, which {approximation.label} has no form of. Use KFAC, untie the weight, or "
                "leave it out of params."
            )


def merged_ties(
    layers: list[KroneckerLayer], blocks: list[list[CurvatureOperator | None]]
) -> list[list[CurvatureOperator | None]]:
    """Each layer's blocks (weight first), with the weight blocks of every tie replaced: the
    tie's first layer holds the nearest Kronecker product to their sum, the others ``None``."""
    blocks = [list(layer_blocks) for layer_blocks in blocks]
    for group in tie_groups(layers):
        terms = [tuple(blocks[i][0].factors) for i in group]
        b, c = nearest_kronecker(terms)
        first = blocks[group[0]][0]
        blocks[group[0]][0] = Kronecker(
            b.to(first.dtype), c.to(first.dtype), decomposition_dtype=first.decomposition_dtype
        )
        for i in group[1:]:
            blocks[i][0] = None
    return blocks
