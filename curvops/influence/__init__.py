"""Influence functions: how much each training example helps or hurts the loss on a query.

For a training example ``n`` and a query example ``t`` (any labelled input, e.g. a test
point), the influence score is

``score(t, n) = ∇ℓ_t^T (F + Λ)^-1 ∇ℓ_n``

with

- ``ℓ_n`` the loss of datum ``n`` on its own: a ``torch.nn`` loss with ``reduction="sum"`` on
  that one datum (one row of the model output; its cross-entropy, say, or its squared error
  summed over the output units; another callable's value on the one datum) and ``∇ℓ_n``
  its gradient with respect to the parameters ``θ``, from ``torch.func.vmap(grad(...))``
  over ``functional_call``;
- ``F`` a curvature matrix of the *mean* training loss ``L(θ) = (1/Z) Σ_n ℓ_n`` over
  ``train_data`` (``Z`` the number of terms the mean divides by, see
  :mod:`curvops.nn.losses`: ``Z = N`` for cross-entropy with one class label per datum), as
  curvops builds it for a loss with ``reduction="mean"`` — the convention of kronfluence;
- ``Λ = λI`` for a number ``damping = λ >= 0`` (exact damping: ``F + λI`` is inverted
  exactly through ``F``'s structure), or ``damping="heuristic"``: ``λ_b = 0.1 · tr(F_b) /
  dim(F_b)``, a tenth of the mean eigenvalue, separately for every block ``F_b`` of a
  block-diagonal ``F`` (one per layer for KFAC and its relatives, one per parameter tensor
  for ``"diagonal"``, the whole matrix for ``"ggn"``, ``λ = 0.1`` for ``"identity"``).

What the sign means (to first order in the step):

- a preconditioned gradient step on ``n``, ``θ ← θ - η (F + Λ)^-1 ∇ℓ_n``, changes the query
  loss by ``-η · score(t, n)``: a **positive** score means training on ``n`` lowers ``ℓ_t``
  (``n`` is *helpful* to ``t``, their gradients aligned in the metric ``(F + Λ)^-1``), a
  **negative** score means it raises ``ℓ_t`` (``n`` is *harmful*);
- at a minimum ``θ*`` of ``L``, with ``F`` the Hessian and ``Λ = 0``, upweighting ``n`` — minimising
  ``L + ε ℓ_n`` — changes the query loss at rate ``dℓ_t/dε = -score(t, n)``; removing ``n``
  (``ε = -1/Z``) raises ``ℓ_t`` by about ``score(t, n) / Z`` (``1/N`` of it for
  classification). Koh & Liang's ``I_up,loss(n, t)`` is ``-score(t, n)``.

Costs: the curvature is built once over ``train_data``; then the query gradients are
preconditioned ``query_batch_size`` columns at a time (``(F + Λ)^-1`` applied to a
``[D, K]`` block), and for each such block the training gradients are streamed
``train_batch_size`` at a time and dotted with it. Memory is about
``D · (query_batch_size + train_batch_size)`` numbers; the training gradients are
computed once per query block and never held all at once.

Over shards (:mod:`curvops.distributed`): with a process group (``group=``; by default the
default group when ``torch.distributed`` is initialized, ``group="local"`` for this process
alone), ``train_data`` is this rank's shard of the training set (it may be empty on a rank,
not on all). ``F`` is the union's, built by the builders over every shard, so ``Z``, the
dampings and ``(F + Λ)^-1`` are the same on every rank. The scores are between the queries
given on this rank (usually the same on every rank) and **this rank's training examples**:
:func:`influence_scores` returns ``[M, N_r]`` in the order of the rank's shard, and
:func:`self_influence` ``[N_r]``; gathering the ranks' columns in rank order gives the scores
of one process on the concatenated shards. :func:`leave_one_out_scores` takes ``removed`` as
indices of that concatenation (the same on every rank; a removed example's gradient comes from
its rank), and :func:`top_influences` ranks the union's columns with indices of it. The
training gradients never leave their rank: each rank scores its own shard, the work split as
the data is. A matrix-free prebuilt operator is made dense once, so that every rank's solves
are its own.

Train mode: per-example gradients need a deterministic model that treats each datum on its
own. Batch normalisation in train mode is refused (it would normalise each datum alone and
update its running statistics); dropout in train mode gets a warning, and curvops then
raises :class:`~curvops.errors.NonDeterministicDataError` at the random forward pass. Call
``model.eval()`` first.

The package, one job a module: ``examples`` (per-datum losses and per-example gradients),
``curvature`` (the curvature a name builds, its options, dampings and inverse), ``problem``
(the checked arguments and :func:`influence_curvature`), ``scores`` (:func:`influence_scores`,
:func:`self_influence`, :func:`top_influences`) and ``leave_one_out``
(:func:`leave_one_out_scores`), ``fitted`` (:class:`Influence`: fit once, score many, save and
load) and ``files`` (its state in a torch or safetensors file).
"""

from .curvature import CURVATURES, FISHER_TYPES, HEURISTIC_FACTOR, OWN_ARGUMENTS, Damping
from .fitted import Influence
from .leave_one_out import leave_one_out_scores
from .problem import influence_curvature
from .scores import TopInfluences, influence_scores, self_influence, top_influences

__all__ = [
    "CURVATURES",
    "FISHER_TYPES",
    "HEURISTIC_FACTOR",
    "OWN_ARGUMENTS",
    "Damping",
    "Influence",
    "TopInfluences",
    "influence_curvature",
    "influence_scores",
    "leave_one_out_scores",
    "self_influence",
    "top_influences",
]
