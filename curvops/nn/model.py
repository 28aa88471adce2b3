"""A model, the parameters an operator is taken with respect to, and passes over the data.

Parameters are *snapshotted by reference*: an operator is the curvature at the values the
parameters had when it was built. They are not copied; instead every pass checks that no
parameter or buffer of the model was changed (in place, e.g. by ``optimizer.step()``, through
``.data``, or replaced) since, and raises :class:`~curvops.errors.StaleParametersError` if one
was, so a stale operator can never be used by mistake. Build a new operator after the
parameters change.

Every complete pass over the data is compared with the first (:meth:`ModelData.batches`), the
model's forward passes must not draw random numbers (:func:`fixed_forward`), and batch
normalisation with batch statistics is refused (:func:`check_batch_statistics`): together they
make an operator one fixed matrix, the curvature of a loss that is a sum over the data.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap
from torch.utils._pytree import tree_leaves

from ..errors import NonDeterministicDataError, StaleParametersError
from ..linalg.checks import check_bool


def _leaves(tree: Any) -> list[Tensor]:
    """The tensors of ``tree`` (a tensor, or nested tuples, lists and dicts of them)."""
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, Tensor)]


def is_empty(x: Any) -> bool:
    """Whether a batch's inputs have no rows: every tensor of ``x`` has a first axis of size 0."""
    leaves = _leaves(x)
    return bool(leaves) and all(t.ndim > 0 and t.shape[0] == 0 for t in leaves)


def _sums(tensors: Sequence[Tensor]) -> Tensor:
    """``[L, 2]`` float64 on the first tensor's device: each tensor's ``Σ t`` and ``Σ t²``.

    Integers (and bools) exactly, in float64; floating-point tensors by native reductions in
    their own precision (half types in float32), with no float64 copy. No device sync.
    """
    rows = []
    for tensor in tensors:
        values = tensor.detach()
        values = torch.view_as_real(values) if values.is_complex() else values
        if not values.is_floating_point():
            values = values.to(torch.float64)
            row = torch.stack([values.sum(), values.square().sum()])
        else:
            values = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
            row = torch.stack([values.sum(), torch.linalg.vector_norm(values).square()])
        rows.append(row.to(device=tensors[0].device, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)


SUM_TOLERANCE = 1e-5
"""Relative tolerance of floating-point :func:`_sums`: they may round apart in another order."""


def _same_sums(first: Sequence[float], second: Sequence[float], elements: int, exact: bool) -> bool:
    """Whether two ``(Σ t, Σ t²)`` of ``elements`` entries agree: exactly for integers; for floats
    up to :data:`SUM_TOLERANCE` of ``√(n Σ t²) >= Σ |t|`` (sums) and of ``Σ t²`` (squares).
    NaNs agree with NaNs."""
    if all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(first, second, strict=True)):
        return True
    if exact:
        return False
    (total, squares), (total_b, squares_b) = first, second
    return abs(total - total_b) <= SUM_TOLERANCE * math.sqrt(elements * abs(squares)) and abs(
        squares - squares_b
    ) <= SUM_TOLERANCE * abs(squares)


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


