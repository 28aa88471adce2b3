"""Batches as mappings: ``{"input_ids", "attention_mask", "labels"}`` as a Hugging Face loader yields them.

curvops' batches are pairs ``(X, y)``, and the model is called as ``model(X)``. A loader of
mappings becomes such pairs through :func:`mapping_batches`: ``y`` is the target entry, and
``X`` a :class:`ModelInputs` (a ``dict`` of the other entries) that every operator, Laplace
and the influence functions call as ``model(**X)``, taking the output tensor from a model
that returns a mapping (``{"logits": ...}``, a ``ModelOutput``) as ``output`` says. A plain
``dict`` ``X`` is still passed whole, ``model(X)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import register_pytree_node

from .batches import check_reiterable

OutputChoice = str | Callable[[Any], Tensor] | None
"""Which tensor of a model's result is its output: a key (``"logits"``), a function of the
result, or ``None`` for a model that returns a tensor."""


class ModelInputs(dict):
    """Keyword inputs of a model: curvops calls ``model(**inputs)`` and picks the output tensor
    from the result with :meth:`output_of`.

    A tree of tensors like a ``dict`` (``torch.func`` maps over its entries, each with the
    batch's data on its first axis); ``output`` travels with it.

    Example:
        >>> x = ModelInputs({"input_ids": torch.tensor([[1, 2]])}, output="logits")
        >>> x.output_of({"logits": torch.ones(1, 2, 5)}).shape
        torch.Size([1, 2, 5])
    """

    def __init__(self, entries: Mapping[str, Any], output: OutputChoice = None) -> None:
        super().__init__(entries)
        self.output = output

    def output_of(self, result: Any) -> Tensor:
        """The output tensor of a model's ``result``: ``result[output]``, ``output(result)``, or
        ``result`` itself; raises ``TypeError`` naming the keys when it is not a tensor."""
        if isinstance(self.output, str):
            if not isinstance(result, Mapping) or self.output not in result:
                keys = list(result) if isinstance(result, Mapping) else type(result).__name__
                raise TypeError(f"output={self.output!r}: the model returned {keys}, without that key.")
            result = result[self.output]
        elif self.output is not None:
            result = self.output(result)
        if not isinstance(result, Tensor):
            keys = f" with keys {list(result)}" if isinstance(result, Mapping) else ""
            raise TypeError(
                f"The model returned a {type(result).__name__}{keys}, not a tensor: pass "
                "mapping_batches(..., output='logits') (the key of the output) or a function of the result."
            )
        return result


def _flatten(inputs: ModelInputs) -> tuple[list[Any], tuple[tuple[str, ...], OutputChoice]]:
    return list(inputs.values()), (tuple(inputs), inputs.output)


def _unflatten(values: Iterable[Any], context: tuple[tuple[str, ...], OutputChoice]) -> ModelInputs:
    keys, output = context
    return ModelInputs(dict(zip(keys, values, strict=True)), output)


register_pytree_node(ModelInputs, _flatten, _unflatten, serialized_type_name="curvops.nn.ModelInputs")


def call_model(model: nn.Module, x: Any) -> Tensor:
    """``model(**x)``'s output tensor for :class:`ModelInputs`, else ``model(x)``.

    Example:
        >>> call_model(torch.nn.Linear(3, 2), torch.zeros(4, 3)).shape
        torch.Size([4, 2])
    """
    if isinstance(x, ModelInputs):
        return x.output_of(model(**x))
    return model(x)


class MappingBatches:
    """The ``(X, y)`` batches of a re-iterable of mappings (see :func:`mapping_batches`)."""

    def __init__(
        self, data: Iterable, target: str, inputs: Sequence[str] | None, output: OutputChoice
    ) -> None:
        if isinstance(data, Mapping):
            raise TypeError(
                "data must be a re-iterable of mappings (batches), not one mapping: pass [batch]."
            )
        check_reiterable(data)
        if not isinstance(target, str):
            raise TypeError(f"target must be the key of the targets, got {target!r}.")
        if not (output is None or isinstance(output, str) or callable(output)):
            raise TypeError(
                f"output must be a key, a function of the model's result or None, got {output!r}."
            )
        self.data, self.target, self.output = data, target, output
        self.inputs = None if inputs is None else tuple(inputs)

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[tuple[ModelInputs, Any]]:
        for index, batch in enumerate(self.data):
            yield self.pair(index, batch)

    def pair(self, index: int, batch: Any) -> tuple[ModelInputs, Any]:
        """Batch ``index`` as ``(X, y)``; raises naming the batch, the missing key and the keys present."""
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"Batch {index} of mapping_batches is a {type(batch).__name__}, not a mapping of "
                "named tensors: pass (X, y) batches directly, without mapping_batches."
            )
        wanted = self.inputs or [key for key in batch if key != self.target]
        missing = [key for key in (self.target, *wanted) if key not in batch]
        if missing:
            what = "target" if missing[0] == self.target else "input"
            raise ValueError(
                f"Batch {index} has no {what} key {missing[0]!r}; its keys are {list(batch)}. "
                "Say which entries are the target and the inputs: "
                "mapping_batches(data, target=..., inputs=[...])."
            )
        return ModelInputs({key: batch[key] for key in wanted}, self.output), batch[self.target]


def mapping_batches(
    data: Iterable[Mapping[str, Any]],
    target: str = "labels",
    inputs: Sequence[str] | None = None,
    output: OutputChoice = None,
) -> MappingBatches:
    """``(X, y)`` batches of a re-iterable of mappings, for every curvops function that takes data.

    ``y = batch[target]``; ``X`` is a :class:`ModelInputs` of the entries ``inputs`` (default:
    every entry but the target) that curvops calls as ``model(**X)``, taking the output tensor
    from the result as ``output`` says: a key (``"logits"`` of a dict or a ``ModelOutput``), a
    function of the result, or ``None`` for a model that returns a tensor. Re-iterable as
    ``data`` is, with ``len()`` where ``data`` has one. The targets are what the loss compares
    the output with (``ignore_index`` padding as usual). In a training loop with
    :class:`~curvops.optim.KFACOptimizer` call the model yourself:
    ``loss_fn(model(**inputs)["logits"], labels)`` (the loss hook sees that output and targets).

    Example:
        >>> class Tagger(torch.nn.Module):  # forward(input_ids, attention_mask) -> {"logits"}
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embedding, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3)
        ...     def forward(self, input_ids, attention_mask):
        ...         hidden = self.embedding(input_ids) * attention_mask.unsqueeze(-1)
        ...         return {"logits": self.head(hidden).flatten(0, 1)}
        >>> loader = [{"input_ids": torch.randint(0, 10, (2, 5)), "attention_mask": torch.ones(2, 5),
        ...            "labels": torch.randint(0, 3, (10,))}]
        >>> data = curvops.nn.mapping_batches(loader, target="labels", output="logits")
        >>> kfac = curvops.KFAC(Tagger(), torch.nn.CrossEntropyLoss(), data, fisher_type="type-2")
        >>> kfac.labels
        ('embedding.weight', 'head.weight', 'head.bias')
    """
    return MappingBatches(data, target, inputs, output)
