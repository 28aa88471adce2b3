"""Laplace approximations of a trained network's posterior, on curvops' structured operators.

At trained parameters ``θ*`` (a minimum of the loss) the posterior over the parameters is
approximated by the Gaussian ``N(θ*, P^-1)`` with the posterior precision

    ``P = K / T + τ I``,

``K`` the curvature (GGN = type-2 Fisher by default, or a Kronecker-factored or diagonal
approximation of it) of the *summed* negative log-likelihood ``L_sum(θ) = Σ_n ℓ_n(θ)`` over
the training data, ``T`` a temperature and ``τ`` the precision of the prior ``N(0, τ^-1 I)``:
one number, or one per parameter tensor. With it come

- the log marginal likelihood (evidence) of Laplace's method, for choosing ``τ``;
- posterior samples ``θ* + P^-1/2 z``;
- predictives: the linearised network (GLM) ``f(x) ~ N(f*(x), J(x) P^-1 J(x)^T)`` with the
  probit or a Monte-Carlo link approximation, or Monte-Carlo over sampled weights.

``P``'s structure is ``K``'s: per block of ``K`` (one per parameter tensor for KFAC, EKFAC,
TKFAC, TEKFAC and the diagonal) a scalar shift, so ``logdet P``, ``P^-1`` and ``P^-1/2`` stay
exact through each block's eigenvalues, and the eigenvalues are computed once when ``τ`` is
optimised. A block that mixes two prior precisions (a joint weight-and-bias KFAC block, or
the whole ``"full"`` GGN, with one ``τ`` per parameter tensor) is handled densely.

This follows the conventions of ``laplace-torch`` (Daxberger et al., 2021) for the
marginal likelihood and the predictives.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, jacrev, vmap

from .errors import NonDeterministicDataError, NotPositiveDefiniteError
from .linalg import (
    BlockDiagonal,
    CurvatureOperator,
    Dense,
    Diagonal,
    Permuted,
    Sum,
    block_layout,
    computation_dtype,
)
from .linalg.checks import check_choice, check_generator, check_positive, check_positive_int
from .nn.curvature import GGN, computation_copy, dense_operator
from .nn.forward_checks import check_batch_statistics, fixed_forward
from .nn.kfac import kronecker_approximation
from .nn.losses import LossAdapter, loss_hessian_factor
from .nn.model import ModelData
from .nn.options import check_curvature
from .nn.staleness import check_built_from

CURVATURES = ("kfac", "ekfac", "tkfac", "tekfac", "diagonal", "full")
PRIOR_METHODS = ("marglik", "grid")
PREDICTIVE_METHODS = ("glm", "mc")
LINK_APPROXIMATIONS = ("probit", "mc")

_ELEMENTS_PER_CHUNK = 2**22  # entries of a per-datum Jacobian chunk [B, C, D] (32 MiB in float64)
_MAX_DENSE_BLOCK = 10_000  # the largest block that mixes prior precisions and is made dense


class _Block:
    """One diagonal block of ``K``: its operator and where its coordinates sit in ``θ``.

    ``index[j]`` is the flat parameter index of the block's coordinate ``j``; ``groups[j]``
    the parameter tensor it belongs to (the prior-precision group).
    """

    def __init__(self, op: CurvatureOperator, index: Tensor, groups: Tensor) -> None:
        self.op = op
        self.index = index
        self.groups = groups
        self.single_group = bool((groups == groups[0]).all()) if groups.numel() else True
        self._eigenvalues: Tensor | None = None
        self._dense: Tensor | None = None

    @property
    def group(self) -> int:
        return int(self.groups[0])

    def eigenvalues(self) -> Tensor:
        """``K_b``'s eigenvalues (computed once), with rounding noise below zero clipped."""
        if self._eigenvalues is None:
            values = self.op.eigenvalues().reshape(-1)
            scale = values.abs().max() if values.numel() else values.new_zeros(())
            tolerance = math.sqrt(torch.finfo(values.dtype).eps) * scale
            if values.numel() and bool(values.min() < -tolerance):
                raise NotPositiveDefiniteError(
                    f"The curvature has an eigenvalue {values.min().item():.3e} < 0; a Laplace "
                    "approximation needs a positive semi-definite curvature (a GGN or Fisher)."
                )
            self._eigenvalues = values.clamp(min=0)
        return self._eigenvalues

    def dense(self) -> Tensor:
        """``K_b`` as a symmetric dense matrix (computed once), for blocks that mix priors."""
        if self._dense is None:
            matrix = self.op.to_dense()
            self._dense = 0.5 * (matrix + matrix.T)
        return self._dense


def _scale(op: CurvatureOperator, factor: float) -> CurvatureOperator:
    return op if factor == 1.0 else op * factor


