"""``nn.Conv1d`` and ``nn.Conv2d`` with ``groups=1``: unfolded patches are the inputs."""

from __future__ import annotations

from torch import Tensor, nn

from .rule import DenseInputRule


def _padding(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module.padding, str):
        return tuple(
            0 if module.padding == "valid" else d * (k - 1) // 2
            for d, k in zip(module.dilation, module.kernel_size, strict=True)
        )
    return tuple(module.padding)


class ConvRule(DenseInputRule):
    """A convolution as a layer shared over its output locations: ``a_ns`` is the unfolded
    patch (``n_in = C_in · kernel size``) at location ``s``, the weight ``[C_out, n_in]``.

    Example:
        >>> conv = torch.nn.Conv2d(2, 3, kernel_size=2)
        >>> ConvRule().features(conv, torch.randn(4, 2, 5, 5)).shape  # 16 locations, 2·2·2 inputs
        torch.Size([4, 16, 8])
    """

    def check(self, name: str, module: nn.Module, kfac_approx: str) -> None:
        if module.groups != 1:
            raise ValueError(
                f"KFAC supports convolutions with groups=1; {name!r} has groups={module.groups}."
            )
        if module.padding_mode != "zeros":
            raise ValueError(
                f"KFAC supports zero padding; {name!r} has padding_mode={module.padding_mode!r}."
            )
        if (
            isinstance(module.padding, str)
            and module.padding == "same"
            and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size, strict=True))
        ):
            raise ValueError(f"KFAC cannot unfold {name!r}: padding='same' with asymmetric padding.")

    def features(self, module: nn.Module, inputs: Tensor) -> Tensor:
        two_d = isinstance(module, nn.Conv2d)
        images = inputs if two_d else inputs.unsqueeze(2)  # Conv1d as a 2-D convolution of height 1
        lead = () if two_d else (1,)
        patches = nn.functional.unfold(
            images,
            lead + tuple(module.kernel_size),
            dilation=lead + tuple(module.dilation),
            padding=(() if two_d else (0,)) + _padding(module),
            stride=lead + tuple(module.stride),
        )
        return patches.transpose(1, 2)

    def output_gradients(self, module: nn.Module, gradients: Tensor) -> Tensor:
        return super().output_gradients(module, gradients.flatten(3).transpose(2, 3))
