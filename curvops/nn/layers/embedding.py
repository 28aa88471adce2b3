"""``nn.Embedding``: one-hot inputs, so ``A`` (and TKFAC's ``Φ``) are diagonal."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..statistics import LayerStatistics
from .padding import kept_positions, masked
from .rule import KroneckerLayer, LayerRule, second_moment


class EmbeddingRule(LayerRule):
    """``y_ns = W[index_ns]``: the input of position ``s`` is the one-hot ``e_index``
    (the zero vector at ``padding_idx``), so ``A = diag(index counts) / (N S)``; the weight is
    ``[num_embeddings, dim]``, stored transposed, and its block is ``A ⊗ G``.

    Example:
        >>> EmbeddingRule().sizes(torch.nn.Embedding(10, 4))  # (n_out, n_in)
        (4, 10)
    """

    transposed = True
    diagonal_input = True

    def check(self, name: str, module: nn.Module, kfac_approx: str) -> None:
        if module.max_norm is not None:
            raise ValueError(
                f"KFAC does not support {name!r}: max_norm renormalises weights in the forward pass."
            )
        if kfac_approx == "reduce":
            raise ValueError(
                f"{name!r} is an nn.Embedding, whose KFAC-reduce input factor is not diagonal; "
                "use kfac_approx='expand'."
            )

    def joined_input(self, name: str, module: nn.Module, inputs: list[Tensor]) -> Tensor:
        """Every call's indices ``[N, S_call]`` side by side: ``[N, Σ S_call]``."""
        if len(inputs) == 1:
            return inputs[0]
        return torch.cat([indices.reshape(indices.shape[0], -1) for indices in inputs], dim=1)

    def statistics(
        self,
        layer: KroneckerLayer,
        inputs: Tensor,
        gradients: Tensor | None,
        weight: float,
        kfac_approx: str,
        trace_restricted: bool,
        dtype: torch.dtype,
        valid: Tensor | None = None,
        total: LayerStatistics | None = None,
    ) -> LayerStatistics:
        module = layer.module
        indices = inputs.flatten()
        kept = self._kept(inputs, valid)
        gradients = masked(gradients, kept)
        present = self._present(module, indices, dtype)
        present = present if kept is None else present * kept.flatten()
        zeros = torch.zeros(module.num_embeddings, dtype=dtype, device=indices.device)
        terms = {"input_factor": weight * zeros.index_add(0, indices, present)}
        count = weight * (indices.numel() if kept is None else float(kept.sum()))
        if gradients is not None:
            terms["output_factor"] = second_moment(gradients)
            if trace_restricted:
                terms.update(self._trace_terms(inputs, gradients, present, zeros))
        batch = LayerStatistics(layer, input_count=count, **terms)
        return batch if total is None else total.accumulate(batch)

    @staticmethod
    def _kept(inputs: Tensor, valid: Tensor | None) -> Tensor | None:
        """:func:`~curvops.nn.layers.padding.kept_positions` of the indices ``[N, S]`` (any trailing axes)."""
        data = inputs.shape[0] if inputs.ndim else 1
        return kept_positions(valid, data, inputs.numel() // max(data, 1))

    @staticmethod
    def _present(module: nn.Module, indices: Tensor, dtype: torch.dtype) -> Tensor:
        present = torch.ones_like(indices, dtype=dtype)
        return present if module.padding_idx is None else present * (indices != module.padding_idx)

    @staticmethod
    def _trace_terms(inputs: Tensor, gradients: Tensor, present: Tensor, zeros: Tensor) -> dict[str, Tensor]:
        """``δ``'s sum ``Σ_{k,n} Σ_{s,t} (g_kns · g_knt) [index_ns = index_nt]``, ``Φ``'s and ``Ψ``'s."""
        positions = inputs.reshape(gradients.shape[1], -1)
        kept = present.reshape(positions.shape)
        same_row = (positions.unsqueeze(2) == positions.unsqueeze(1)) * kept.unsqueeze(2) * kept.unsqueeze(1)
        trace = (torch.einsum("knso,knto->nst", gradients, gradients) * same_row.to(gradients.dtype)).sum()
        output_norms = gradients.square().sum(-1).reshape(gradients.shape[0], -1)  # [K, N·S]
        weighted_outputs = gradients * present.reshape(gradients.shape[1:-1]).unsqueeze(-1)
        return {
            "trace": trace,
            "trace_input_factor": zeros.index_add(0, inputs.flatten(), output_norms.sum(0) * present),
            "trace_output_factor": second_moment(weighted_outputs),
        }

    def correction(
        self,
        layer: KroneckerLayer,
        inputs: Tensor,
        rotated: Tensor,
        q_in: Tensor | None,
        correction: str,
        valid: Tensor | None = None,
    ) -> Tensor:
        """Rows of each datum's gradient are sums over its positions holding the same index."""
        module = layer.module
        rotated = masked(rotated, self._kept(inputs, valid))
        indices = inputs.reshape(rotated.shape[1], -1)
        columns, data, positions, outputs = rotated.shape
        num = module.num_embeddings
        if module.padding_idx is not None:
            rotated = rotated * (indices != module.padding_idx).unsqueeze(-1).to(rotated.dtype)
        keys = (torch.arange(data, device=indices.device).unsqueeze(1) * num + indices).flatten()
        unique, inverse = torch.unique(keys, return_inverse=True)
        rows = rotated.new_zeros(columns, unique.numel(), outputs)
        rows.index_add_(1, inverse, rotated.reshape(columns, data * positions, outputs))
        result = rotated.new_zeros(num, outputs)
        return result.index_add_(0, unique % num, rows.square().sum(dim=0))
