"""Checking and restoring the ``"curvature"`` entry of a :class:`~curvops.optim.KFACOptimizer`
state dict: every key and tensor shape is checked before anything changes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import StateDictError
from ..linalg import CurvatureOperator, from_state_dict
from ..nn.approximations import Basis, KroneckerApproximation
from ..nn.layers import KroneckerLayer
from ..nn.statistics import LayerStatistics

STATE = "The KFACOptimizer state dict's"
CURVATURE_STATE = ("curvature", "steps", "statistics", "bases", "scales", "preconditioner")


def running_shapes(layer: KroneckerLayer, approximation: KroneckerApproximation) -> dict[str, Any]:
    """The shapes of a layer's running state: ``"statistics"`` by name (those of
    :class:`~curvops.nn.statistics.LayerStatistics`), and EKFAC's ``"bases"`` ``(Q_out, Q_in,
    Q_bias)`` and ``"scales"`` ``(s_weight, s_bias)`` (``None`` where the layer has no such entry;
    a layer with an exact block has only ``"exact_block"``), each with a leading group axis for a
    grouped layer."""
    if layer.rule.exact:
        return {
            "statistics": {"exact_block": layer.rule.block_shape(layer)},
            "bases": (None, None, None),
            "scales": (None, None),
        }
    n_out, n_in = layer.sizes
    groups = () if layer.groups == 1 else (layer.groups,)

    def grouped(shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return None if shape is None else (*groups, *shape)

    input_shape, output_shape = layer.input_shape, (n_out, n_out)
    statistics = {"input_factor": input_shape, "output_factor": output_shape}
    if approximation.trace_restricted:
        statistics.update(trace=(), trace_input_factor=input_shape, trace_output_factor=output_shape)
        if layer.separate_bias:
            statistics["bias_trace"] = ()
    weight_scale = None if layer.weight is None else layer.kronecker_order((n_out,), (n_in,))
    bases = (output_shape, None if layer.rule.diagonal_input else input_shape, output_shape)
    scales = (
        None if weight_scale is None else weight_scale[0] + weight_scale[1],
        (n_out,) if layer.separate_bias else None,
    )
    return {
        "statistics": {name: grouped(shape) for name, shape in statistics.items()},
        "bases": tuple(grouped(shape) for shape in bases),
        "scales": tuple(grouped(shape) for shape in scales),
    }


def _describe(value: Any) -> str:
    return f"a tensor of shape {list(value.shape)}" if isinstance(value, Tensor) else repr(value)


def _check_tensor(key: str, value: Any, shape: tuple[int, ...] | None) -> None:
    """Raise :class:`StateDictError` naming ``['curvature']`` ``key`` unless ``value`` is a tensor of
    ``shape`` (or ``None`` where the shape is ``None``)."""
    if shape is None and value is None:
        return
    if shape is None or not isinstance(value, Tensor) or tuple(value.shape) != tuple(shape):
        wanted = "None" if shape is None else f"a tensor of shape {list(shape)}"
        raise StateDictError(
            f"{STATE} ['curvature']{key} is {_describe(value)}; this optimizer needs {wanted}."
        )


def check_running_state(
    extra: Any, approximation: KroneckerApproximation, layers: list[KroneckerLayer]
) -> dict[str, Any]:
    """Raise unless ``extra`` is a ``"curvature"`` entry for this approximation and these layers, with
    every statistic, basis and eigenvalue tensor of the shape the layers give it."""
    if not isinstance(extra, dict):
        raise StateDictError("Not a KFACOptimizer state dict: it has no 'curvature' entry.")
    missing = [key for key in CURVATURE_STATE if key not in extra]
    if missing:
        raise StateDictError(f"{STATE} 'curvature' entry has no {missing} keys.")
    for kind in ("statistics", "bases", "scales"):
        if not isinstance(extra[kind], dict):
            raise StateDictError(f"{STATE} ['curvature'][{kind!r}] must be a dict, got {extra[kind]!r}.")
    if extra["curvature"] != approximation.name:
        raise StateDictError(
            f"The state dict holds {str(extra.get('curvature')).upper()} statistics; this optimizer "
            f"uses {approximation.label}."
        )
    names = [layer.name for layer in layers]
    if set(extra["statistics"]) != set(names):
        raise StateDictError(
            f"The state dict's layers {sorted(extra['statistics'])} differ from the optimizer's "
            f"{sorted(names)}."
        )
    steps = extra["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise StateDictError(f"{STATE} ['curvature']['steps'] must be an integer >= 0, got {steps!r}.")
    for kind in ("bases", "scales"):
        if set(extra[kind]) - set(names):
            raise StateDictError(
                f"{STATE} ['curvature'][{kind!r}] names layers {sorted(extra[kind])}; the optimizer "
                f"has {names}."
            )
    for layer in layers:
        _check_layer_state(layer, extra, approximation)
    return extra


def _check_layer_state(
    layer: KroneckerLayer, extra: dict[str, Any], approximation: KroneckerApproximation
) -> None:
    expected = running_shapes(layer, approximation)
    statistics, key = extra["statistics"][layer.name], f"['statistics'][{layer.name!r}]"
    if not isinstance(statistics, dict):
        raise StateDictError(f"{STATE} ['curvature']{key} must be a dict of tensors, got {statistics!r}.")
    if set(statistics) not in (set(), set(expected["statistics"])):
        raise StateDictError(
            f"{STATE} ['curvature']{key} holds {sorted(statistics)}; {approximation.label} needs "
            f"{sorted(expected['statistics'])}."
        )
    for name, value in statistics.items():
        _check_tensor(f"{key}[{name!r}]", value, expected["statistics"][name])
    for kind in ("bases", "scales"):
        if layer.name in extra[kind]:
            stored, shapes, key = extra[kind][layer.name], expected[kind], f"[{kind!r}][{layer.name!r}]"
            if not isinstance(stored, (list, tuple)) or len(stored) != len(shapes):
                raise StateDictError(
                    f"{STATE} ['curvature']{key} must be a list of {len(shapes)} entries, got {stored!r}."
                )
            for i, (value, shape) in enumerate(zip(stored, shapes, strict=True)):
                _check_tensor(f"{key}[{i}]", value, shape)


def check_momentum(state: dict[str, Any], params: list) -> None:
    """Raise unless every stored momentum buffer has its parameter's shape."""
    for index, entry in state.get("state", {}).items():
        buffer = entry.get("momentum_buffer") if isinstance(entry, dict) else None
        if buffer is not None and isinstance(index, int) and 0 <= index < len(params):
            key = f"['state'][{index}]['momentum_buffer']"
            if not isinstance(buffer, Tensor) or buffer.shape != params[index].shape:
                raise StateDictError(
                    f"{STATE} {key} is {_describe(buffer)}; parameter {index} "
                    f"has shape {list(params[index].shape)}."
                )


