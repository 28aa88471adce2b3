"""``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` with any ``groups`` (depthwise included) and
every padding mode: the unfolded patches are the inputs."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..statistics import LayerStatistics
from .padding import kept_positions, masked
from .patches import autocorrelation_applies, im2col, patch_moment
from .rule import DenseInputRule, KroneckerLayer, second_moment


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


def _positions(module: nn.Module, inputs: Tensor, paddings: list[tuple[int, int]]) -> int:
    """The number of output positions of one call on ``inputs`` ``[N, C, *spatial]``."""
    return math.prod(
        (length + before + after - d * (k - 1) - 1) // s + 1
        for length, (before, after), k, d, s in zip(
            inputs.shape[2:], paddings, module.kernel_size, module.dilation, module.stride, strict=True
        )
    )


def _pad(module: nn.Module, inputs: Tensor, paddings: list[tuple[int, int]]) -> Tensor:
    """The input padded as the module's forward pads it (``padding_mode``; ``F.pad`` takes the
    last axis first)."""
    if not any(before or after for before, after in paddings):
        return inputs
    widths = [width for pair in reversed(paddings) for width in pair]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(inputs, widths, mode=mode)


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
    autocorrelation: ClassVar[bool | None] = None
    """Whether a stride-1, zero-padded convolution's ``expand`` input factor comes from its input's
    autocorrelations (:func:`~curvops.nn.layers.patches.patch_moment`) rather than its patches:
    ``None`` where that is cheaper (large images against the kernel), ``True`` wherever it applies,
    ``False`` never. The two give the same sums to rounding."""

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

    def statistics(
        self,
        layer: KroneckerLayer,
        inputs: Tensor | list[Tensor],
        gradients: Tensor | None,
        weight: float,
        kfac_approx: str,
        trace_restricted: bool,
        dtype: torch.dtype,
        valid: Tensor | None = None,
        total: LayerStatistics | None = None,
    ) -> LayerStatistics:
        """:meth:`DenseInputRule.statistics`; a stride-1, zero-padded convolution's ``expand``
        input factor comes from its input's autocorrelations where that is cheaper
        (:func:`~curvops.nn.layers.patches.patch_moment`), with no patches unfolded."""
        module, calls = layer.module, inputs if isinstance(inputs, list) else [inputs]
        data, paddings = calls[0].shape[0], _paddings(module)
        positions = sum(_positions(module, x, paddings) for x in calls)
        kept = kept_positions(valid, data, positions)
        if kfac_approx != "expand" or trace_restricted or not self._autocorrelated(module, calls, kept):
            return super().statistics(
                layer, inputs, gradients, weight, kfac_approx, trace_restricted, dtype, valid, total
            )
        kept_data = None if kept is None else kept[:, 0].to(dtype)  # whole data are kept or not
        ones = None
        if layer.joint:
            ones = calls[0].new_ones(data, dtype=dtype) if kept_data is None else kept_data
        moment = None
        for x in calls:
            x = x.to(dtype) if kept_data is None else x.to(dtype) * kept_data.reshape(-1, *[1] * (x.ndim - 1))
            part = patch_moment(x, module.kernel_size, module.dilation, paddings, module.groups, ones)
            moment = part if moment is None else moment.add_(part)
        if total is None:
            terms = {"input_factor": moment.mul_(weight)}
        else:
            terms = {"input_factor": total.input_factor.add_(moment, alpha=weight)}
        if gradients is not None:
            out = None if total is None else total.output_factor
            grouped = module.groups > 1
            terms["output_factor"] = second_moment(masked(gradients, kept, 1 + grouped), grouped, out)
        count = weight * (data * positions if kept is None else float(kept.sum()))
        batch = LayerStatistics(layer, input_count=count, **terms)
        return batch if total is None else total.accumulate(batch)

    def _autocorrelated(self, module: nn.Module, calls: list[Tensor], kept: Tensor | None) -> bool:
        """Whether the input factor comes from autocorrelations (:attr:`autocorrelation`): stride 1,
        zero padding, a mask (``kept``) of whole data only, and cheaper unless forced."""
        if (
            self.autocorrelation is False
            or module.padding_mode != "zeros"
            or any(s != 1 for s in module.stride)
            or (kept is not None and not bool((kept == kept[:, :1]).all()))
        ):
            return False
        window = (module.kernel_size, module.dilation, _paddings(module))
        return bool(self.autocorrelation) or all(autocorrelation_applies(x.shape, *window) for x in calls)

    def output_gradients(self, module: nn.Module, gradients: Tensor) -> Tensor:
        """``[K, N, C_out, *spatial]`` (any number of spatial axes) as ``[K, N, S, C_out]``, or
        ``[K, N, S, g, C_out/g]`` for ``g > 1`` groups."""
        positions_last = gradients.flatten(3).transpose(2, 3)
        if module.groups > 1:
            return positions_last.unflatten(-1, (module.groups, -1))
        return super().output_gradients(module, positions_last)
