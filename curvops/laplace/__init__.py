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

Over :mod:`curvops.distributed` shards (``group=``) each rank passes its shard of the
training data; ``K``, ``L_sum(θ*)``, its gradient and ``N`` are the union's, so every rank
holds the posterior of all the data (see :class:`Laplace`).

This follows the conventions of ``laplace-torch`` (Daxberger et al., 2021) for the
marginal likelihood and the predictives.

The package, one job per module: ``curvature`` (the pass over the data at ``θ*`` and the
curvature operator), ``posterior`` (the blocks of ``K``, the prior, ``P``, ``P^-1``, ``P^p`` and
the evidence), ``tuning`` (choosing ``τ``), ``network`` (the model at the copy of ``θ*``:
checked inputs, per-datum Jacobians from :func:`curvops.nn.jacobian.datum_jacobians`),
``predictive`` (the GLM, Laplace-bridge and Monte-Carlo predictives), ``noise`` (a Gaussian's
``σ`` as a variable), ``saved`` (the ``state_dict``), ``approximation`` (:class:`Laplace`, which
puts them together) and ``online`` (:class:`OnlineMarglik`: hyperparameters learned during
training). The diagonal GGN is built in :mod:`curvops.nn.diagonal`.
"""

from .approximation import Laplace
from .curvature import CURVATURES
from .online import OnlineMarglik
from .predictive import LINK_APPROXIMATIONS, PREDICTIVE_METHODS
from .tuning import PRIOR_METHODS

__all__ = [
    "CURVATURES",
    "LINK_APPROXIMATIONS",
    "PREDICTIVE_METHODS",
    "PRIOR_METHODS",
    "Laplace",
    "OnlineMarglik",
]
