"""``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` with any ``groups`` (depthwise included) and
every padding mode: the unfolded patches are the inputs."""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from .rule import DenseInputRule


def _paddings(module: nn.Module) -> list[tuple[int, int]]:
    """``(before, after)`` per spatial axis, as the module's forward pads: ``padding="same"``
    puts an odd total's extra element after (right, bottom, back)."""
    if isinstance(module.padding, str):
        totals = [
            0 if module.padding == "valid" else d * (k - 1)
            for d, k in zip(module.dilation, module.kernel_size, strict=True)
        ]
        return [(total // 2, total - total // 2) for total in totals]
    return [(p, p) for p in module.padding]


def _pad(module: nn.Module, inputs: Tensor, paddings: list[tuple[int, int]]) -> Tensor:
    """The input padded as the module's forward pads it (``padding_mode``; ``F.pad`` takes the
    last axis first)."""
    if not any(before or after for before, after in paddings):
        return inputs
    widths = [width for pair in reversed(paddings) for width in pair]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(inputs, widths, mode=mode)


def im2col(
    inputs: Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> Tensor:
    """The patches of an (already padded) batch ``[N, C, L_1, ..., L_d]`` for any ``d``:
    ``[N, S, C · k_1 ··· k_d]``, positions row-major, entries in the order of a weight
    ``[C_out, C, k_1, ..., k_d]`` flattened, so ``y_ns = W.flatten(1) @ a_ns``.

    One copy of the input's strided windows into a contiguous ``[N, C · k, S]`` (of which the
    result is the transposed view): the layout whose per-datum Gram matrices batch well, and a
    faster copy than ``F.unfold``'s (2-3x on 3x3 kernels on a CPU).

    Example:
        >>> x = torch.randn(2, 3, 6, 7)
        >>> patches = im2col(x, (3, 2), (2, 1), (1, 2))
        >>> torch.allclose(patches, F.unfold(x, (3, 2), dilation=(1, 2), stride=(2, 1)).transpose(1, 2))
        True
    """
    data, channels, dims = inputs.shape[0], inputs.shape[1], len(kernel_size)
    windows = inputs
    for axis, (k, s, d) in enumerate(zip(kernel_size, stride, dilation, strict=True)):
        windows = windows.unfold(2 + axis, d * (k - 1) + 1, s)[..., ::d]  # a strided view
    kernel_first = windows.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))
    return kernel_first.reshape(data, channels * math.prod(kernel_size), -1).transpose(1, 2)


class ConvRule(DenseInputRule):
    """A convolution (1-, 2- or 3-D; zeros, reflect, replicate or circular padding; ``padding``
    as ints, ``"valid"`` or ``"same"``) as a layer shared over its output locations: ``a_ns``
    is the patch (``n_in = C_in · kernel size``) of the padded input at location ``s``, the
    weight ``[C_out, n_in]``.

    With ``groups = g > 1`` (depthwise: ``g = C_in``) group ``j``'s weight rows
    ``j C_out/g .. (j+1) C_out/g`` see only the patches of its input channels
    ``j C_in/g .. (j+1) C_in/g``: the features are ``[N, S, g, C_in/g · kernel size]``, the
    output gradients ``[K, N, S, g, C_out/g]``, and the block is ``G_j ⊗ A_j`` per group.

    Example:
        >>> conv = torch.nn.Conv2d(2, 3, kernel_size=2)
        >>> ConvRule().features(conv, torch.randn(4, 2, 5, 5)).shape  # 16 locations, 2·2·2 inputs
        torch.Size([4, 16, 8])
        >>> conv = torch.nn.Conv3d(2, 3, kernel_size=2, padding="same", padding_mode="circular")
        >>> ConvRule().features(conv, torch.randn(4, 2, 3, 3, 3)).shape  # 27 locations, 2·2·2·2 inputs
        torch.Size([4, 27, 16])
        >>> depthwise = torch.nn.Conv2d(4, 8, kernel_size=3, groups=4)  # 4 groups of 1 channel
        >>> ConvRule().features(depthwise, torch.randn(2, 4, 5, 5)).shape, ConvRule().sizes(depthwise)
        (torch.Size([2, 9, 4, 9]), (2, 9))
    """

    feature_chunk = 2**20  # patches of ~1M numbers at a time: 1.4-1.7x faster than a batch's at once

    def groups(self, module: nn.Module) -> int:
        return module.groups

    def features(self, module: nn.Module, inputs: Tensor) -> Tensor:
        patches = self._patches(module, inputs)
        return patches if module.groups == 1 else patches.unflatten(-1, (module.groups, -1))

    def _patches(self, module: nn.Module, inputs: Tensor) -> Tensor:
        """``[N, S, C_in · kernel size]``, channels first (so each group's are a range)."""
        kernel_size, stride, dilation = (
            tuple(module.kernel_size),
            tuple(module.stride),
            tuple(module.dilation),
        )
        return im2col(_pad(module, inputs, _paddings(module)), kernel_size, stride, dilation)

    def output_gradients(self, module: nn.Module, gradients: Tensor) -> Tensor:
        """``[K, N, C_out, *spatial]`` (any number of spatial axes) as ``[K, N, S, C_out]``, or
        ``[K, N, S, g, C_out/g]`` for ``g > 1`` groups."""
        positions_last = gradients.flatten(3).transpose(2, 3)
        if module.groups > 1:
            return positions_last.unflatten(-1, (module.groups, -1))
        return super().output_gradients(module, positions_last)
