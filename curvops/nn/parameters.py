"""The parameters an operator is taken with respect to: choosing them, and where they sit in a model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn


def parameter_slots(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(path, parameter)`` once per module attribute holding a parameter, whatever the number of
    paths a shared module is reached by.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> [path for path, _ in parameter_slots(torch.nn.Sequential(lin, torch.nn.Tanh(), lin))]
        ['0.weight', '0.bias']
    """
    for prefix, module in model.named_modules():
        for attribute, p in module._parameters.items():
            if p is not None:
                yield (f"{prefix}.{attribute}" if prefix else attribute), p


def as_parameter_list(params: Any) -> list:
    """``params`` as a list: a sequence or iterable of parameters, or the values of a dict
    (``dict(model.named_parameters())``), in order. A single tensor is refused.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> [p.shape for p in as_parameter_list(dict(model.named_parameters()))]
        [torch.Size([1, 2]), torch.Size([1])]
    """
    if isinstance(params, Tensor):
        raise TypeError("params must be a list of parameters (e.g. [model.fc.weight]), not one tensor.")
    if isinstance(params, Mapping):
        return list(params.values())
    try:
        return list(params)
    except TypeError:
        raise TypeError(
            f"params must be a list of the model's parameters or a dict of them, got {type(params).__name__}."
        ) from None


def chosen_parameters(
    model: nn.Module, params: Sequence[nn.Parameter] | Mapping[str, nn.Parameter] | None
) -> tuple[list[nn.Parameter], list[str]]:
    """The parameters ``θ`` an operator is taken with respect to, and their names in ``model``.

    ``params``: parameters of ``model``, trainable or frozen, as a list or a dict of them (its
    values, in order); ``None`` for the model's trainable ones, in order. Each at most once,
    all of one dtype and device.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> chosen_parameters(model, [model.bias])[1]
        ['bias']
        >>> chosen_parameters(model, [torch.nn.Parameter(torch.zeros(3))])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: params[0] (shape [3]) is not a parameter of the model; ...
    """
    named = list(model.named_parameters())
    params = [p for _, p in named if p.requires_grad] if params is None else as_parameter_list(params)
    names = {id(p): name for name, p in named}
    for i, p in enumerate(params):
        if id(p) not in names:
            raise ValueError(
                f"params[{i}] (shape {list(getattr(p, 'shape', []))}) is not a parameter of the model; "
                "pass parameters from model.parameters()."
            )
    if len({id(p) for p in params}) != len(params):
        raise ValueError("params lists a parameter twice.")
    if not params:
        raise ValueError("No parameters: the model has no trainable parameters and none were passed.")
    if len({(p.dtype, p.device) for p in params}) > 1:
        raise ValueError("All parameters must share one dtype and device.")
    return params, [names[id(p)] for p in params]