class PassRecord:
    """What one pass over the data saw, for comparing a later pass with the first.

    Per batch the shapes and floating-point kinds of the tensors of ``(X, y)`` and their
    float64 sums and sums of squares; the sums stay on the device until :meth:`finish`
    (one sync per pass).
    """

    def __init__(self) -> None:
        self.layouts: list[tuple[tuple[str, tuple[int, ...], bool], ...]] = []
        self._pending: list[Tensor] = []
        self.sums: list[list[tuple[float, float]]] = []

    def add(self, x: Any, y: Any) -> None:
        """Record one batch."""
        named = [(f"X{i or ''}", t) for i, t in enumerate(_leaves(x))]
        named += [(f"y{i or ''}", t) for i, t in enumerate(_leaves(y))]
        self.layouts.append(
            tuple((name, tuple(t.shape), t.is_floating_point() or t.is_complex()) for name, t in named)
        )
        self._pending.append(_sums([t for _, t in named]))

    def finish(self) -> None:
        """Fetch the sums of every batch (one device sync)."""
        if self._pending:
            flat = torch.cat([part.reshape(-1, 2).cpu() for part in self._pending]).tolist()
            sizes = [len(layout) for layout in self.layouts]
            offsets = [sum(sizes[:b]) for b in range(len(sizes) + 1)]
            self.sums = [[tuple(row) for row in flat[a:b]] for a, b in itertools.pairwise(offsets)]
        self._pending = []

    def totals(self) -> dict[str, list]:
        """Order-free totals per tensor name: ``[rows, elements, Σ t, Σ t², floating]``."""
        totals: dict[str, list] = {}
        for layout, sums in zip(self.layouts, self.sums, strict=True):
            for (name, shape, floating), (total, squares) in zip(layout, sums, strict=True):
                entry = totals.setdefault(name, [0, 0, 0.0, 0.0, floating])
                entry[0] += shape[0] if shape else 1
                entry[1] += math.prod(shape)
                entry[2] += total
                entry[3] += squares
        return totals

    def same_batch(self, other: PassRecord, index: int) -> bool:
        """Whether batch ``index`` has the same shapes and sums in both passes."""
        layout, sums = self.layouts[index], self.sums[index]
        if layout != other.layouts[index]:
            return False
        return all(
            _same_sums(row_a, row_b, math.prod(shape), exact=not floating)
            for (_, shape, floating), row_a, row_b in zip(layout, sums, other.sums[index], strict=True)
        )

    def total_differences(self, other: PassRecord) -> list[str]:
        """What differs between the order-free totals of two passes, in words."""
        mine, theirs = self.totals(), other.totals()
        if mine.keys() != theirs.keys():
            return [f"the batches hold tensors {sorted(theirs)}, on the first pass {sorted(mine)}"]
        changes = []
        for name, (rows, elements, total, squares, floating) in mine.items():
            rows_b, elements_b, total_b, squares_b, _ = theirs[name]
            if (rows, elements) != (rows_b, elements_b):
                changes.append(
                    f"{name} has {rows_b} rows ({elements_b} entries), {rows} ({elements}) on the first"
                )
            elif not _same_sums((total, squares), (total_b, squares_b), elements, exact=not floating):
                changes.append(f"the values of {name} differ (sum {total_b:.8g}, {total:.8g} on the first)")
        return changes


_FIX = (
    "curvops passes over the data once per product and needs the same data on every pass: use a "
    "fixed loader (a list of batches, or a DataLoader with shuffle=False and no random augmentation)"
)


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


def push_forward(
    forward: Callable, params: dict[str, Tensor], tree: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """The output and ``J v`` for every column ``v`` of ``tree`` (``{name: [K, *shape]}``):
    ``(f(θ), [K, *output.shape])``.

    Forward mode (``vmap`` of ``jvp``) where every operation of the model has a forward-mode
    derivative; otherwise (e.g. ``nn.MultiheadAttention``'s fused kernel in eval mode) reverse
    over reverse: ``J^T u`` is linear in ``u``, so ``J v = ∂/∂u ⟨J^T u, v⟩``, one backward pass
    per column through a recorded pullback.
    """
    try:
        return vmap(lambda v: jvp(forward, (params,), (v,)), out_dims=(None, 0))(tree)
    except NotImplementedError as error:
        if "forward AD" not in str(error):
            raise
    output = forward(params)
    _, transpose = vjp(lambda u: vjp(forward, params)[1](u)[0], torch.zeros_like(output))
    count = next(iter(tree.values())).shape[0]
    columns = [transpose({name: t[k] for name, t in tree.items()})[0] for k in range(count)]
    return output, torch.stack(columns)


def add_trees(total: dict[str, Tensor] | None, part: dict[str, Tensor]) -> dict[str, Tensor]:
    """``total + part`` for ``{name: tensor}`` trees; ``part`` when there is no total yet."""
    return part if total is None else {name: total[name] + part[name] for name in total}


RANDOM_FORWARD = (
    "The model draws random numbers in its forward pass (dropout or another random layer in train "
    "mode?), so its curvature is not one fixed matrix; call model.eval() or use a fixed dropout mask."
)


def _rng_states() -> list[Tensor]:
    """The global random number generators' states: the CPU's, and every GPU's once CUDA is up."""
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: list[Tensor]) -> bool:
    """Put back ``states`` if the generators moved since; whether they had."""
    now = _rng_states()
    if len(now) == len(states) and all(torch.equal(a, b) for a, b in zip(now, states, strict=True)):
        return False
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state_all(states[1:])
    return True


