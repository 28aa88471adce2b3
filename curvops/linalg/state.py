"""Rebuilding operators from their state dicts, and checking a state dict against an operator.

The registry of operator types lives here: every subclass of
:class:`~curvops.CurvatureOperator` registers itself under its state dict type name
(:func:`register_operator`), and :func:`operator_type` looks it up, for rebuilding and for
the base class's generic methods (see :mod:`curvops.linalg.base`).

Every operator declares what its state holds (:meth:`CurvatureOperator._state_schema`): the
tensors by name with their numbers of axes and kind of entries, the number of sub-operators
and the settings with their types. One validation, :func:`check_state`, holds each state
dict (and each nested one) to its declaration before anything is built, so a tampered or
truncated file raises :class:`~curvops.errors.StateDictError` naming the operator, the path
of the nested one (``"BlockDiagonal.children[1].tensors['factor0']"``) and the key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from numbers import Real
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import StateDictError
from .precision import converted_from

if TYPE_CHECKING:
    from .base import CurvatureOperator

_KEYS = ("type", "shape", "dtype", "tensors", "children", "config")
_REGISTRY: dict[str, type[CurvatureOperator]] = {}


def register_operator(cls: type[CurvatureOperator]) -> None:
    """Make ``cls`` known by its state dict type name ``cls._state_type`` (every subclass of
    :class:`~curvops.CurvatureOperator` is registered as it is defined)."""
    _REGISTRY[cls._state_type] = cls


def operator_type(name: str) -> type[CurvatureOperator]:
    """The operator class registered as ``name`` (curvops' own by class name: ``"Dense"``).

    Example:
        >>> operator_type("Dense") is curvops.Dense
        True
    """
    return _REGISTRY[name]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor in an operator's state: its allowed numbers of axes and kind of entries.

    ``ndims=None`` allows any number of axes ``>= 1``; ``square`` asks a 2-D tensor to be
    ``[n, n]``; ``integer`` asks for integer entries (indices) instead of the state's
    floating-point dtype.
    """

    ndims: tuple[int, ...] | None
    square: bool = False
    integer: bool = False

    def problem(self, tensor: Tensor, dtype: torch.dtype) -> str | None:
        """What is wrong with ``tensor`` for a state of ``dtype``, or ``None``."""
        shape = list(tensor.shape)
        if self.ndims is not None and tensor.ndim not in self.ndims:
            axes = " or ".join(str(n) for n in self.ndims)
            return f"needs {axes} axes, got shape {shape}"
        if self.ndims is None and tensor.ndim == 0:
            return "needs at least 1 axis, got a 0-dim tensor"
        if self.square and tensor.ndim == 2 and shape[0] != shape[1]:
            return f"needs a square [n, n] matrix, got shape {shape}"
        if self.integer:
            integer = not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)
            return None if integer else f"needs integer entries, got dtype {tensor.dtype}"
        if tensor.dtype != dtype:
            return f"has dtype {tensor.dtype}, the state dict says {dtype}"
        return None


@dataclass(frozen=True)
class Setting:
    """A setting (config entry) of an operator's state.

    ``accepts`` says whether a value is valid, ``expected`` says in words what it must be;
    an ``optional`` setting may be absent, and one that ``identifies`` the operator (a
    block's labels: the layers it belongs to) must equal the operator's own on loading.
    """

    accepts: Callable[[Any], bool]
    expected: str
    optional: bool = False
    identifies: bool = False


@dataclass(frozen=True)
class StateSchema:
    """What an operator's state holds: required and optional tensors, the number of
    sub-operators (``None``: one or more) and the settings."""

    tensors: Mapping[str, TensorSpec] = field(default_factory=dict)
    optional_tensors: Mapping[str, TensorSpec] = field(default_factory=dict)
    children: int | None = 0
    config: Mapping[str, Setting] = field(default_factory=dict)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


REAL = Setting(_is_real, "a finite real number")
NONNEGATIVE_REAL = Setting(lambda v: _is_real(v) and v >= 0, "a finite real number >= 0")
POSITIVE_REAL = Setting(lambda v: _is_real(v) and v > 0, "a finite real number > 0")
NONNEGATIVE_INT = Setting(lambda v: _is_int(v) and v >= 0, "an integer >= 0")
POSITIVE_INT = Setting(lambda v: _is_int(v) and v >= 1, "an integer >= 1")
SIGN = Setting(lambda v: _is_real(v) and v in (1, -1), "+1 or -1")
LABELS = Setting(
    lambda v: isinstance(v, (list, tuple)) and all(isinstance(label, str) for label in v),
    "a list of strings",
    optional=True,
    identifies=True,
)


