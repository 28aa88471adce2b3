"""``nn.Linear`` (any leading axes: the middle ones are positions, shared weights)."""

from __future__ import annotations

from torch import Tensor, nn

from .rule import DenseInputRule


class LinearRule(DenseInputRule):
    """``y = x W^T + b`` on inputs ``[N, *, n_in]``: every middle index is a position.

    Example:
        >>> LinearRule().features(torch.nn.Linear(3, 2), torch.randn(4, 5, 3)).shape
        torch.Size([4, 5, 3])
    """

    def features(self, module: nn.Module, inputs: Tensor) -> Tensor:
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