def load_curvature_state(
    extra: dict[str, Any], layers: list[KroneckerLayer], size: int, device: torch.device, dtype: torch.dtype
) -> tuple[list[LayerStatistics], dict[str, Basis], dict[str, list[Tensor | None]], CurvatureOperator | None]:
    """The running statistics, EKFAC's bases and eigenvalues and the preconditioner of a checked
    entry, on ``device`` in ``dtype``; raises if the preconditioner does not fit ``size``."""
    preconditioner = None
    if extra["preconditioner"] is not None:
        preconditioner = from_state_dict(extra["preconditioner"], device=device)
        if preconditioner.shape != (size, size):
            raise StateDictError(
                f"The stored preconditioner is {tuple(preconditioner.shape)}; the optimizer's "
                f"parameters need {(size, size)}."
            )

    def placed(value: Tensor | None) -> Tensor | None:
        return None if value is None else value.to(device=device, dtype=dtype)

    statistics = [
        LayerStatistics(
            layer, input_count=1.0, **{n: placed(v) for n, v in extra["statistics"][layer.name].items()}
        )
        for layer in layers
    ]
    bases = {name: tuple(placed(q) for q in basis) for name, basis in extra["bases"].items()}
    scales = {name: [placed(s) for s in values] for name, values in extra["scales"].items()}
    return statistics, bases, scales, preconditioner