def _fail(where: str, problem: str) -> StateDictError:
    return StateDictError(f"{where}: {problem}.")


def _parse_dtype(name: Any, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise _fail(f"{where}.dtype", f"unknown dtype {name!r}")
    if not dtype.is_floating_point:
        raise _fail(f"{where}.dtype", f"operators are floating point, got {name!r}")
    return dtype


def _differences(missing: list, extra: list) -> str:
    """``"lacks [...] and has unexpected [...]"``, leaving out an empty part."""
    parts = [f"lacks {missing}"] * bool(missing) + [f"has unexpected {extra}"] * bool(extra)
    return " and ".join(parts)


def _check_keys(state: Any, where: str) -> None:
    complaint = f"not a curvops operator state dict (a dict with keys {list(_KEYS)})"
    if not isinstance(state, dict):
        raise _fail(where, f"{complaint}, got {type(state).__name__}")
    missing = [key for key in _KEYS if key not in state]
    extra = [key for key in state if key not in _KEYS]
    if missing or extra:
        raise _fail(where, f"{complaint}: it {_differences(missing, extra)}")


def _check_container(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> None:
    if not isinstance(value, kind):
        raise _fail(where, f"must be {what}, got {type(value).__name__}")
    if isinstance(value, dict) and not all(isinstance(key, str) for key in value):
        raise _fail(where, f"must be {what} with string keys, got keys {list(value)}")


def _check_shape(shape: Any, where: str) -> None:
    pair = isinstance(shape, (list, tuple)) and len(shape) == 2 and all(_is_int(n) and n >= 0 for n in shape)
    if not pair or shape[0] != shape[1]:
        raise _fail(f"{where}.shape", f"must be [D, D] with an integer D >= 0, got {shape!r}")


def _check_names(
    given: Mapping[str, Any], required: Mapping, optional: Mapping, where: str, what: str
) -> None:
    missing = [name for name in required if name not in given]
    extra = [name for name in given if name not in required and name not in optional]
    if missing or extra:
        needs = f"{what} {list(required)}" + (f" (optionally also {list(optional)})" if optional else "")
        raise _fail(where, f"{needs}; the state dict {_differences(missing, extra)}")


def _check_declared(state: dict[str, Any], schema: StateSchema, dtype: torch.dtype, where: str) -> None:
    """Hold the tensors, children and settings of ``state`` to the operator's ``schema``."""
    _check_tensors(state["type"], state["tensors"], schema, dtype, where)
    _check_children(state["type"], len(state["children"]), schema.children, where)
    _check_config(state["type"], state["config"], schema.config, where)


def _check_tensors(
    name: str, tensors: dict[str, Tensor], schema: StateSchema, dtype: torch.dtype, where: str
) -> None:
    _check_names(tensors, schema.tensors, schema.optional_tensors, where, f"{name} needs tensors")
    for key, tensor in tensors.items():
        spec = schema.tensors.get(key) or schema.optional_tensors[key]
        problem = spec.problem(tensor, dtype)
        if problem is not None:
            raise _fail(f"{where}.tensors[{key!r}]", f"{name} tensor {key!r} {problem}")


def _check_children(name: str, count: int, expected: int | None, where: str) -> None:
    wrong = count == 0 if expected is None else count != expected
    if wrong:
        needs = "at least 1" if expected is None else expected
        raise _fail(f"{where}.children", f"{name} needs {needs} sub-operators, the state dict has {count}")


def _check_config(name: str, config: dict[str, Any], settings: Mapping[str, Setting], where: str) -> None:
    required = {key: s for key, s in settings.items() if not s.optional}
    optional = {key: s for key, s in settings.items() if s.optional}
    _check_names(config, required, optional, where, f"{name} needs settings")
    for key, value in config.items():
        if not settings[key].accepts(value):
            raise _fail(
                f"{where}.config[{key!r}]",
                f"{name} setting {key!r} must be {settings[key].expected}, got {value!r}",
            )


def check_state(state: Any, where: str) -> tuple[type[CurvatureOperator], torch.dtype]:
    """Raise :class:`StateDictError` unless ``state`` is a well-formed state dict (this level
    only; sub-operators are checked as they are reached). Returns the class and the dtype."""
    _check_keys(state, where)
    name = state["type"]
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise _fail(where, f"Unknown operator type {name!r} in state dict")
    _check_shape(state["shape"], where)
    dtype = _parse_dtype(state["dtype"], where)
    _check_container(state["tensors"], dict, f"{where}.tensors", "a dict of tensors")
    _check_container(state["children"], (list, tuple), f"{where}.children", "a list of state dicts")
    _check_container(state["config"], dict, f"{where}.config", "a dict of settings")
    for key, tensor in state["tensors"].items():
        if not isinstance(tensor, Tensor):
            raise _fail(f"{where}.tensors[{key!r}]", f"is not a tensor but {type(tensor).__name__}")
    schema = cls._state_schema(state["tensors"])
    if schema is not None:
        _check_declared(state, schema, dtype, where)
    return cls, dtype


def _child_paths(state: dict[str, Any], where: str) -> list[str]:
    """Where each sub-operator of ``state`` is: ``children['label']`` for labelled blocks."""
    labels = state["config"].get("labels")
    if not LABELS.accepts(labels) or len(labels) != len(state["children"]):
        labels = range(len(state["children"]))
    return [f"{where}.children[{label!r}]" for label in labels]


_RESTORED: ContextVar[dict | None] = ContextVar("curvops_restored_tensors", default=None)
"""While :func:`from_state_dict` runs: its converted tensors by stored storage, and the objects
(:class:`~curvops.linalg.Factor`) made of them, so that what was one tensor stays one object."""


@contextmanager
def _restoring() -> Iterator[dict]:
    """The registry of one :func:`from_state_dict` call (the outermost one's, if nested)."""
    registry = _RESTORED.get()
    if registry is not None:
        yield registry
        return
    token = _RESTORED.set({})
    try:
        yield _RESTORED.get()
    finally:
        _RESTORED.reset(token)


def _storage_key(tensor: Tensor) -> tuple:
    """What identifies a stored tensor's numbers: storage, offset, shape, strides and dtype (one
    tensor saved twice, in memory or through ``torch.save``, has one key)."""
    storage = tensor.untyped_storage()
    place = storage.data_ptr(), storage.device, tensor.storage_offset()
    return (*place, tensor.shape, tensor.stride(), tensor.dtype)


def restored_once(tensor: Tensor, make: Callable[[Tensor], Any], kind: str) -> Any:
    """``make(tensor)``, made once per tensor object and ``kind`` within one :func:`from_state_dict`
    call (outside one: always anew). A state dict stores the ``G`` of a layer's weight and bias
    blocks as one tensor; restored through this, they share one
    :class:`~curvops.linalg.Factor` again, and so one eigendecomposition."""
    registry = _RESTORED.get()
    if registry is None:
        return make(tensor)
    key = (kind, id(tensor))
    if key not in registry:
        registry[key] = (tensor, make(tensor))  # the tensor is kept, so its id is not reused
    return registry[key][1]


def rebuild(
    state: Any, device: torch.device | str | None, dtype: torch.dtype | None, where: str
) -> CurvatureOperator:
    """:func:`from_state_dict` with ``where``, the path its errors name the operator by."""
    cls, stored_dtype = check_state(state, where)
    target_dtype = dtype or stored_dtype
    tensors = {}
    registry = _RESTORED.get()
    for name, tensor in state["tensors"].items():
        key = _storage_key(tensor)
        if registry is not None and key in registry:  # stored twice: converted once
            tensors[name] = registry[key]
            continue
        tensor = tensor.to(device) if device is not None else tensor
        tensors[name] = tensor.to(target_dtype) if tensor.is_floating_point() else tensor
        if registry is not None:
            registry[key] = tensors[name]
    paths = _child_paths(state, where)
    children = [
        rebuild(child, device, dtype, path) for child, path in zip(state["children"], paths, strict=True)
    ]
    if device is None:
        device = next((t.device for t in tensors.values()), None)
        device = device or (children[0].device if children else torch.device("cpu"))
    try:
        with converted_from(stored_dtype):  # the tensors keep the stored dtype's rounding
            op = cls._from_state(tensors, children, dict(state["config"]), target_dtype, torch.device(device))
    except StateDictError:
        raise
    except ValueError as error:
        problem = str(error).rstrip(".")
        raise _fail(where, f"{state['type']} cannot be built from this state dict: {problem}") from error
    if list(op.shape) != list(state["shape"]):
        raise _fail(
            where,
            f"state dict says shape {state['shape']}, its tensors {list(tensors)} and "
            f"{len(children)} sub-operators give {list(op.shape)}",
        )
    if op.dtype != target_dtype:
        raise _fail(where, f"state dict says dtype {target_dtype}, its sub-operators give {op.dtype}")
    return op


def from_state_dict(
    state: dict[str, Any],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> CurvatureOperator:
    """Rebuild an operator from :meth:`CurvatureOperator.state_dict`.

    The state dict is checked against what its operator type declares before anything is
    built: any missing, extra or ill-typed key, tensor or setting, at any depth, raises
    :class:`~curvops.errors.StateDictError` naming its path.

    Args:
        state: a state dict, e.g. from ``torch.load(path, weights_only=True)``.
        device: where the operator's tensors go (default: where they are stored).
        dtype: cast floating tensors to this dtype (default: the stored dtype).

    Example:
        >>> op = curvops.Kronecker(torch.eye(2), 2 * torch.eye(3))
        >>> curvops.from_state_dict(op.state_dict()).trace().item()
        12.0
        >>> curvops.from_state_dict({**op.state_dict(), "type": "Dense"})
        Traceback (most recent call last):
        ...
        curvops.errors.StateDictError: Dense: Dense needs tensors ['matrix']; the state dict lacks ['matrix']
        and has unexpected ['factor0', 'factor1'].
    """
    name = state.get("type") if isinstance(state, dict) else None
    with _restoring():
        return rebuild(
            state, device, dtype, name if isinstance(name, str) and name in _REGISTRY else "state dict"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def check_state_matches(expected: dict[str, Any], given: Any, where: str) -> None:
    """Raise :class:`StateDictError` unless ``given`` has the structure of ``expected``.

    ``given`` must be well formed (:func:`check_state`), and type, dtype, tensor names and
    shapes, settings, the settings that identify the operator (a block's labels), number of
    children and shape must agree, recursively; tensor values and other settings may differ.
    Sub-operators are checked before the overall shape, so the error names the innermost
    mismatch (a layer's block rather than the whole operator).
    """
    _check_keys(given, where)
    for key in ("type", "dtype"):
        _check_equal(given, expected, key, where)
    cls, _ = check_state(given, where)
    if set(given["tensors"]) != set(expected["tensors"]):
        raise StateDictError(
            f"{where}: state dict has tensors {sorted(given['tensors'])}, "
            f"expected {sorted(expected['tensors'])}."
        )
    for name, tensor in expected["tensors"].items():
        other = given["tensors"][name]
        if other.shape != tensor.shape:
            raise StateDictError(
                f"{where}.tensors[{name!r}]: state dict has shape {list(other.shape)}, "
                f"the operator has {list(tensor.shape)}."
            )
    if set(given["config"]) != set(expected["config"]):
        raise StateDictError(
            f"{where}: state dict has settings {sorted(given['config'])}, "
            f"expected {sorted(expected['config'])}."
        )
    _check_identities(cls, expected, given, where)
    if len(given["children"]) != len(expected["children"]):
        raise StateDictError(
            f"{where}: state dict has {len(given['children'])} sub-operators, "
            f"the operator has {len(expected['children'])}."
        )
    pairs = zip(_child_paths(expected, where), expected["children"], given["children"], strict=True)
    for path, child_expected, child_given in pairs:
        check_state_matches(child_expected, child_given, path)
    _check_equal(given, expected, "shape", where)


def _check_identities(cls: type[CurvatureOperator], expected: dict, given: dict, where: str) -> None:
    """The settings that identify the operator (e.g. the layers' labels) must be its own."""
    schema = cls._state_schema(given["tensors"])
    for key, setting in (schema.config if schema is not None else {}).items():
        ours, theirs = _plain(expected["config"].get(key)), _plain(given["config"].get(key))
        if not setting.identifies or ours == theirs:
            continue
        if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
            differ = [
                f"{a!r} where the operator has {b!r}" for a, b in zip(theirs, ours, strict=True) if a != b
            ]
        else:
            differ = [f"{theirs!r} where the operator has {ours!r}"]
        raise _fail(
            f"{where}.config[{key!r}]",
            f"the state dict has {', '.join(differ)}: it belongs to other layers or another model "
            "(load it into an operator built on the model it was saved from)",
        )


def _check_equal(given: dict[str, Any], expected: dict[str, Any], key: str, where: str) -> None:
    if _plain(given[key]) != _plain(expected[key]):
        raise StateDictError(
            f"{where}: state dict has {key} {given[key]!r} but the operator has {expected[key]!r}."
        )
