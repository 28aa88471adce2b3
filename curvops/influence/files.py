"""A state (nested dicts and lists of tensors, numbers, strings, ``None``) in a file: ``torch.save``
(read back with ``torch.load(weights_only=True)``), or safetensors where the package is
installed and the path ends in ``.safetensors``: the tensors flat under their paths in the tree,
the rest of the tree as JSON in the file's metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_TENSOR = "__tensor__"
_METADATA_KEY = "curvops"


def _flattened(tree: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """``tree`` with each tensor replaced by ``{"__tensor__": key}``, the tensor in ``tensors[key]``."""
    if isinstance(tree, Tensor):
        tensors[path] = tree.detach().contiguous().cpu()
        return {_TENSOR: path}
    if isinstance(tree, dict):
        return {str(key): _flattened(value, f"{path}/{key}", tensors) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_flattened(value, f"{path}/{index}", tensors) for index, value in enumerate(tree)]
    return tree


def _restored(tree: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        return {key: _restored(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_restored(value, tensors) for value in tree]
    return tree


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            "A .safetensors path needs the safetensors package: pip install safetensors, or save to a "
            "path with another suffix (torch.save)."
        ) from error
    return safetensors.torch


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` (safetensors for a ``.safetensors`` path, else ``torch.save``).

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> save_state({"a": torch.ones(2), "b": [1, "x", None]}, folder / "s.pt")
        >>> load_state(folder / "s.pt")["b"]
        [1, 'x', None]
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        torch.save(state, path)
        return
    tensors: dict[str, Tensor] = {}
    tree = _flattened(state, "", tensors)
    _safetensors().save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(tree)})


def load_state(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a state :func:`save_state` wrote (``torch.load(weights_only=True)`` for a torch file)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return torch.load(path, map_location=device, weights_only=True)
    _safetensors()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as file:
        metadata = file.metadata() or {}
        if _METADATA_KEY not in metadata:
            raise ValueError(f"{path} holds no curvops state (its metadata has no {_METADATA_KEY!r} entry).")
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    return _restored(json.loads(metadata[_METADATA_KEY]), tensors)
