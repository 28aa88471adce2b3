"""The checked arguments of an influence computation, and the curvature they build.

``_Problem`` checks what every influence function takes (curvature, damping, Fisher type,
bias, batch sizes, ``curvature_options``, the model's mode), holds the losses and the
training examples, and builds ``F``, its block dampings and ``(F + Λ)^-1``;
:func:`influence_curvature` is its public half: ``F`` alone, to build once and reuse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import LOCAL, Shards
from ..linalg import CurvatureOperator, block_layout
from ..linalg.checks import check_choice, check_positive_int
from ..nn.curvature import dense_operator
from ..nn.fisher import fisher_type as nn_fisher_type
from ..nn.options import BIAS_OPTIONS, check_curvature
from ..nn.staleness import mark_built_from
from .curvature import (
    CURVATURES,
    Damping,
    _block_dampings,
    _build,
    _check_damping,
    _check_operator,
    _check_options,
    _check_supported,
    _damped,
    _inverse,
)
from .examples import _check_mode, _Examples, _Losses
from .queries import CompressedQueries, ExactQueries


class _Problem:
    """The checked arguments, the training data and the damped curvature."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        train_data: Any,
        curvature: str | CurvatureOperator,
        damping: Damping,
        fisher_type: str,
        bias: str,
        params: Sequence[nn.Parameter] | None,
        train_batch_size: int,
        query_batch_size: int,
        progressbar: bool,
        curvature_options: Mapping[str, Any] | None,
        group: Any,
    ) -> None:
        check_curvature(curvature, CURVATURES)
        self.group, shards = group, Shards.of(group)
        nn_fisher_type(fisher_type, backward=True)
        check_choice(bias, BIAS_OPTIONS, "bias")
        self.options = _check_options(curvature_options, curvature, fisher_type)
        self.damping = _check_damping(damping)
        self.train_batch_size = check_positive_int(train_batch_size, "train_batch_size")
        self.query_batch_size = check_positive_int(query_batch_size, "query_batch_size")
        _check_mode(model)
        self.model, self.params, self.progressbar = model, params, progressbar
        self.losses = _Losses(loss_fn)
        self.train = _Examples(model, train_data, params, self.losses, "train_data", progressbar, shards)
        if isinstance(curvature, CurvatureOperator):
            _check_operator(curvature, self.train.model_data)
        else:
            _check_supported(model, self.train.model_data, curvature, bias, self.options)
        self.curvature, self.fisher_type, self.bias = curvature, fisher_type, bias

    def examples(self, data: Any, what: str, measurement: Callable | None = None) -> _Examples:
        """``data`` as checked examples of the same model, parameters and losses (gradients of
        ``measurement`` instead of the loss, where given)."""
        examples = _Examples(
            self.model, data, self.params, self.losses, what, self.progressbar, Shards.of(LOCAL), measurement
        )
        examples.check()
        return examples

    def operator(self) -> CurvatureOperator:
        """``F``: the prebuilt operator, or the named curvature built over the training data.

        Over shards a matrix-free operator is made dense once: its products are collectives,
        and the solves with each rank's own right-hand sides (its training gradients) must be
        local.
        """
        self.train.check()
        if isinstance(self.curvature, CurvatureOperator):
            if self.train.shards.active and self.curvature.matrix_free:
                return mark_built_from(dense_operator(self.curvature), self.train.model_data)
            return self.curvature
        return _build(
            self.model, self.losses, self.train, self.curvature, self.fisher_type, self.bias,
            self.params, self.progressbar, self.train_batch_size, self.options, self.group,
        )  # fmt: skip

    def build(self) -> None:
        """Build (or take) ``F``, its block dampings and ``(F + Λ)^-1``, once."""
        if hasattr(self, "inverse"):
            return
        self.op = self.operator()
        self.dampings = _block_dampings(self.op, self.damping)
        self.inverse = _inverse(_damped(self.op, self.dampings), self.op)

    def scores(
        self, queries: ExactQueries | CompressedQueries, count: int, parts: int | None = None
    ) -> Tensor:
        """``[K, N]`` scores of ``count`` preconditioned query columns with every training gradient,
        streaming the train data (``N = 0`` columns for a rank's empty shard); ``[parts, K, N]``
        per part."""
        blocks = [queries.scores(g) for g in self.train.columns(self.train_batch_size)]
        model_data = self.train.model_data
        leading = (count,) if parts is None else (parts, count)
        empty = torch.zeros(*leading, 0, dtype=model_data.dtype, device=model_data.device)
        return torch.cat([empty, *blocks], dim=-1)

    def token_scores(self, queries: ExactQueries | CompressedQueries) -> Tensor:
        """``[K, N, S]`` (``[parts, K, N, S]``) scores with every training datum's every target
        position's gradient ``∇ℓ_ns``."""
        blocks = []
        for g in self.train.token_columns(self.train_batch_size):
            size, data, tokens = g.shape
            blocks.append(queries.scores(g.reshape(size, data * tokens)).unflatten(-1, (data, tokens)))
        if not blocks:
            raise ValueError(f"{self.train.what} holds no examples to score per token on this rank.")
        return torch.cat(blocks, dim=-2)

    def parts(self) -> dict[str, Tensor]:
        """``{label: flat indices}`` of the curvature's blocks (a block-diagonal ``F``: each
        block's coordinates, by its label), or else of each module's parameters: the parts whose
        scores sum to the total."""
        layout = block_layout(self.op)
        size = self.op.shape[0]
        order = torch.arange(size) if layout.permutation is None else layout.permutation.cpu()
        if layout.block_diagonal and layout.labels is not None:
            parts, start = {}, 0
            for label, block in zip(layout.labels, layout.blocks, strict=True):
                parts[label] = order[start : start + block.shape[0]]
                start += block.shape[0]
            return parts
        parts, start = {}, 0
        for name, p in self.train.model_data.param_dict().items():
            module = name.rpartition(".")[0] or type(self.model).__name__
            indices = torch.arange(start, start + p.numel())
            parts[module] = indices if module not in parts else torch.cat([parts[module], indices])
            start += p.numel()
        return parts


