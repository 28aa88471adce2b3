"""Rebuilding operators from their state dicts, and checking a state dict against an operator."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import StateDictError
from .base import _REGISTRY, CurvatureOperator, converted_from

_KEYS = ("type", "shape", "dtype", "tensors", "children", "config")


def _parse_dtype(name: Any, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise StateDictError(f"{where}: unknown dtype {name!r}.")
    return dtype


def _check_keys(state: Any, where: str) -> None:
    if not isinstance(state, dict) or any(key not in state for key in _KEYS):
        raise StateDictError(
            f"{where}: not a curvops operator state dict (expected a dict with keys {_KEYS})."
        )


def from_state_dict(
    state: dict[str, Any],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> CurvatureOperator:
    """Rebuild an operator from :meth:`CurvatureOperator.state_dict`.

    Args:
        state: a state dict, e.g. from ``torch.load(path, weights_only=True)``.
        device: where the operator's tensors go (default: where they are stored).
        dtype: cast floating tensors to this dtype (default: the stored dtype).

    Example:
        >>> op = curvops.Kronecker(torch.eye(2), 2 * torch.eye(3))
        >>> curvops.from_state_dict(op.state_dict()).trace().item()
        12.0
    """
    _check_keys(state, "state dict")
    cls = _REGISTRY.get(state["type"])
    if cls is None:
        raise StateDictError(f"Unknown operator type {state['type']!r} in state dict.")
    stored_dtype = _parse_dtype(state["dtype"], state["type"])
    target_dtype = dtype or stored_dtype
    tensors = {}
    for name, tensor in state["tensors"].items():
        if not isinstance(tensor, torch.Tensor):
            raise StateDictError(f"{state['type']}.tensors[{name!r}] is not a tensor.")
        tensor = tensor.to(device) if device is not None else tensor
        tensors[name] = tensor.to(target_dtype) if tensor.is_floating_point() else tensor
    children = [from_state_dict(child, device, dtype) for child in state["children"]]
    if device is None:
        device = next((t.device for t in tensors.values()), None)
        device = device or (children[0].device if children else torch.device("cpu"))
    with converted_from(stored_dtype):  # the tensors keep the stored dtype's rounding
        op = cls._from_state(tensors, children, dict(state["config"]), target_dtype, torch.device(device))
    if list(op.shape) != list(state["shape"]):
        raise StateDictError(
            f"{state['type']}: state dict says shape {state['shape']}, its tensors give {list(op.shape)}."
        )
    return op


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def check_state_matches(expected: dict[str, Any], given: Any, where: str) -> None:
    """Raise :class:`StateDictError` unless ``given`` has the structure of ``expected``.

    Type, dtype, tensor names and shapes, config keys, number of children and shape must
    agree, recursively; tensor values and config values may differ. Sub-operators are
    checked before the overall shape, so the error names the innermost mismatch (a layer's
    block rather than the whole operator).
    """
    _check_keys(given, where)
    for key in ("type", "dtype"):
        _check_equal(given, expected, key, where)
    if set(given["tensors"]) != set(expected["tensors"]):
        raise StateDictError(
            f"{where}: state dict has tensors {sorted(given['tensors'])}, "
            f"expected {sorted(expected['tensors'])}."
        )
    for name, tensor in expected["tensors"].items():
        other = given["tensors"][name]
        if not isinstance(other, torch.Tensor) or other.shape != tensor.shape:
            shape = list(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            raise StateDictError(
                f"{where}.tensors[{name!r}]: state dict has shape {shape}, "
                f"the operator has {list(tensor.shape)}."
            )
    if set(given["config"]) != set(expected["config"]):
        raise StateDictError(
            f"{where}: state dict has settings {sorted(given['config'])}, "
            f"expected {sorted(expected['config'])}."
        )
    if len(given["children"]) != len(expected["children"]):
        raise StateDictError(
            f"{where}: state dict has {len(given['children'])} sub-operators, "
            f"the operator has {len(expected['children'])}."
        )
    labels = expected["config"].get("labels") or range(len(expected["children"]))
    pairs = zip(labels, expected["children"], given["children"], strict=True)
    for label, child_expected, child_given in pairs:
        check_state_matches(child_expected, child_given, f"{where}.children[{label!r}]")
    _check_equal(given, expected, "shape", where)


def _check_equal(given: dict[str, Any], expected: dict[str, Any], key: str, where: str) -> None:
    if _plain(given[key]) != _plain(expected[key]):
        raise StateDictError(
            f"{where}: state dict has {key} {given[key]!r} but the operator has {expected[key]!r}."
        )
