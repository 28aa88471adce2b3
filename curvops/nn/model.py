"""A model, the parameters an operator is taken with respect to, and passes over the data.

Parameters are *snapshotted by reference*: an operator is the curvature at the values the
parameters had when it was built. They are not copied; instead every pass checks that no
parameter was changed in place (e.g. by ``optimizer.step()``) or replaced since, and raises
:class:`~curvops.errors.StaleParametersError` if one was, so a stale operator can never be
used by mistake. Build a new operator after the parameters change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import NonDeterministicDataError, StaleParametersError


def _fingerprint(*tensors: Any) -> tuple:
    """Shapes, sums and sums of squares (float64): they change when the tensors change."""
    result = []
    for tensor in tensors:
        values = tensor.detach().double() if isinstance(tensor, Tensor) else torch.zeros(())
        result.append((tuple(values.shape), values.sum().item(), values.square().sum().item()))
    return tuple(result)


def _same(first: tuple, second: tuple) -> bool:
    """Equal shapes and sums up to a relative 1e-6 (GPU reductions may reorder)."""
    for (shape_a, *sums_a), (shape_b, *sums_b) in zip(first, second, strict=True):
        if shape_a != shape_b or any(
            abs(a - b) > 1e-6 * max(1.0, abs(a)) for a, b in zip(sums_a, sums_b, strict=True)
        ):
            return False
    return True


def pull_back(pullback: Callable, cotangents: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
    """``J^T u`` for every column ``u`` of ``cotangents`` (``[K, ...]``, or a tree of them),
    as ``{name: [K, *shape]}``.

    One backward pass per column through the same recorded forward pass: on CPU this is
    faster than ``vmap`` over the pullback (measured up to 4x for convolutions).
    """
    if isinstance(cotangents, dict):
        count = next(iter(cotangents.values())).shape[0]
        columns = [pullback({name: t[k] for name, t in cotangents.items()})[0] for k in range(count)]
    else:
        columns = [pullback(u)[0] for u in cotangents]
    return {name: torch.stack([column[name] for column in columns]) for name in columns[0]}


def add_trees(total: dict[str, Tensor] | None, part: dict[str, Tensor]) -> dict[str, Tensor]:
    """``total + part`` for ``{name: tensor}`` trees; ``part`` when there is no total yet."""
    return part if total is None else {name: total[name] + part[name] for name in total}


@contextmanager
def fixed_forward() -> Iterator[None]:
    """Turn torch.func's error for a random forward pass into one that says what to do."""
    try:
        yield
    except RuntimeError as error:
        if "random operation" not in str(error):
            raise
        raise NonDeterministicDataError(
            "The model draws random numbers in its forward pass (dropout or another random layer "
            "in train mode?), so its curvature is not one fixed matrix; call model.eval()."
        ) from error


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


def as_batches(data: Any) -> Any:
    """The rule for a bare pair: a tuple ``(X, y)`` whose ``X`` is a tensor is one batch,
    ``[(X, y)]``; anything else is a re-iterable of batches.

    Example:
        >>> x, y = torch.zeros(4, 3), torch.zeros(4)
        >>> len(as_batches((x, y))), len(as_batches([(x, y), (x, y)]))
        (1, 2)
    """
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        return [data]
    return data


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