class Laplace:
    """The Laplace approximation ``N(θ*, P^-1)``, ``P = K/T + τ I``, of a trained network.

    ``θ*`` are the parameters' values now (they are copied: training on afterwards does not
    change this object). ``K`` is the curvature of the summed negative log-likelihood
    ``L_sum = Σ_n ℓ_n`` over ``data``: a curvops operator of ``loss_fn`` has the loss's own
    reduction, so for ``reduction="mean"`` it is multiplied by ``N``, the number of loss
    terms the mean divides by (every element for ``MSELoss``/``BCEWithLogitsLoss``, every
    non-ignored target for ``CrossEntropyLoss``; see :mod:`curvops.nn.losses`). The
    log-likelihood is ``-L_sum(θ*)`` in terms of the loss as given: for ``CrossEntropyLoss``
    and ``BCEWithLogitsLoss`` that is exact; ``MSELoss`` sums ``(f - y)²``, the negative
    log-likelihood of ``N(f, ½ I)`` without its constant ``(N/2) log π`` (which does not
    depend on ``τ``). Pass ``sigma_noise=σ`` with ``MSELoss`` for the Gaussian ``N(f, σ² I)``
    instead: ``L_sum = Σ (f - y)² / (2σ²) + (N/2) log(2πσ²)``, ``K = K_MSE / (2σ²)``, and
    regression predictives add ``σ²``.

    Validation: a prior precision or temperature that is not a finite number ``> 0``, the
    wrong number of per-parameter precisions, an unknown curvature name and a curvature
    operator of the wrong size raise ``ValueError``. A :class:`UserWarning` says that ``θ*``
    is not at a minimum of the loss plus any L2 penalty (weight decay) ``(c/2) ‖θ‖²``,
    ``c >= 0``: when for every ``c`` the damped Newton step ``s_c = P^-1 (∇L_sum(θ*)/T + c θ*)``
    (``P`` with the initial ``τ``) is longer in the posterior's metric than a typical
    posterior sample's distance from the mean, ``min_c s_c^T P s_c > D``; i.e. the minimum of
    the quadratic model lies more than ``√D`` posterior standard deviations from ``θ*``.
    Train longer (the approximation expands the loss around a minimum).

    Args:
        model: the trained network; in eval mode if it has dropout or batch norm.
        loss_fn: ``nn.CrossEntropyLoss`` (classification, softmax), ``nn.BCEWithLogitsLoss``
            (independent binary outputs, sigmoid) or ``nn.MSELoss`` (regression), with
            reduction ``"mean"`` or ``"sum"``, without class weights or label smoothing.
        data: a re-iterable of ``(X, y)`` training batches, or one pair ``(X, y)`` with a tensor ``X``.
        curvature: ``"kfac"``, ``"ekfac"``, ``"tkfac"``, ``"tekfac"`` (the type-2 Fisher's
            Kronecker-factored approximations, one block per parameter tensor: see
            :func:`~curvops.KFAC`, :func:`~curvops.EKFAC`, :func:`~curvops.TKFAC`),
            ``"diagonal"`` (the GGN's exact diagonal, from per-datum Jacobians) or ``"full"``
            (the dense GGN: ``D²`` memory), or a prebuilt :class:`~curvops.CurvatureOperator`
            of ``loss_fn`` over ``data`` (its reduction is read from ``loss_fn`` as above); a
            matrix-free model operator (:class:`~curvops.GGN`, ...) is made dense once.
        prior_precision: ``τ > 0``: one number, or one per parameter tensor of ``params`` (in
            that order; a layer's weight and bias are two), a sequence or 1-D tensor.
        temperature: ``T > 0``; ``T < 1`` sharpens the posterior ("cold posterior").
        params: the parameters the posterior is over (default: the model's trainable ones);
            the others stay at their values (a change of one of them, or of a buffer, raises
            :class:`~curvops.errors.StaleParametersError` at the next prediction).
        sigma_noise: ``σ > 0`` of a Gaussian likelihood, with ``MSELoss`` only (see above).
        curvature_options: keyword arguments for the Kronecker builders (``fisher_type``,
            default ``"type-2"``; ``bias``, ``kfac_approx``, ``unsupported``, ...).

    Attributes:
        mean: ``θ*``, ``[D]``.
        curvature: ``K``, the operator of the summed negative log-likelihood (``[D, D]``).
        loss: ``L_sum(θ*)``, a 0-dim tensor.
        num_terms: ``N``, the number of loss terms in the data.
        param_names: the names of the parameter tensors, in the order of ``θ``.
        likelihood: ``"classification"`` (softmax), ``"binary"`` (sigmoid) or ``"regression"``.

    Example:
        >>> layers = [torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)]
        >>> model = torch.nn.Sequential(*layers).double()
        >>> x = torch.randn(16, 2, dtype=torch.float64)
        >>> data = [(x, (x[:, 0] > 0).long())]
        >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data, prior_precision=0.5)
        >>> la.mean.shape, la.curvature.shape, la.num_terms
        (torch.Size([17]), (17, 17), 16.0)
        >>> la.posterior_precision.block("2.bias").shape
        (2, 2)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data: Iterable,
        curvature: str | CurvatureOperator = "kfac",
        prior_precision: float | Sequence[float] | Tensor = 1.0,
        temperature: float = 1.0,
        params: Sequence[nn.Parameter] | None = None,
        sigma_noise: float | None = None,
        curvature_options: dict[str, Any] | None = None,
    ) -> None:
        check_curvature(curvature, CURVATURES)
        self._loss_adapter = LossAdapter(loss_fn, likelihood=True, what="Laplace")
        self._loss_adapter.check_sampling("Laplace")
        self.loss_fn = loss_fn
        self.likelihood = (
            "regression"
            if isinstance(loss_fn, nn.MSELoss)
            else "classification"
            if isinstance(loss_fn, nn.CrossEntropyLoss)
            else "binary"
        )
        if sigma_noise is not None:
            if self.likelihood != "regression":
                raise ValueError("sigma_noise is the noise of a Gaussian likelihood; it needs nn.MSELoss.")
            sigma_noise = check_positive(sigma_noise, "sigma_noise")
        self.sigma_noise = sigma_noise
        self.model = model
        self._model = ModelData(model, data, params)
        self.param_names = list(self._model.names)
        self._sizes = [p.numel() for p in self._model.params]
        self._theta = {name: p.detach().clone() for name, p in self._model.param_dict().items()}
        self.mean = torch.cat([t.reshape(-1) for t in self._theta.values()])
        self._prior_precision = self._check_prior_precision(prior_precision)
        self._temperature = check_positive(temperature, "temperature")

        gradient = self._read_data()
        # the factor turning the operator of loss_fn into K of the summed log-likelihood
        likelihood_scale = 1.0 if sigma_noise is None else 1.0 / (2.0 * sigma_noise**2)
        reduction_scale = self.num_terms if self._loss_adapter.reduction == "mean" else 1.0
        checked = self._model.checked_data("Laplace curvature")  # the passes of the first one
        op = self._build(curvature, loss_fn, checked, params, curvature_options)
        if op.shape[0] != self.mean.numel():
            raise ValueError(
                f"The curvature operator has size {op.shape[0]}, but the parameters have {self.mean.numel()} "
                "entries; build it from the same model and params."
            )
        if op.dtype != self.mean.dtype or op.device != self.mean.device:
            raise ValueError(
                f"The curvature operator is {op.dtype} on {op.device}, the parameters {self.mean.dtype} on "
                f"{self.mean.device}."
            )
        # the diagonal is computed for the summed loss already; every other operator is loss_fn's
        summed = isinstance(curvature, str) and curvature == "diagonal"
        self._decompose(op, likelihood_scale * (1.0 if summed else reduction_scale))
        self.curvature = self._assemble([block.op for block in self._blocks])
        self._check_minimum(gradient * likelihood_scale)

    def __repr__(self) -> str:
        tau = self._prior_precision
        prior = (
            f"{tau.item():.4g}" if tau.ndim == 0 else "[" + ", ".join(f"{t:.4g}" for t in tau.tolist()) + "]"
        )
        return (
            f"Laplace(likelihood={self.likelihood!r}, D={self.mean.numel()}, "
            f"curvature={type(self.curvature).__name__}, prior_precision={prior}, "
            f"temperature={self._temperature:g})"
        )

    # ----------------------------------------------------------------- construction
    def _check_prior_precision(self, value: Any) -> Tensor:
        """``τ`` as a 0-dim tensor or one value per parameter tensor ``[G]``; checked."""
        place = {"dtype": self.mean.dtype, "device": self.mean.device}
        if isinstance(value, Real) or (isinstance(value, Tensor) and value.ndim == 0):
            return torch.tensor(check_positive(value, "prior_precision"), **place)
        if isinstance(value, Tensor) and value.ndim != 1:
            raise ValueError(f"prior_precision must be a number or 1-D, got shape {list(value.shape)}.")
        message = f"prior_precision must be a number > 0 or one per parameter tensor, got {value!r}."
        if isinstance(value, (str, bytes)) or (isinstance(value, Tensor) and not value.is_floating_point()):
            raise TypeError(message)
        try:
            values = torch.as_tensor(value, **place).detach().clone()
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(message) from error
        if values.ndim != 1 or values.numel() != len(self._sizes):
            raise ValueError(
                f"prior_precision needs one number, or one per parameter tensor ({len(self._sizes)}: "
                f"{self.param_names}); got {values.numel()} values."
            )
        for name, tau in zip(self.param_names, values.tolist(), strict=True):
            check_positive(tau, f"prior_precision of {name!r}")
        return values

    def _read_data(self) -> Tensor:
        """One pass: ``L_sum(θ*)``, ``N``, the output shape, and ``∇L_sum(θ*)`` (returned, ``[D]``)."""
        loss, model = self._loss_adapter, self._model
        total, count, gradient = None, 0.0, None
        for index, inputs, targets in model.batches("Laplace: loss at the trained parameters"):
            batch_count = loss.count(targets)
            if not batch_count:
                continue
            scale = loss.batch_scale(batch_count)

            def summed(p, inputs=inputs, targets=targets, scale=scale, index=index):
                output = model.forward(p, inputs)
                loss.check_target(output, targets, index)
                return scale * loss(output, targets), output

            with fixed_forward():
                grads, (value, output) = grad_and_value(summed, has_aux=True)(self._theta)
            model.check_output(index, output)
            if not bool(torch.isfinite(value)):
                raise ValueError(f"Batch {index}: the loss is {value.item()} (NaN or inf).")
            if total is None:
                self._output_shape = tuple(output.shape[1:])
                self._input_example = tuple(inputs.shape) if isinstance(inputs, Tensor) else None
            flat = torch.cat([grads[name].reshape(-1) for name in self.param_names])
            total = value.detach() if total is None else total + value.detach()
            gradient = flat if gradient is None else gradient + flat
            count += batch_count
        if total is None:
            raise ValueError("The data has no loss terms (every target is ignored).")
        self.num_terms = count
        if self.sigma_noise is None:
            self.loss = total
        else:
            variance = self.sigma_noise**2
            self.loss = total / (2 * variance) + 0.5 * count * math.log(2 * math.pi * variance)
        return gradient

    def _build(self, curvature, loss_fn, data, params, options) -> CurvatureOperator:
        """The curvature operator of ``loss_fn`` (as it reduces), or the summed GGN's diagonal."""
        options = dict(options or {})
        if not isinstance(curvature, str):
            check_built_from(curvature)
            if options:
                raise ValueError("curvature_options apply to named curvatures, not to a prebuilt operator.")
            if curvature.matrix_free:
                if computation_dtype(curvature.dtype) != curvature.dtype:
                    raise TypeError(
                        f"curvature is a {curvature.dtype} {type(curvature).__name__}: its dense matrix from "
                        f"{curvature.dtype} products swamps the small eigenvalues of the posterior. Pass "
                        "curvature='full', which computes the GGN on a float32 copy of the model."
                    )
                return dense_operator(curvature)
            return curvature
        if curvature in ("diagonal", "full") and options:
            raise ValueError(f"curvature={curvature!r} takes no curvature_options (it is the exact GGN's).")
        if curvature == "diagonal":
            return self._diagonal_ggn()
        if curvature == "full":
            model, params = computation_copy(self._model)
            return dense_operator(GGN(model, loss_fn, data, params=params), self._model.dtype)
        options.setdefault("fisher_type", "type-2")
        return kronecker_approximation(
            curvature, self.model, loss_fn, data, params=self._model.params, **options
        )

    def _diagonal_ggn(self) -> CurvatureOperator:
        """``diag(Σ_n J_n^T ∇²ℓ_n J_n)`` of the summed loss, one labelled ``Diagonal`` per parameter.

        Per datum, ``Σ_k (J_n^T s_nk)²`` over the columns ``s_nk`` of ``∇²ℓ_n = S_n S_n^T``.
        """
        if self.likelihood == "classification" and len(self._output_shape) != 1:
            raise ValueError(
                "curvature='diagonal' needs CrossEntropyLoss outputs of shape [N, C]; got "
                f"[N, {', '.join(map(str, self._output_shape))}]. Use 'kfac' or 'full'."
            )
        total = torch.zeros_like(self.mean)
        for index, inputs, targets in self._model.batches("Laplace: diagonal GGN", any_order=True):
            for start, chunk in self._chunks(inputs, None):
                stop = start + chunk.shape[0]
                jac = self._datum_jacobians(chunk)  # [B, C, D]
                with fixed_forward():
                    output = self._forward(self._theta, chunk)
                self._loss_adapter.check_target(output, targets[start:stop], index)
                factor = loss_hessian_factor(self._loss_adapter, output, targets[start:stop])
                factor = factor.reshape(factor.shape[0], chunk.shape[0], -1)  # [K, B, C]
                total += torch.einsum("bcd,kbc->kbd", jac, factor).square().sum(dim=(0, 1))
        offsets = torch.tensor([0, *self._sizes]).cumsum(0).tolist()
        blocks = [Diagonal(total[a:b]) for a, b in itertools.pairwise(offsets)]
        return BlockDiagonal(blocks, self.param_names)

    def _decompose(self, op: CurvatureOperator, scale: float) -> None:
        """Split ``scale · op`` into blocks with their flat indices (see :class:`_Block`)."""
        device = self.mean.device
        layout = block_layout(op)
        blocks, self._labels = layout.blocks, layout.labels
        order = torch.arange(op.shape[0], device=device) if layout.permutation is None else layout.permutation
        groups = torch.repeat_interleave(
            torch.arange(len(self._sizes), device=device), torch.tensor(self._sizes, device=device)
        )
        self._order = order
        self._identity_order = bool((order == torch.arange(op.shape[0], device=device)).all())
        self._blocks, start = [], 0
        for block in blocks:
            index = order[start : start + block.shape[0]]
            self._blocks.append(_Block(_scale(block, scale), index, groups[index]))
            start += block.shape[0]
        self._group_sizes = torch.tensor(self._sizes, dtype=self.mean.dtype, device=device)
        self._group_squares = torch.stack([t.square().sum() for t in self._theta.values()])

    def _assemble(self, ops: list[CurvatureOperator]) -> CurvatureOperator:
        """Per-block operators (in block order) as one operator on the flat parameter vector."""
        op = ops[0] if len(ops) == 1 else BlockDiagonal(ops, self._labels)
        return op if self._identity_order else Permuted(op, self._order)

    def _check_minimum(self, gradient: Tensor) -> None:
        """Warn unless ``θ*`` minimises ``L_sum/T + (c/2) ‖θ‖²`` for some ``c >= 0``, up to ``√D`` std devs.

        With ``g = ∇L_sum(θ*)/T`` and ``P`` at the initial ``τ``, the damped Newton step of
        ``L_sum/T + (c/2) ‖θ‖²`` is ``s_c = P^-1 (g + c θ*)``; its length in the posterior's metric,
        ``δ_c² = (g + c θ*)^T P^-1 (g + c θ*)``, minimised over ``c >= 0`` in closed form.
        """
        gradient = gradient / self._temperature
        solved = self.posterior_covariance @ torch.stack([gradient, self.mean], dim=1)
        along_gradient, along_theta = float(gradient @ solved[:, 0]), float(self.mean @ solved[:, 1])
        cross = float(self.mean @ solved[:, 0])
        decay = max(0.0, -cross / along_theta) if along_theta > 0 else 0.0
        decrement = along_gradient + 2 * decay * cross + decay**2 * along_theta
        size = self.mean.numel()
        if decrement > size:
            warnings.warn(
                f"The parameters are not at a minimum of the loss (with any weight decay): a damped Newton "
                f"step on it, P^-1 (∇L/T + cθ), is {math.sqrt(decrement):.3g} posterior standard deviations "
                f"long at best, more than √D = {math.sqrt(size):.3g}. The Laplace approximation expands the "
                "loss around a minimum; train longer.",
                UserWarning,
                stacklevel=3,
            )

    # ----------------------------------------------------------------- properties
    @property
    def prior_precision(self) -> Tensor:
        """The prior precision ``τ``, a 0-dim tensor or ``[G]`` (one per parameter tensor); settable.

        Setting it checks the value as the constructor does.

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data)
            >>> la.prior_precision = [1.0, 2.0]  # weight, bias
            >>> la.prior_precision.tolist()
            [1.0, 2.0]
        """
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Sequence[float] | Tensor) -> None:
        self._prior_precision = self._check_prior_precision(value)

    @property
    def temperature(self) -> float:
        """The temperature ``T > 0``; settable (checked).

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data, temperature=0.5)
            >>> la.temperature
            0.5
        """
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_positive(value, "temperature")

    def _taus(self, prior_precision: Tensor) -> Tensor:
        """``τ`` per parameter tensor, ``[G]``."""
        return prior_precision.expand(len(self._sizes)) if prior_precision.ndim == 0 else prior_precision

    def _mixed(self, block: _Block, prior_precision: Tensor) -> bool:
        """Whether a block spans parameter tensors with their own ``τ`` (then it goes dense)."""
        if prior_precision.ndim == 0 or block.single_group:
            return False
        size = block.op.shape[0]
        if size > _MAX_DENSE_BLOCK:
            names = [self.param_names[g] for g in block.groups.unique().tolist()]
            raise ValueError(
                f"A curvature block of size {size} spans the parameters {names}, which have prior "
                f"precisions of their own; blocks over {_MAX_DENSE_BLOCK} entries are not made dense. "
                "Build the curvature with bias='separate', or give these parameters one precision."
            )
        return True

    def _posterior_blocks(self, prior_precision: Tensor) -> list[tuple[CurvatureOperator, float | None]]:
        """Per block ``(K_b/T, τ_b)``, or ``(Dense(K_b/T + diag τ), None)`` for a mixed block."""
        taus = self._taus(prior_precision)
        result = []
        for block in self._blocks:
            if self._mixed(block, prior_precision):
                matrix = block.dense() / self._temperature + torch.diag(taus[block.groups])
                result.append((Dense(matrix), None))
            else:
                result.append((_scale(block.op, 1.0 / self._temperature), float(taus[block.group])))
        return result

    @property
    def posterior_precision(self) -> CurvatureOperator:
        """``P = K/T + τ I`` as a structured operator (``[D, D]``), damped block by block.

        A block with one ``τ`` is ``K_b/T + τ I`` (a :class:`~curvops.Sum` with a shift, whose
        ``logdet`` and ``inverse`` are exact through ``K_b``'s structure); a block mixing
        several is dense.

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data, prior_precision=2.0)
            >>> p = la.posterior_precision.to_dense()
            >>> torch.allclose(p, la.curvature.to_dense() + 2.0 * torch.eye(6, dtype=torch.float64))
            True
        """
        ops = [
            op if tau is None else Sum([op], shift=tau)
            for op, tau in self._posterior_blocks(self._prior_precision)
        ]
        return self._assemble(ops)

    @property
    def posterior_covariance(self) -> CurvatureOperator:
        """The posterior covariance ``P^-1`` as a structured operator (``[D, D]``), exact block by block.

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data)
            >>> eye = torch.eye(6, dtype=torch.float64)
            >>> torch.allclose(la.posterior_covariance @ la.posterior_precision.to_dense(), eye)
            True
        """
        ops = [
            op.inverse() if tau is None else op.inverse(damping=tau)
            for op, tau in self._posterior_blocks(self._prior_precision)
        ]
        return self._assemble(ops)

    def _power(self, exponent: float, prior_precision: Tensor) -> CurvatureOperator:
        """``P^p`` block by block, exact through each block's eigenvalues."""
        ops = [
            op.power(exponent, damping=0.0 if tau is None else tau)
            for op, tau in self._posterior_blocks(prior_precision)
        ]
        return self._assemble(ops)

    # ----------------------------------------------------------------- evidence
    def _log_marginal_likelihood(self, taus: Tensor, prior_precision: Tensor) -> Tensor:
        """The log marginal likelihood, differentiable in ``taus`` (``[G]``)."""
        temperature = self._temperature
        logdet = taus.new_zeros(())
        for block in self._blocks:
            if self._mixed(block, prior_precision):
                matrix = block.dense() / temperature + torch.diag(taus[block.groups])
                factor, info = torch.linalg.cholesky_ex(matrix)
                if int(info):
                    raise NotPositiveDefiniteError("K/T + diag(τ) is not positive definite.")
                logdet = logdet + 2 * factor.diagonal().log().sum()
            else:
                logdet = logdet + torch.log(block.eigenvalues() / temperature + taus[block.group]).sum()
        log_prior = (self._group_sizes * taus.log()).sum()
        return (
            -self.loss / temperature - 0.5 * (logdet - log_prior) - 0.5 * (taus * self._group_squares).sum()
        )

    def log_marginal_likelihood(
        self, prior_precision: float | Sequence[float] | Tensor | None = None
    ) -> Tensor:
        """Laplace's log evidence: ``log p(D) ≈ -L_sum(θ*)/T - ½ (logdet P - Σ_l D_l log τ_l)
        - ½ Σ_l τ_l ‖θ*_l‖²``.

        The sums run over the parameter tensors ``l`` (``D_l`` entries each); for a scalar
        ``τ`` they are ``D log τ`` and ``τ ‖θ*‖²``. ``logdet P = Σ_b Σ_i log(λ_bi / T + τ_b)``
        over the eigenvalues ``λ_bi`` of each block of ``K`` (computed once and cached), or a
        Cholesky factorisation for a block that mixes several ``τ``. The constant
        ``-(D/2) log 2π`` of the Gaussian integral cancels against the prior's normaliser and
        does not appear.

        Args:
            prior_precision: ``τ`` to evaluate at (default: :attr:`prior_precision`); a number
                or one per parameter tensor.

        Returns:
            A 0-dim tensor.

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data, curvature="full")
            >>> p = la.posterior_precision.to_dense()
            >>> theta = la.mean
            >>> expected = -la.loss - 0.5 * torch.logdet(p) - 0.5 * theta @ theta  # τ = 1
            >>> torch.allclose(la.log_marginal_likelihood(), expected)
            True
        """
        prior_precision = (
            self._prior_precision if prior_precision is None else self._check_prior_precision(prior_precision)
        )
        with torch.no_grad():
            return self._log_marginal_likelihood(self._taus(prior_precision), prior_precision)

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        prior_precision: float | Sequence[float] | Tensor | None = None,
        steps: int = 300,
        lr: float = 0.1,
        grid: Tensor | None = None,
    ) -> Tensor:
        """Choose ``τ`` by the log marginal likelihood; set :attr:`prior_precision` and return it.

        - ``"marglik"``: Adam on ``log τ`` (``steps`` steps, learning rate ``lr`` annealed to
          zero on a cosine schedule) maximising :meth:`log_marginal_likelihood`. Every step
          costs ``O(D)``: ``logdet P = Σ_i log(λ_i / T + τ_l)`` reuses the eigenvalues of ``K``'s
          blocks, computed once (a block that mixes several ``τ`` is refactorised per step).
          The shape of ``τ`` — one number, or one per parameter tensor — is that of the start,
          ``prior_precision`` (default: the current :attr:`prior_precision`).
        - ``"grid"``: the value of ``grid`` (default ``torch.logspace(-4, 4, 100)``) with the
          largest log marginal likelihood. For a per-parameter ``τ`` every parameter tensor gets
          the same grid value.

        Args:
            method: ``"marglik"`` or ``"grid"``.
            prior_precision: the start (marglik) or the shape (grid) of ``τ``.
            steps: Adam steps.
            lr: Adam's initial learning rate on ``log τ``.
            grid: 1-D positive candidate values of ``τ``.

        Returns:
            The new ``τ``, 0-dim or ``[G]``.

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data)
            >>> before = la.log_marginal_likelihood()
            >>> tau = la.optimize_prior_precision()
            >>> bool(la.log_marginal_likelihood() >= before), bool(tau > 0)
            (True, True)
        """
        check_choice(method, PRIOR_METHODS, "prior precision method")
        check_positive_int(steps, "steps")
        check_positive(lr, "lr")
        grid = self._check_grid(grid)
        start = (
            self._prior_precision if prior_precision is None else self._check_prior_precision(prior_precision)
        )
        if method == "grid":
            candidates = [torch.full_like(start, value) for value in grid.tolist()]
            values = torch.stack([self.log_marginal_likelihood(tau) for tau in candidates])
            self._prior_precision = torch.full_like(start, grid[int(values.argmax())].item())
            return self._prior_precision
        log_tau = start.log().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([log_tau], lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                loss = -self._log_marginal_likelihood(self._taus(log_tau.exp()), start)
                loss.backward()
                optimizer.step()
                schedule.step()
        self._prior_precision = self._check_prior_precision(log_tau.detach().exp())
        return self._prior_precision

    def _check_grid(self, grid: Any) -> Tensor:
        """The 1-D grid of candidate ``τ`` (default ``logspace(-4, 4, 100)``); every value ``> 0``."""
        message = f"grid must be a 1-D tensor or sequence of numbers > 0, got {grid!r}."
        if grid is None:
            grid = torch.logspace(-4, 4, 100)
        elif isinstance(grid, (str, bytes, Real)):
            raise TypeError(message)
        try:
            grid = torch.as_tensor(grid)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(message) from error
        if grid.dtype == torch.bool or grid.is_complex():
            raise TypeError(message)
        grid = grid.to(dtype=self.mean.dtype, device=self.mean.device).reshape(-1)
        if grid.numel() == 0:
            raise ValueError("grid is empty.")
        for value in grid.tolist():
            check_positive(value, "every grid value")
        return grid

    # ----------------------------------------------------------------- sampling
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws ``θ* + P^-1/2 z``, ``z ~ N(0, I)``, from the posterior: ``[n, D]``.

        ``P^-1/2`` is exact block by block (``(K_b/T + τ_b I)^-1/2`` through the block's
        eigendecomposition).

        Args:
            n: the number of samples.
            generator: the random source of ``z``.

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data)
            >>> la.sample(5, generator=torch.Generator().manual_seed(0)).shape
            torch.Size([5, 6])
        """
        check_positive_int(n, "n")
        check_generator(generator)
        root = self._power(-0.5, self._prior_precision)
        noise = torch.randn(
            n, self.mean.numel(), generator=generator, dtype=self.mean.dtype, device=self.mean.device
        )
        return (self.mean.unsqueeze(1) + root @ noise.T).T

    # ----------------------------------------------------------------- predictives
    def _prepare_inputs(self, x: Any) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor of inputs, got {type(x).__name__}.")
        if x.is_floating_point():
            x = x.to(dtype=self.mean.dtype, device=self.mean.device)
        else:
            x = x.to(self.mean.device)
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch [B, ...], got shape {list(x.shape)}.")
        return x

    def _forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The model output at ``params``, with a clear error for inputs the model rejects (see
        :meth:`_check_model` for the model's state)."""
        self._check_model()
        try:
            with fixed_forward():
                output = self._model.forward(params, x)
        except NonDeterministicDataError:
            raise
        except (RuntimeError, ValueError, IndexError, TypeError) as error:
            example = self._input_example
            expected = f" (the training inputs had shape {list(example)})" if example else ""
            raise ValueError(
                f"The model rejects inputs of shape {list(x.shape)}{expected}: {error}"
            ) from error
        if tuple(output.shape[1:]) != self._output_shape or output.shape[0] != x.shape[0]:
            raise ValueError(
                f"The model maps inputs of shape {list(x.shape)} to outputs of shape {list(output.shape)}, "
                f"but the training outputs were [B, {', '.join(map(str, self._output_shape))}]."
            )
        return output

    def _check_model(self) -> None:
        """Before a forward pass of the model: raise :class:`~curvops.errors.StaleParametersError`
        if a parameter outside ``θ`` or a buffer, which the model provides, changed since the
        build, and refuse batch normalisation switched to train mode since (which would update
        the model's running statistics)."""
        self._model.check_fresh(chosen=False)
        check_batch_statistics(self.model)

    def _chunks(self, x: Tensor, batch_size: int | None) -> Iterable[tuple[int, Tensor]]:
        """``(start, x[start:stop])`` so that a chunk's Jacobian ``[B, C, D]`` stays bounded."""
        outputs = max(1, math.prod(self._output_shape))
        if batch_size is None:
            batch_size = max(1, _ELEMENTS_PER_CHUNK // (outputs * self.mean.numel()))
        else:
            check_positive_int(batch_size, "batch_size")
        for start in range(0, x.shape[0], batch_size):
            yield start, x[start : start + batch_size]

    def _datum_jacobians(self, x: Tensor) -> Tensor:
        """``J_n = ∂f(x_n)/∂θ`` at ``θ*`` for every datum of ``x``: ``[B, C, D]``, ``C`` the output size."""

        def single(params: dict[str, Tensor], datum: Tensor) -> Tensor:
            return self._model.forward(params, datum.unsqueeze(0)).reshape(-1)

        self._check_model()
        with fixed_forward():
            jac = vmap(jacrev(single), in_dims=(None, 0))(self._theta, x)
        return torch.cat([jac[name].flatten(2) for name in self.param_names], dim=2)

    def glm_distribution(self, x: Tensor, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """The linearised network's Gaussian over the outputs: ``f(x_b) ~ N(f*(x_b), J_b P^-1 J_b^T)``.

        Per chunk of ``batch_size`` test points: the per-datum Jacobians ``J_b`` (``[C, D]``
        each, by ``vmap`` of reverse mode over the data), ``P^-1`` applied to their ``B·C``
        rows at once, and ``Σ_b = J_b (P^-1 J_b^T)``. Never the Jacobian of all test points
        at once: memory ``O(B C D)`` per chunk (default ``B`` keeps it near 2^22 entries).

        Args:
            x: test inputs ``[B, ...]`` shaped like the training inputs.
            batch_size: test points per chunk.

        Returns:
            The pair ``(mean, covariance)`` of ``f*(x)`` flattened to ``[B, C]`` and the
            ``[B, C, C]`` covariances.

        Example:
            >>> model = torch.nn.Linear(2, 3).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 3, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data)
            >>> mean, cov = la.glm_distribution(torch.randn(4, 2, dtype=torch.float64))
            >>> mean.shape, cov.shape
            (torch.Size([4, 3]), torch.Size([4, 3, 3]))
        """
        x = self._prepare_inputs(x)
        mean = self._forward(self._theta, x).detach().reshape(x.shape[0], -1)
        covariance = self.posterior_covariance
        parts = []
        for _, chunk in self._chunks(x, batch_size):
            jac = self._datum_jacobians(chunk)  # [B, C, D]
            rows, outputs = jac.shape[0], jac.shape[1]
            solved = covariance @ jac.reshape(rows * outputs, -1).T  # [D, B*C]
            cov = torch.einsum("bcd,dbe->bce", jac, solved.reshape(-1, rows, outputs))
            parts.append(0.5 * (cov + cov.transpose(1, 2)))
        return mean, torch.cat(parts)

    def predictive(
        self,
        x: Tensor,
        method: str = "glm",
        link_approx: str = "probit",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The posterior predictive at test inputs ``x``.

        Classification (``CrossEntropyLoss``): class probabilities ``[B, C]``. With
        ``method="glm"`` the logits are ``N(μ_b, Σ_b)`` (:meth:`glm_distribution`) and

        - ``link_approx="probit"``: ``softmax(μ_b / sqrt(1 + (π/8) diag Σ_b))``;
        - ``link_approx="mc"``: the mean of ``softmax(μ_b + L_b ε)`` over ``n_samples`` draws,
          ``L_b L_b^T = Σ_b``.

        With ``method="mc"`` the mean of ``softmax(f(x, θ_s))`` over ``n_samples`` posterior
        samples ``θ_s`` (:meth:`sample`). ``BCEWithLogitsLoss`` likewise with the elementwise
        ``sigmoid`` (probit: ``sigmoid(μ / sqrt(1 + (π/8) σ²))``), probabilities of the output's
        shape.

        Regression (``MSELoss``): ``(mean, variance)``, each of the output's shape: with
        ``"glm"`` ``f*(x)`` and ``diag Σ_b`` (``link_approx`` is not used), with ``"mc"`` the
        mean and variance of ``f(x, θ_s)`` over the samples; ``σ²`` added to the variance when
        ``sigma_noise`` was given.

        Args:
            x: test inputs ``[B, ...]`` shaped like the training inputs.
            method: ``"glm"`` or ``"mc"``.
            link_approx: ``"probit"`` or ``"mc"`` (GLM classification).
            n_samples: Monte-Carlo draws (logits for the ``"mc"`` link, weights for ``"mc"``).
            generator: the random source of the draws.
            batch_size: test points per Jacobian chunk (see :meth:`glm_distribution`).

        Example:
            >>> model = torch.nn.Linear(2, 3).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 3, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data)
            >>> probabilities = la.predictive(torch.randn(4, 2, dtype=torch.float64))
            >>> probabilities.shape, torch.allclose(probabilities.sum(1), torch.ones(4, dtype=torch.float64))
            (torch.Size([4, 3]), True)
        """
        check_choice(method, PREDICTIVE_METHODS, "predictive method")
        check_choice(link_approx, LINK_APPROXIMATIONS, "link approximation (link_approx)")
        check_positive_int(n_samples, "n_samples")
        check_generator(generator)
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size")
        x = self._prepare_inputs(x)
        if self.likelihood == "classification" and len(self._output_shape) != 1:
            raise ValueError(
                "predictive needs CrossEntropyLoss outputs of shape [B, C] (classes on axis 1), got "
                f"[B, {', '.join(map(str, self._output_shape))}]."
            )
        shape = (x.shape[0], *self._output_shape)
        noise = 0.0 if self.sigma_noise is None else self.sigma_noise**2
        if method == "mc":
            outputs = self._sampled_outputs(x, n_samples, generator)  # [S, B, ...]
            if self.likelihood == "regression":
                return outputs.mean(0), outputs.var(0, unbiased=False) + noise
            return self._link(outputs).mean(0)
        mean, covariance = self.glm_distribution(x, batch_size)
        variance = covariance.diagonal(dim1=1, dim2=2)
        if self.likelihood == "regression":
            return mean.reshape(shape), variance.reshape(shape) + noise
        if link_approx == "probit":
            return self._link((mean / torch.sqrt(1 + math.pi / 8 * variance)).reshape(shape))
        values, vectors = torch.linalg.eigh(covariance)
        roots = vectors * values.clamp(min=0).sqrt().unsqueeze(1)  # [B, C, C], roots @ roots^T = Σ_b
        draws = torch.randn(n_samples, *mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        logits = mean + torch.einsum("bce,sbe->sbc", roots, draws)
        return self._link(logits.reshape(n_samples, *shape)).mean(0)

    def _link(self, logits: Tensor) -> Tensor:
        """``softmax`` over the class axis (the last but the sample axes), or ``sigmoid``."""
        if self.likelihood == "classification":
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits)

    def _sampled_outputs(self, x: Tensor, n_samples: int, generator: torch.Generator | None) -> Tensor:
        """``f(x, θ_s)`` for ``n_samples`` posterior samples: ``[S, B, ...]``."""
        samples = self.sample(n_samples, generator)
        outputs = []
        with torch.no_grad():
            for theta in samples:
                parts = theta.split(self._sizes)
                params = {
                    name: part.reshape(self._theta[name].shape)
                    for name, part in zip(self.param_names, parts, strict=True)
                }
                outputs.append(self._forward(params, x))
        return torch.stack(outputs)