def influence_curvature(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train_data: Iterable,
    curvature: str = "ekfac",
    fisher_type: str = "type-2",
    bias: str = "joint",
    params: Sequence[nn.Parameter] | None = None,
    progressbar: bool = False,
    curvature_options: Mapping[str, Any] | None = None,
    group: Any = None,
) -> CurvatureOperator:
    """The curvature ``F`` of the mean loss over ``train_data`` that the influence functions use.

    Build it once and pass it as ``curvature=`` to :func:`influence_scores`,
    :func:`self_influence` and :func:`leave_one_out_scores` to reuse it. ``F`` is the curvature
    of ``L = (1/Z) Σ_n ℓ_n`` whatever ``loss_fn``'s reduction (a ``torch.nn`` loss with
    ``reduction="sum"`` is copied with ``"mean"``), of size ``D x D`` over ``params``:

    - ``"kfac"``, ``"ekfac"``, ``"tkfac"``, ``"tekfac"``: :func:`~curvops.KFAC`,
      :func:`~curvops.EKFAC`, :func:`~curvops.TKFAC` (``eigenvalue_correction`` for
      ``"tekfac"``) of the Fisher of ``fisher_type``: one block per layer
      (``bias="joint"``: weight and bias in one block ``G ⊗ A`` over ``[W b]``, as kronfluence
      does) or per parameter (``"separate"``);
    - ``"ggn"``: the exact curvature of ``fisher_type``, densified (``D x D`` in memory, small
      models): the GGN ``(1/Z) Σ_n J_n^T ∇²_f ℓ_n J_n`` (= the type-2 Fisher) for
      ``"type-2"``, the exact empirical Fisher ``(1/Z) Σ_n ∇ℓ_n ∇ℓ_n^T`` for ``"empirical"``,
      the exact Monte-Carlo Fisher for ``"mc"`` — each the matrix KFAC of the same
      ``fisher_type`` approximates;
    - ``"diagonal"``: the exact diagonal of that matrix, one :class:`~curvops.Diagonal` block
      per parameter tensor (labelled by its name). For ``"empirical"`` it takes one pass of
      per-example gradients, ``(1/Z) Σ_n ∇ℓ_n ⊙ ∇ℓ_n``; otherwise ``D`` products with the
      exact operator (small and moderate models);
    - ``"identity"``: ``I`` (plain gradient dot products).

    Args:
        model: the network.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` (any
            ``torch.func``-differentiable loss for ``"ggn"`` with ``"type-2"`` and ``"identity"``).
        train_data: a re-iterable of ``(X, y)`` batches, or one pair of tensors ``(X, y)``.
        curvature: one of the names above.
        fisher_type: ``"type-2"`` (default: the GGN, deterministic, the curvature influence
            functions approximate — Bae et al. 2022; no label noise), ``"mc"`` (labels sampled from
            the model: cheaper than type-2 for many classes) or ``"empirical"`` (the true
            labels' gradients; a biased curvature estimate, Kunstner et al. 2019).
        bias: ``"joint"`` or ``"separate"`` (Kronecker curvatures only).
        params: the parameters (default: the model's trainable ones, in order).
        progressbar: tqdm bars on the passes over the data.
        curvature_options: further keyword arguments of the builder: for the Kronecker
            curvatures those of :func:`~curvops.KFAC`, :func:`~curvops.EKFAC` or
            :func:`~curvops.TKFAC` (``unsupported``, ``kfac_approx``, ``mc_samples``, ``seed``,
            ``correction``, ``check_deterministic``); for ``"ggn"`` and ``"diagonal"`` those of
            the exact operator of ``fisher_type`` (``check_deterministic``; ``mc_samples`` and
            ``seed`` for ``"mc"``). A key the builder does not take, or one that is an argument
            above (``fisher_type``, ``bias``, ``params``, ...), raises a ``ValueError``.
        group: the process group whose ranks hold shards of ``train_data`` (``None``: the
            default group when ``torch.distributed`` is initialized); ``"local"`` keeps this
            process's data alone. Every rank gets the ``F`` of the union (see
            :mod:`curvops.influence`).

    Example:
        >>> from curvops.influence import influence_curvature
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> op = influence_curvature(model.double(), torch.nn.CrossEntropyLoss(), data, "kfac")
        >>> op.labels, op.block_sizes  # weight and bias in one block per layer
        (('0', '2'), (16, 10))

        A LayerNorm gets its exact block; a module without a rule (an ``nn.PReLU``) needs
        ``unsupported="dense"`` for one:

        >>> layers = [torch.nn.Linear(3, 4), torch.nn.PReLU(4), torch.nn.Linear(4, 2)]
        >>> model = torch.nn.Sequential(*layers).double()
        >>> data = (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
        >>> op = influence_curvature(
        ...     model, torch.nn.CrossEntropyLoss(), data, "kfac", curvature_options={"unsupported": "dense"}
        ... )
        >>> op.labels, op.block_sizes
        (('0', '1', '2'), (16, 4, 10))
    """
    check_choice(curvature, CURVATURES, "curvature")
    problem = _Problem(
        model, loss_fn, train_data, curvature, 0.0, fisher_type, bias, params, 32, 1, progressbar,
        curvature_options, group,
    )  # fmt: skip
    return problem.operator()