@contextmanager
def fixed_forward() -> Iterator[None]:
    """Refuse a model that draws random numbers in the forward passes run inside.

    Two signs: torch.func's own error for a random operation under ``vmap``, and any change of
    the global generators' states (:func:`torch.get_rng_state`, CUDA's too), which are then
    restored, so the user's random stream is never moved. Wrap model computations only, not
    the iteration over a ``DataLoader`` (which draws random numbers for its own seeds).

    Example:
        >>> with curvops.nn.model.fixed_forward():  # doctest: +ELLIPSIS
        ...     torch.nn.Dropout(0.5)(torch.ones(4))
        Traceback (most recent call last):
        ...
        curvops.errors.NonDeterministicDataError: The model draws random numbers ... fixed dropout mask.
    """
    before = _rng_states()
    try:
        yield
    except RuntimeError as error:
        if "random operation" not in str(error):
            raise
        raise NonDeterministicDataError(RANDOM_FORWARD) from error
    finally:
        moved = _restore_rng(before)
    if moved:
        raise NonDeterministicDataError(RANDOM_FORWARD)


def check_batch_statistics(model: nn.Module) -> None:
    """Refuse batch normalisation that normalises with the batch's own statistics.

    In train mode (or without running statistics) a ``BatchNorm`` layer couples the data of a
    batch, so the loss is not a sum over data and depends on the batching; in train mode it also
    updates its running statistics in every forward pass.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
        >>> curvops.nn.model.check_batch_statistics(model)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: '1' is a BatchNorm1d in train mode ...; call model.eval().
        >>> curvops.nn.model.check_batch_statistics(model.eval())
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        ):
            mode = "in train mode" if module.training else "without running statistics"
            raise ValueError(
                f"{name or type(module).__name__!r} is a {type(module).__name__} {mode} (batch "
                "normalisation with the batch's own statistics): the loss is then not a sum over data, "
                "and curvops never updates a model's running statistics; call model.eval()"
                + ("." if module.training else " after training with track_running_stats=True.")
            )


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
        check_deterministic: also compare each batch's data (and model output, once seen)
            with the first pass's as it comes, whatever the operator, and raise
            :class:`~curvops.errors.NonDeterministicDataError` when it differs.
        label: the data set's name in errors (``"query_data"``: "Batch 0 of query_data: ...").

    Raises:
        ValueError: for batch normalisation with batch statistics (train mode).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable,
        params: Sequence[nn.Parameter] | None = None,
        progressbar: bool = False,
        check_deterministic: bool = False,
        label: str = "",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        check_bool(progressbar, "progressbar")
        check_bool(check_deterministic, "check_deterministic")
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
        self.label = label
        check_batch_statistics(model)
        self._state = self._parameter_state()
        self._values = self._value_sums()
        self._fingerprints: dict[tuple[str, int], tuple] = {}
        self._first_pass: PassRecord | None = None

    @property
    def size(self) -> int:
        """``D``: the number of entries of the chosen parameters."""
        return sum(p.numel() for p in self.params)

    def _named_tensors(self) -> list[tuple[str, Tensor]]:
        """Every parameter and buffer of the model (not only the chosen ones: all shape the loss)."""
        return [*self.model.named_parameters(), *self.model.named_buffers()]

    def _parameter_state(self) -> list[tuple[str, int, int]]:
        """``(name, version counter, storage address)`` per parameter and buffer."""
        return [(name, t._version, t.data_ptr()) for name, t in self._named_tensors()]

    def _value_sums(self) -> list[tuple[float, float]]:
        """Each parameter's and buffer's ``(Σ t, Σ t²)`` (:func:`_sums`), in one device sync."""
        return [tuple(row) for row in _sums([t for _, t in self._named_tensors()]).tolist()]

    def non_finite_tensors(self) -> str:
        """Why an output can be non-finite from the model itself: its parameters and buffers
        holding NaN or inf (seen in their value sums from the build), named; else ``""``."""
        names = [
            name
            for (name, tensor), sums in zip(self._named_tensors(), self._values, strict=True)
            if not all(math.isfinite(value) for value in sums) and not bool(torch.isfinite(tensor).all())
        ]
        if not names:
            return ""
        return (
            f" The model's {', '.join(map(repr, names))} contain NaN or inf (a diverged training step "
            "or a bad checkpoint?): restore finite values."
        )

    def check_fresh(self, chosen: bool = True) -> None:
        """Raise :class:`StaleParametersError` if a parameter or buffer changed since the build
        (with ``chosen=False`` one outside :attr:`params`: for a result that keeps its own copy of
        the chosen parameters' values, as :class:`~curvops.laplace.Laplace` does).

        Catches in-place updates (``optimizer.step()``), replaced tensors, and changes through
        ``.data`` that no version counter sees (``p.data.mul_(2)``, a BatchNorm buffer): a sum
        and a sum of squares per tensor, compared up to rounding (one device sync; :func:`_same_sums`).
        Changes below that tolerance, and permutations of a tensor's entries, go unnoticed.
        """
        state = self._parameter_state()
        if [name for name, _, _ in state] != [name for name, _, _ in self._state]:
            raise StaleParametersError(
                "The model's parameters or buffers are not the ones it had when this operator was "
                "built (one was added or removed); build a new operator."
            )
        skipped = set() if chosen else set(self.names)
        changed = [
            name
            for (name, *before), (_, *after) in zip(self._state, state, strict=True)
            if before != after and name not in skipped
        ]
        if not changed:
            changed = [
                name
                for (name, t), before, after in zip(
                    self._named_tensors(), self._values, self._value_sums(), strict=True
                )
                if name not in skipped
                and not _same_sums(
                    before, after, t.numel(), exact=not (t.is_floating_point() or t.is_complex())
                )
            ]
        if changed:
            name = changed[0]
            kind = "Parameter" if name in dict(self.model.named_parameters()) else "Buffer"
            raise StaleParametersError(
                f"{kind} {name!r} changed after this operator was built; it represents the "
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
                of = f" of {self.label}" if self.label else ""
                raise ValueError(f"Batch {index}{of}: {what} contains NaN or inf.")
            return tensor
        return tensor.to(self.device)

    def batches(self, description: str, any_order: bool = False) -> Iterator[tuple[int, Any, Tensor]]:
        """``(index, X, y)`` for every batch, on the parameters' device (floats in their dtype).

        Checks that the parameters are fresh, batch normalisation is not in train mode (it may
        have been switched since the build) and the batches well formed and finite; and, at
        the end of every complete pass, that it saw the data of the first complete pass: the
        same number of batches always, and the same batches in the same order — or, with
        ``any_order`` (for a result that does not depend on the order: a sum over batches), the
        same totals per tensor (rows, entries, ``Σ t`` and ``Σ t²``; integers exactly, floats up
        to rounding: :func:`_same_sums`). A changed pass raises
        :class:`~curvops.errors.NonDeterministicDataError`. ``check_deterministic`` compares each
        batch with the first pass's as it comes.
        """
        self.check_fresh()
        check_batch_statistics(self.model)  # the model may have been put in train mode since
        record = PassRecord()
        batches = self.data
        if self.progressbar:
            from tqdm.auto import tqdm  # a widget in Jupyter; imported only when asked for

            batches = tqdm(batches, desc=description)
        expected = None if self._first_pass is None else len(self._first_pass.layouts)
        for index, batch in enumerate(batches):
            if index == expected:
                raise NonDeterministicDataError(
                    f"{description}: data yielded more than {expected} batches on this pass, {expected} on "
                    f"the first; {_FIX}."
                )
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"Batch {index} must be an (X, y) pair, got {type(batch).__name__}.")
            x, y = self._move(batch[0], "X", index), self._move(batch[1], "y", index)
            if self.check_deterministic:
                self._check_batch("data", index, _fingerprint(x, y))
            record.add(x, y)
            yield index, x, y
        if not record.layouts:
            raise ValueError("data is empty: it yielded no batches.")
        record.finish()
        self._check_pass(description, record, any_order)

    def checked_data(self, description: str) -> CheckedData:
        """The data as a re-iterable whose every complete pass is checked against this object's
        first pass (order-free, as :meth:`batches` with ``any_order``): for an operator built over
        the same data inside another computation (Laplace's curvature, the influence functions'),
        so that its passes cannot see other data than the computation's own pass did."""
        return CheckedData(self, description)

    def _check_pass(self, description: str, record: PassRecord, any_order: bool) -> None:
        """Compare a complete pass with the first (which it becomes if there was none)."""
        first = self._first_pass
        if first is None:
            self._first_pass = record
            return
        count, expected = len(record.layouts), len(first.layouts)
        if count != expected:
            raise NonDeterministicDataError(
                f"{description}: data yielded {count} batches on this pass, {expected} on the first; {_FIX}."
            )
        if any_order:
            changes = first.total_differences(record)
            if changes:
                raise NonDeterministicDataError(
                    f"{description}: the data differ from the first pass: {'; '.join(changes)} (random "
                    f"augmentation, or shuffling with drop_last?); {_FIX}."
                )
            return
        for index in range(count):
            if not first.same_batch(record, index):
                raise NonDeterministicDataError(
                    f"{description}: batch {index} differs from batch {index} of the first pass, and this "
                    "result depends on the order of the batches (labels drawn per batch, rows batch by "
                    f"batch, or data by position); shuffling? {_FIX}."
                )

    def check_output(self, index: int, output: Tensor) -> None:
        """Raise on a non-finite model output; compare it with the first pass if asked."""
        if not bool(torch.isfinite(output).all()):
            cause = self.non_finite_tensors()
            raise ValueError(f"Batch {index}: the model output contains NaN or inf.{cause}")
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


def mark_built_from(op: Any, model_data: ModelData) -> Any:
    """Remember on a stored operator (KFAC's blocks, a densified curvature) the model state it was
    built at, for :func:`check_built_from`; returns ``op``."""
    op._built_from = model_data
    return op


def check_built_from(op: Any) -> None:
    """Raise :class:`~curvops.errors.StaleParametersError` if ``op`` was built (see
    :func:`mark_built_from`) from a model whose parameters or buffers changed since: a stored
    operator is the curvature at the old values, so using it with the new ones (as the
    Laplace approximation or influence scores would) mixes two models."""
    model_data = getattr(op, "_built_from", None)
    if model_data is not None:
        model_data.check_fresh()


class CheckedData:
    """``(X, y)`` batches of a :class:`ModelData`, each pass checked against its first pass
    (see :meth:`ModelData.checked_data`)."""

    def __init__(self, model_data: ModelData, description: str) -> None:
        self.model_data, self.description = model_data, description

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        for _, x, y in self.model_data.batches(self.description, any_order=True):
            yield x, y
