"""A model, the parameters an operator is taken with respect to, and checked passes over the data.

:class:`ModelData` brings together what every builder needs, from small modules of one job each:

- :mod:`curvops.nn.parameters`: choosing the parameters ``θ``, and where they sit in the model;
- :mod:`curvops.nn.batches`: what counts as a batch, each checked and put on ``θ``'s device;
- :mod:`curvops.nn.staleness`: an operator is the curvature at ``θ``'s values when it was
  built, and raises once a parameter or buffer changed;
- :mod:`curvops.nn.passes`: every pass over the data sees the data of the first;
- :mod:`curvops.nn.forward_checks`: the model's forward pass is one fixed function of each datum;
- :mod:`curvops.nn.jacobian_products`: ``J v`` and ``J^T u`` through ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..linalg.checks import all_finite, check_bool
from .batches import as_batches, check_reiterable, checked_batch
from .forward_checks import check_batch_statistics
from .mappings import ModelInputs, call_model
from .parameters import chosen_parameters, parameter_slots
from .passes import PassChecks, PassRecord, named_leaves
from .staleness import ParameterSnapshot


class ModelData:
    """The model, its chosen parameters and a re-iterable data set, with checked passes.

    Args:
        model: the network.
        data: a re-iterable of ``(X, y)`` batches (a list or a ``DataLoader``), or one bare
            pair ``(X, y)`` with a tensor ``X`` (see :func:`~curvops.nn.batches.as_batches`);
            mappings through :func:`~curvops.nn.mapping_batches` (``X`` called as ``model(**X)``).
        params: parameters of ``model``, trainable or frozen, as a list or a dict of them
            (its values, in order; default: the model's trainable ones, in order).
        progressbar: show a tqdm bar on every pass over the data.
        check_deterministic: also compare each batch's data (and model output, once seen)
            with the first pass's as it comes, whatever the operator, and raise
            :class:`~curvops.errors.NonDeterministicDataError` when it differs.
        label: the data set's name in errors (``"query_data"``: "Batch 0 of query_data: ...").
        allow_empty: accept data without batches (a rank's empty shard under
            :mod:`curvops.distributed`); by default empty data raises.

    Raises:
        ValueError: for batch normalisation with batch statistics (train mode).

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> model_data = curvops.nn.ModelData(model, (torch.randn(5, 3), torch.randn(5, 2)))
        >>> model_data.size, model_data.names
        (8, ['weight', 'bias'])
        >>> [x.shape for _, x, _ in model_data.batches("reading")]
        [torch.Size([5, 3])]
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable,
        params: Sequence[nn.Parameter] | None = None,
        progressbar: bool = False,
        check_deterministic: bool = False,
        label: str = "",
        allow_empty: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        check_bool(progressbar, "progressbar")
        check_bool(check_deterministic, "check_deterministic")
        self.allow_empty = check_bool(allow_empty, "allow_empty")
        data = as_batches(data)
        check_reiterable(data)
        self.params, self.names = chosen_parameters(model, params)
        self.model = model
        self.data = data
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.progressbar = progressbar
        self.check_deterministic = check_deterministic
        self.label = label
        check_batch_statistics(model)
        self._snapshot = ParameterSnapshot(model)
        self._passes = PassChecks(per_batch=check_deterministic)

    @property
    def size(self) -> int:
        """``D``: the number of entries of the chosen parameters."""
        return sum(p.numel() for p in self.params)

    def non_finite_tensors(self) -> str:
        """Why an output can be non-finite from the model itself: its parameters and buffers
        holding NaN or inf (seen in their value sums from the build), named; else ``""``."""
        return self._snapshot.non_finite_cause()

    def check_fresh(self, chosen: bool = True) -> None:
        """Raise :class:`~curvops.errors.StaleParametersError` if a parameter or buffer changed
        since the build (with ``chosen=False`` one outside :attr:`params`: for a result that keeps
        its own copy of the chosen parameters' values, as :class:`~curvops.laplace.Laplace` does).

        Catches in-place updates (``optimizer.step()``), replaced tensors, and changes through
        ``.data`` that no version counter sees (``p.data.mul_(2)``, a BatchNorm buffer): a sum
        and a sum of squares per tensor, compared up to rounding (one device sync;
        :func:`~curvops.nn.tensor_sums.same_sums`). Changes below that tolerance, and
        permutations of a tensor's entries, go unnoticed.
        """
        self._snapshot.check(skipped=() if chosen else self.names)

    def param_dict(self) -> dict[str, Tensor]:
        """``{name: detached parameter}`` of the chosen parameters: the input of :meth:`forward`.

        Detached, so a product builds no autograd graph to the model (frozen parameters, with
        ``requires_grad=False``, work the same way).
        """
        return {name: p.detach() for name, p in zip(self.names, self.params, strict=True)}

    def forward(self, params: dict[str, Tensor], x: Any) -> Tensor:
        """The model output (``model(x)``, or ``model(**x)``'s chosen output for
        :class:`~curvops.nn.mappings.ModelInputs`) with ``params`` (``{name: tensor}`` as
        :meth:`param_dict`) in place of the chosen parameters, and every other parameter detached.

        Every attribute of a module that holds a parameter is swapped exactly once: a module used
        twice (``nn.Sequential(lin, act, lin)``) has one slot seen under two paths, and a tied
        parameter (``head.weight = embedding.weight``) several slots that all get the same
        tensor, so its gradient sums over every use. The model's own parameter objects are put
        back unchanged (``torch.func.functional_call``'s weight tying would swap a shared
        module's slot twice and leave a plain tensor behind). Attention runs in PyTorch's plain
        ``scaled_dot_product_attention`` kernel (``SDPBackend.MATH``): the fused kernels have no
        forward-mode or double derivative, which the exact operators take.
        """
        chosen = {id(p): name for name, p in zip(self.names, self.params, strict=True)}
        values = {
            path: params[chosen[id(p)]] if id(p) in chosen else p.detach()
            for path, p in parameter_slots(self.model)
        }
        with sdpa_kernel(SDPBackend.MATH):
            if isinstance(x, ModelInputs):
                result = torch.func.functional_call(self.model, values, (), dict(x), tie_weights=False)
                return x.output_of(result)
            return torch.func.functional_call(self.model, values, (x,), tie_weights=False)

    def call(self, x: Any) -> Tensor:
        """The model's output on ``x`` with its own parameters: ``model(x)``, or ``model(**x)``'s
        chosen output for :class:`~curvops.nn.mappings.ModelInputs`."""
        return call_model(self.model, x)

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

    def batches(self, description: str, any_order: bool = False) -> Iterator[tuple[int, Any, Tensor]]:
        """``(index, X, y)`` for every batch, on the parameters' device (floats in their dtype).

        Checks that the parameters are fresh, batch normalisation is not in train mode (it may
        have been switched since the build) and the batches well formed and finite; and, at
        the end of every complete pass, that it saw the data of the first complete pass: the
        same number of batches always, and the same batches in the same order — or, with
        ``any_order`` (for a result that does not depend on the order: a sum over batches), the
        same totals per tensor (rows, entries, ``Σ t`` and ``Σ t²``; integers exactly, floats up
        to rounding: :func:`~curvops.nn.tensor_sums.same_sums`). A changed pass raises
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
        for index, batch in enumerate(batches):
            self._passes.check_count(description, index)
            x, y = checked_batch(batch, index, self.device, self.dtype, self.label)
            self._passes.check_batch("data", index, named_leaves(x, y))
            record.add(x, y)
            yield index, x, y
        if not len(record) and not self.allow_empty:
            raise ValueError("data is empty: it yielded no batches.")
        record.finish()
        self._passes.check_pass(description, record, any_order)

    def checked_data(self, description: str) -> CheckedData:
        """The data as a re-iterable whose every complete pass is checked against this object's
        first pass (order-free, as :meth:`batches` with ``any_order``): for an operator built over
        the same data inside another computation (Laplace's curvature, the influence functions'),
        so that its passes cannot see other data than the computation's own pass did."""
        return CheckedData(self, description)

    def check_output(self, index: int, output: Tensor) -> None:
        """Raise on a non-finite model output; compare it with the first pass if asked."""
        if not all_finite(output):
            cause = self.non_finite_tensors()
            raise ValueError(f"Batch {index}: the model output contains NaN or inf.{cause}")
        self._passes.check_batch("output", index, [("output", output)])


class CheckedData:
    """``(X, y)`` batches of a :class:`ModelData`, each pass checked against its first pass
    (see :meth:`ModelData.checked_data`)."""

    def __init__(self, model_data: ModelData, description: str) -> None:
        self.model_data, self.description = model_data, description

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        for _, x, y in self.model_data.batches(self.description, any_order=True):
            yield x, y