class ModelData:
    """The model, its chosen parameters and a re-iterable data set, with checked passes.

    Args:
        model: the network.
        data: a re-iterable of ``(X, y)`` batches (a list or a ``DataLoader``), or one bare
            pair ``(X, y)`` with a tensor ``X`` (see :func:`as_batches`).
        params: parameters of ``model``, trainable or frozen, as a list or a dict of them
            (its values, in order; default: the model's trainable ones, in order).
        progressbar: show a tqdm bar on every pass over the data.
        check_deterministic: remember each batch's data (and model output, once seen) on
            the first pass and raise :class:`~curvops.errors.NonDeterministicDataError`
            when a later pass differs (shuffling, augmentation, dropout in train mode).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable,
        params: Sequence[nn.Parameter] | None = None,
        progressbar: bool = False,
        check_deterministic: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        data = as_batches(data)
        if iter(data) is data:
            raise TypeError(
                "data must be re-iterable (a list of (X, y) batches or a DataLoader), not a one-shot "
                "iterator or generator: curvops passes over it once per product."
            )
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
        self.model = model
        self.data = data
        self.params = params
        self.names = [names[id(p)] for p in params]
        self.dtype, self.device = params[0].dtype, params[0].device
        self.progressbar = progressbar
        self.check_deterministic = check_deterministic
        self._versions = self._parameter_state()
        self._fingerprints: dict[tuple[str, int], tuple] = {}
        self._batch_count: int | None = None

    @property
    def size(self) -> int:
        """``D``: the number of entries of the chosen parameters."""
        return sum(p.numel() for p in self.params)

    def _parameter_state(self) -> list[tuple[int, int]]:
        return [(p._version, p.data_ptr()) for p in self.params]

    def check_fresh(self) -> None:
        """Raise :class:`StaleParametersError` if a parameter changed since the operator was built."""
        for name, before, after in zip(self.names, self._versions, self._parameter_state(), strict=True):
            if before != after:
                raise StaleParametersError(
                    f"Parameter {name!r} changed after this operator was built; it represents the "
                    "curvature at the old values. Build a new operator for the new parameters."
                )

    def param_dict(self) -> dict[str, Tensor]:
        """``{name: detached parameter}`` of the chosen parameters: the input of :meth:`forward`.

        Detached, so a product builds no autograd graph to the model (frozen parameters, with
        ``requires_grad=False``, work the same way).
        """
        return {name: p.detach() for name, p in zip(self.names, self.params, strict=True)}

    def forward(self, params: dict[str, Tensor], x: Any) -> Tensor:
        """The model output with ``params`` (``{name: tensor}`` as :meth:`param_dict`) in place of
        the chosen parameters, and every other parameter detached.

        Every attribute of a module that holds a parameter is swapped exactly once: a module used
        twice (``nn.Sequential(lin, act, lin)``) has one slot seen under two paths, and a tied
        parameter (``head.weight = embedding.weight``) several slots that all get the same
        tensor, so its gradient sums over every use. The model's own parameter objects are put
        back unchanged (``torch.func.functional_call``'s weight tying would swap a shared
        module's slot twice and leave a plain tensor behind).
        """
        chosen = {id(p): name for name, p in zip(self.names, self.params, strict=True)}
        values = {
            path: params[chosen[id(p)]] if id(p) in chosen else p.detach()
            for path, p in parameter_slots(self.model)
        }
        return torch.func.functional_call(self.model, values, (x,), tie_weights=False)

    def to_tree(self, vectors: Tensor) -> dict[str, Tensor]:
        """``[D, K]`` columns as ``{name: [K, *shape]}``."""
        parts = vectors.split([p.numel() for p in self.params], dim=0)
        return {
            name: part.T.reshape(vectors.shape[1], *p.shape).contiguous()
            for name, part, p in zip(self.names, parts, self.params, strict=True)
        }

    def from_tree(self, tree: dict[str, Tensor]) -> Tensor:
        """``{name: [K, *shape]}`` back to ``[D, K]``."""
        return torch.cat([tree[name].reshape(tree[name].shape[0], -1).T for name in self.names], dim=0)

    def _move(self, tensor: Any, what: str, index: int) -> Any:
        if not isinstance(tensor, Tensor):
            return tensor
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = tensor.to(device=self.device, dtype=self.dtype)
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"Batch {index}: {what} contains NaN or inf.")
            return tensor
        return tensor.to(self.device)

    def batches(self, description: str) -> Iterator[tuple[int, Any, Tensor]]:
        """``(index, X, y)`` for every batch, on the parameters' device (floats in their dtype).

        Checks the parameters are fresh, the batches well formed and finite, and — with
        ``check_deterministic`` — that they equal those of the first pass.
        """
        self.check_fresh()
        count = 0
        batches = self.data
        if self.progressbar:
            from tqdm.auto import tqdm  # a widget in Jupyter; imported only when asked for

            batches = tqdm(batches, desc=description)
        for index, batch in enumerate(batches):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"Batch {index} must be an (X, y) pair, got {type(batch).__name__}.")
            x, y = self._move(batch[0], "X", index), self._move(batch[1], "y", index)
            if self.check_deterministic:
                self._check_batch("data", index, _fingerprint(x, y))
            count += 1
            yield index, x, y
        if count == 0:
            raise ValueError("data is empty: it yielded no batches.")
        if self.check_deterministic and self._batch_count not in (None, count):
            raise NonDeterministicDataError(
                f"data yielded {count} batches, but {self._batch_count} on an earlier pass."
            )
        self._batch_count = count

    def check_output(self, index: int, output: Tensor) -> None:
        """Raise on a non-finite model output; compare it with the first pass if asked."""
        if not bool(torch.isfinite(output).all()):
            raise ValueError(f"Batch {index}: the model output contains NaN or inf.")
        if self.check_deterministic:
            self._check_batch("output", index, _fingerprint(output))

    def _check_batch(self, kind: str, index: int, fingerprint: tuple) -> None:
        expected = self._fingerprints.setdefault((kind, index), fingerprint)
        if not _same(expected, fingerprint):
            cause = (
                "the data changed between passes (shuffling or augmentation?); use a fixed, "
                "non-shuffled loader"
                if kind == "data"
                else "the model output changed between passes on the same data (dropout or another "
                "random layer in train mode?); call model.eval()"
            )
            raise NonDeterministicDataError(f"Batch {index}: {cause}.")
