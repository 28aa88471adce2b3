"""Fit once, score many: :class:`Influence` holds a fitted influence curvature ``F`` (and its
damped inverse) and computes pairwise, self and leave-one-out scores for any number of query
sets; it saves ``F`` with its damping and restores it without refitting. It and the one-shot
functions :func:`~curvops.influence.influence_scores`, :func:`~curvops.influence.self_influence`
and :func:`~curvops.influence.leave_one_out_scores` run the same code (``pairwise_scores``,
``own_scores``, ``scores_without`` on one checked problem)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..linalg import CurvatureOperator, from_state_dict
from .files import load_state, save_state
from .leave_one_out import scores_without
from .problem import _Problem
from .scores import own_scores, pairwise_scores

FORMAT = "curvops.influence/1"


class Influence:
    """A fitted influence curvature ``F`` of the mean training loss and ``(F + Λ)^-1``: scores of
    the training examples on any query set, on themselves, and with one of them removed.

    ``F`` is built (or the prebuilt ``curvature`` taken) on first use, or by :meth:`fit`, and kept;
    every method then streams the training gradients past the preconditioned query gradients as
    the functions of :mod:`curvops.influence` do (same arguments, same results).

    The arguments are those of :func:`~curvops.influence.influence_scores` (``model``,
    ``loss_fn``, ``train_data``, ``curvature``, ``damping``, ``fisher_type``, ``bias``, ``params``,
    ``train_batch_size``, ``query_batch_size``, ``progressbar``, ``curvature_options``, ``group``).

    Example:
        >>> from curvops.influence import Influence, influence_scores
        >>> layers = [torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)]
        >>> model = torch.nn.Sequential(*layers).double()
        >>> train = (torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,)))
        >>> queries = [(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1])) for _ in range(3)]
        >>> influence = Influence(model, torch.nn.CrossEntropyLoss(), train, curvature="kfac").fit()
        >>> [influence.scores(q).shape for q in queries]  # F built once
        [torch.Size([2, 10]), torch.Size([2, 10]), torch.Size([2, 10])]
        >>> loss = torch.nn.CrossEntropyLoss()
        >>> one_shot = influence_scores(model, loss, train, queries[0], curvature="kfac")
        >>> bool((influence.scores(queries[0]) == one_shot).all())
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        train_data: Iterable,
        curvature: str | CurvatureOperator = "ekfac",
        damping: float | str = "heuristic",
        fisher_type: str = "type-2",
        bias: str = "joint",
        params: Sequence[nn.Parameter] | None = None,
        train_batch_size: int = 32,
        query_batch_size: int = 128,
        progressbar: bool = False,
        curvature_options: Mapping[str, Any] | None = None,
        group: Any = None,
    ) -> None:
        self._problem = _Problem(
            model, loss_fn, train_data, curvature, damping, fisher_type, bias, params,
            train_batch_size, query_batch_size, progressbar, curvature_options, group,
        )  # fmt: skip
        self._settings = {"damping": damping, "fisher_type": fisher_type, "bias": bias}

    def fit(self) -> Influence:
        """Build ``F``, its block dampings and ``(F + Λ)^-1`` now (else on first use); ``self``."""
        self._problem.build()
        return self

    @property
    def curvature(self) -> CurvatureOperator:
        """``F``, the curvature of the mean training loss (built if not yet)."""
        return self.fit()._problem.op

    def scores(
        self,
        query_data: Iterable,
        measurement: Callable[[Tensor, Tensor], Tensor] | None = None,
        per_module: bool = False,
        query_rank: int | None = None,
        per_token: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        """``[M, N]`` scores of the training examples on ``query_data`` (``{label: [M, N]}`` per
        module, ``[M, N, S]`` per token): :func:`~curvops.influence.influence_scores` with the
        fitted ``F``."""
        return pairwise_scores(self._problem, query_data, measurement, per_module, query_rank, per_token)

    def self_influence(self) -> Tensor:
        """``[N]`` self-influence: :func:`~curvops.influence.self_influence` with the fitted ``F``."""
        return own_scores(self._problem)

    def leave_one_out(
        self,
        query_data: Iterable,
        removed: int | Sequence[int] | Tensor,
        renormalize: bool = False,
        measurement: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """:func:`~curvops.influence.leave_one_out_scores` with the fitted ``F`` (downdated per
        removed example, not rebuilt)."""
        return scores_without(self._problem, query_data, removed, renormalize, measurement)

    def state_dict(self) -> dict[str, Any]:
        """``F`` (its operator's ``state_dict``), the damping, the Fisher type, the bias and the
        parameters' names: tensors, numbers and strings (``torch.load(weights_only=True)``-safe)."""
        problem = self.fit()._problem
        return {
            "format": FORMAT,
            "curvature": problem.op.state_dict(),
            "param_names": list(problem.train.model_data.names),
            **self._settings,
        }

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to ``path``: safetensors for a ``.safetensors`` path (the
        package must be installed), else ``torch.save``.

        Example:
            >>> import tempfile, pathlib
            >>> from curvops.influence import Influence
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
            >>> train = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
            >>> influence = Influence(model, torch.nn.CrossEntropyLoss(), train, curvature="ekfac")
            >>> path = pathlib.Path(tempfile.mkdtemp()) / "influence.pt"
            >>> influence.save(path)
            >>> again = Influence.load(path, model, torch.nn.CrossEntropyLoss(), train)
            >>> bool((again.self_influence() == influence.self_influence()).all())
            True
        """
        save_state(self.state_dict(), path)

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, Any],
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        train_data: Iterable,
        params: Sequence[nn.Parameter] | None = None,
        **options: Any,
    ) -> Influence:
        """An :class:`Influence` with the saved ``F`` and damping, on ``model`` and its training
        data (whose gradients the scores need; ``F`` is not refitted). ``options``:
        ``train_batch_size``, ``query_batch_size``, ``progressbar``, ``group``. Raises
        ``ValueError`` for a state of other parameters."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"Not an Influence state_dict (format {FORMAT!r}), got {found!r}.")
        allowed = {"train_batch_size", "query_batch_size", "progressbar", "group"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"from_state_dict takes {sorted(allowed)} besides params, not {unknown}.")
        first = next(p for p in (params or model.parameters()) if p is not None)
        operator = from_state_dict(state["curvature"], device=first.device, dtype=first.dtype)
        settings = (state["damping"], state["fisher_type"], state["bias"])
        influence = cls(model, loss_fn, train_data, operator, *settings, params, **options)
        names = list(influence._problem.train.model_data.names)
        if names != list(state["param_names"]):
            raise ValueError(
                f"The state's parameters are {list(state['param_names'])}; these are {names}. Pass the "
                "same params (names and order) as when it was fitted."
            )
        return influence

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        train_data: Iterable,
        params: Sequence[nn.Parameter] | None = None,
        **options: Any,
    ) -> Influence:
        """:meth:`from_state_dict` of the state :meth:`save` wrote to ``path``."""
        return cls.from_state_dict(load_state(path), model, loss_fn, train_data, params, **options)
