"""Influence functions against dense ground truth written here: per-example gradients from a
python loop of ``torch.autograd.grad``, curvature from ``torch.func`` (:class:`Truth`) or from
the same operator's ``to_dense()``, and ``torch.linalg.solve``."""

import pytest
import torch
from helpers import DOUBLE, generator
from model_truth import Truth
from torch import nn

import curvops
from curvops.influence import (
    influence_curvature,
    influence_scores,
    leave_one_out_scores,
    self_influence,
    top_influences,
)

CE = nn.CrossEntropyLoss()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


@pytest.fixture(scope="module")
def problem():
    """A model, 12 training and 5 query points, and their batched data sets."""
    model = _model()
    x = torch.randn(12, 4, generator=generator(0), dtype=DOUBLE)
    y = torch.randint(0, 2, (12,), generator=generator(1))
    xq = torch.randn(5, 4, generator=generator(2), dtype=DOUBLE)
    yq = torch.randint(0, 2, (5,), generator=generator(3))
    train = _batches(x, y, [5, 7])
    query = _batches(xq, yq, [2, 3])
    return model, x, y, xq, yq, train, query


def _batches(x, y, sizes):
    return list(zip(x.split(sizes), y.split(sizes), strict=True))


def _gradients(model, loss_fn, x, y, params=None):
    """``[D, N]``: each datum's summed loss differentiated on its own."""
    params = list(model.parameters()) if params is None else params
    summed = type(loss_fn)(reduction="sum")
    columns = []
    for n in range(len(x)):
        parts = torch.autograd.grad(summed(model(x[n : n + 1]), y[n : n + 1]), params)
        columns.append(torch.cat([p.reshape(-1) for p in parts]))
    return torch.stack(columns, dim=1)


def _dense_scores(matrix, query_gradients, train_gradients):
    """``G_q^T M^-1 G_n`` for a damped dense ``M``."""
    return query_gradients.T @ torch.linalg.solve(matrix, train_gradients)


def _eye(size):
    return torch.eye(size, dtype=DOUBLE)


def _heuristic(block):
    return block + 0.1 * block.trace() / block.shape[0] * _eye(block.shape[0])


@pytest.mark.parametrize("damping", [1e-2, "heuristic"])
def test_exact_ggn_scores(problem, damping):
    model, x, y, xq, yq, train, query = problem
    ggn = Truth(model, CE, x, y).ggn()  # the mean loss: (1/N) Σ_n J_n^T Λ_n J_n
    damped = _heuristic(ggn) if damping == "heuristic" else ggn + damping * _eye(len(ggn))
    expected = _dense_scores(damped, _gradients(model, CE, xq, yq), _gradients(model, CE, x, y))
    scores = influence_scores(model, CE, train, query, curvature="ggn", damping=damping)
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("name", ["kfac", "ekfac", "tkfac", "tekfac"])
def test_structured_scores_match_their_dense_operator(problem, name, bias):
    model, x, y, xq, yq, train, query = problem
    build = {
        "kfac": curvops.KFAC,
        "ekfac": curvops.EKFAC,
        "tkfac": curvops.TKFAC,
        "tekfac": lambda *a, **k: curvops.TKFAC(*a, eigenvalue_correction=True, **k),
    }[name]
    op = build(model, CE, train, fisher_type="type-2", bias=bias)
    expected = _dense_scores(
        op.to_dense() + 1e-2 * _eye(op.shape[0]), _gradients(model, CE, xq, yq), _gradients(model, CE, x, y)
    )
    scores = influence_scores(model, CE, train, query, curvature=name, damping=1e-2, bias=bias)
    torch.testing.assert_close(scores, expected)
    prebuilt = influence_scores(model, CE, train, query, curvature=op, damping=1e-2)
    torch.testing.assert_close(prebuilt, expected)


def test_identity_is_gradient_dot_products(problem):
    model, x, y, xq, yq, train, query = problem
    dots = _gradients(model, CE, xq, yq).T @ _gradients(model, CE, x, y)
    torch.testing.assert_close(influence_scores(model, CE, train, query, "identity", damping=0.0), dots)
    torch.testing.assert_close(influence_scores(model, CE, train, query, "identity", 0.5), dots / 1.5)
    torch.testing.assert_close(influence_scores(model, CE, train, query, "identity"), dots / 1.1)


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_diagonal_and_exact_of_each_fisher_type(problem, fisher_type):
    model, x, y, xq, yq, train, query = problem
    g, gq = _gradients(model, CE, x, y), _gradients(model, CE, xq, yq)
    truth = Truth(model, CE, x, y)
    exact = truth.ggn() if fisher_type == "type-2" else g @ g.T / len(x)
    if fisher_type == "empirical":
        torch.testing.assert_close(exact, truth.empirical_fisher())
    scores = influence_scores(model, CE, train, query, "ggn", 1e-2, fisher_type=fisher_type)
    torch.testing.assert_close(scores, _dense_scores(exact + 1e-2 * _eye(len(exact)), gq, g))
    op = influence_curvature(model, CE, train, "diagonal", fisher_type=fisher_type)
    assert op.labels == ("0.weight", "0.bias", "2.weight", "2.bias")
    torch.testing.assert_close(op.diagonal(), exact.diagonal())
    # heuristic: a tenth of the mean diagonal entry of each parameter tensor
    blocks = [torch.diag(part) for part in exact.diagonal().split([12, 3, 6, 2])]
    damped = torch.block_diag(*[_heuristic(b) for b in blocks])
    scores = influence_scores(model, CE, train, query, "diagonal", fisher_type=fisher_type)
    torch.testing.assert_close(scores, _dense_scores(damped, gq, g))


def test_monte_carlo_fisher(problem):
    model, x, y, xq, yq, train, query = problem
    fisher = curvops.FisherMC(model, CE, train).to_dense()
    expected = _dense_scores(
        fisher + 1e-2 * _eye(len(fisher)), _gradients(model, CE, xq, yq), _gradients(model, CE, x, y)
    )
    torch.testing.assert_close(
        influence_scores(model, CE, train, query, "ggn", 1e-2, fisher_type="mc"), expected
    )
    kfac = curvops.KFAC(model, CE, train, fisher_type="mc", bias="joint").to_dense()
    expected = _dense_scores(
        kfac + 1e-2 * _eye(len(kfac)), _gradients(model, CE, xq, yq), _gradients(model, CE, x, y)
    )
    torch.testing.assert_close(
        influence_scores(model, CE, train, query, "kfac", 1e-2, fisher_type="mc"), expected
    )


def test_heuristic_damping_is_per_block():
    model = _model()
    x = torch.randn(10, 4, generator=generator(0), dtype=DOUBLE)
    y = torch.randint(0, 2, (10,), generator=generator(1))
    train, query = [(x, y)], (x[:3], y[:3])
    g = _gradients(model, CE, x, y)
    for bias in ("joint", "separate"):
        op = curvops.EKFAC(model, CE, train, fisher_type="type-2", bias=bias)
        damped = torch.block_diag(*[_heuristic(block.to_dense()) for block in op.blocks])
        scores = influence_scores(model, CE, train, query, "ekfac", bias=bias)
        torch.testing.assert_close(scores, _dense_scores(damped, g[:, :3], g))
    # a params order that splits a layer's weight from its bias: KFAC permutes the whole operator
    params = [model[0].weight, model[2].weight, model[0].bias, model[2].bias]
    op = curvops.KFAC(model, CE, train, params=params, fisher_type="type-2", bias="joint")
    assert isinstance(op, curvops.Permuted)
    inverse_permutation = op.permutation.argsort()
    inner = torch.block_diag(*[_heuristic(block.to_dense()) for block in op.op.blocks])
    damped = inner[inverse_permutation][:, inverse_permutation]
    g = _gradients(model, CE, x, y, params)
    scores = influence_scores(model, CE, train, query, "kfac", params=params)
    torch.testing.assert_close(scores, _dense_scores(damped, g[:, :3], g))


def test_mean_curvature_and_summed_datum_losses_for_mse():
    """F is the curvature of the mean over Z = N·K elements; ℓ_n sums the datum's squares,
    whatever the loss's own reduction."""
    model = _model()
    x = torch.randn(7, 4, generator=generator(0), dtype=DOUBLE)
    y = torch.randn(7, 2, generator=generator(1), dtype=DOUBLE)
    ggn = Truth(model, nn.MSELoss(), x, y).ggn()
    torch.testing.assert_close(ggn, Truth(model, nn.MSELoss(reduction="sum"), x, y).ggn() / 14)
    g = _gradients(model, nn.MSELoss(), x, y)
    expected = _dense_scores(ggn + 1e-2 * _eye(len(ggn)), g, g)
    for reduction in ("mean", "sum"):
        loss_fn = nn.MSELoss(reduction=reduction)
        scores = influence_scores(model, loss_fn, (x, y), (x, y), "ggn", 1e-2)
        torch.testing.assert_close(scores, expected)
        assert loss_fn.reduction == reduction  # the caller's loss is left alone


def test_batching_invariance(problem):
    model, x, y, xq, yq, train, query = problem
    reference = influence_scores(model, CE, train, query, "ekfac", 1e-3)
    for train_size, query_size in [(1, 1), (3, 2), (100, 100)]:
        scores = influence_scores(
            model, CE, _batches(x, y, [1, 4, 7]), (xq, yq), "ekfac", 1e-3,
            train_batch_size=train_size, query_batch_size=query_size,
        )  # fmt: skip
        torch.testing.assert_close(scores, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", ["kfac", "ggn"])
def test_self_influence_is_the_diagonal(problem, curvature):
    model, *_, train, _ = problem
    full = influence_scores(model, CE, train, train, curvature)
    own = self_influence(model, CE, train, curvature, train_batch_size=5)
    torch.testing.assert_close(own, full.diagonal())
    assert bool((own > 0).all())


def test_matrix_free_operator_uses_cg(problem):
    model, *_, train, query = problem
    ggn = curvops.GGN(model, CE, train)
    scores = influence_scores(model, CE, train, query, ggn, 1e-1)
    expected = influence_scores(model, CE, train, query, "ggn", 1e-1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-8)


def test_sign_first_order_effect_of_a_step(problem):
    """A step θ - η (F + λI)^-1 ∇ℓ_n changes ℓ_t by -η score(t, n) to first order."""
    model, x, y, xq, yq, train, query = problem
    damping, eta, n = 1e-2, 1e-6, 4
    scores = influence_scores(model, CE, train, query, "ggn", damping)
    ggn = Truth(model, CE, x, y).ggn()
    step = torch.linalg.solve(ggn + damping * _eye(len(ggn)), _gradients(model, CE, x, y)[:, n])
    moved = _model()
    with torch.no_grad():
        flat = torch.nn.utils.parameters_to_vector(model.parameters())
        torch.nn.utils.vector_to_parameters(flat - eta * step, moved.parameters())
    summed = nn.CrossEntropyLoss(reduction="none")
    change = summed(moved(xq), yq) - summed(model(xq), yq)
    torch.testing.assert_close(change.detach() / eta, -scores[:, n], rtol=1e-4, atol=1e-6)


def test_top_influences():
    scores = torch.randn(4, 9, generator=generator(0), dtype=DOUBLE)
    top = top_influences(scores, k=3)
    order = scores.argsort(dim=1, descending=True)
    assert torch.equal(top.helpful, order[:, :3])
    assert torch.equal(top.harmful, order.flip(1)[:, :3])
    torch.testing.assert_close(top.helpful_scores, scores.gather(1, order[:, :3]))
    torch.testing.assert_close(top.harmful_scores, scores.gather(1, order.flip(1)[:, :3]))
    single = top_influences(scores[0], k=9)
    assert torch.equal(single.helpful, order[0]) and single.helpful.shape == (9,)
    for k in (0, 10, 1.5, True):
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, 9\]"):
            top_influences(scores, k)
    with pytest.raises(ValueError, match="NaN"):
        top_influences(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="floating-point"):
        top_influences(torch.tensor([1, 2]), 1)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("damping", [1e-2, "heuristic"])
def test_leave_one_out_equals_recomputation(problem, damping, renormalize):
    model, x, y, xq, yq, train, query = problem
    g, gq = _gradients(model, CE, x, y), _gradients(model, CE, xq, yq)
    fisher = g @ g.T / 12
    lam = 0.1 * fisher.trace() / len(fisher) if damping == "heuristic" else damping  # the full F's
    removed = [3, -1]
    scores = leave_one_out_scores(
        model, CE, train, query, removed, damping=damping, renormalize=renormalize, query_batch_size=3
    )
    assert scores.shape == (2, 5, 12)
    for r, result in zip([3, 11], scores, strict=True):
        keep = torch.arange(12) != r
        without = g[:, keep] @ g[:, keep].T / (11 if renormalize else 12)
        expected = _dense_scores(without + lam * _eye(len(without)), gq, g)
        torch.testing.assert_close(result, expected)
    single = leave_one_out_scores(model, CE, train, query, 3, damping=damping, renormalize=renormalize)
    torch.testing.assert_close(single, scores[0])


def test_leave_one_out_matches_a_fisher_rebuilt_without_the_example(problem):
    model, x, y, xq, yq, train, query = problem
    keep = torch.arange(12) != 5
    rebuilt = curvops.EmpiricalFisher(model, CE, [(x[keep], y[keep])])  # mean over the 11 left
    expected = influence_scores(model, CE, (x, y), query, rebuilt, 1e-2)
    scores = leave_one_out_scores(model, CE, train, query, 5, damping=1e-2, renormalize=True)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-8)  # rebuilt: CG
    # any operator: F minus the example's empirical-Fisher share
    op = curvops.KFAC(model, CE, train, fisher_type="type-2")
    u = _gradients(model, CE, x[5:6], y[5:6])[:, 0]
    downdated = op.to_dense() - torch.outer(u, u) / 12 + 1e-1 * _eye(op.shape[0])
    expected = _dense_scores(downdated, _gradients(model, CE, xq, yq), _gradients(model, CE, x, y))
    torch.testing.assert_close(leave_one_out_scores(model, CE, train, query, 5, op, 1e-1), expected)


# ---------------------------------------------------------------------------------- errors


def test_input_errors(problem):
    model, x, y, xq, yq, train, query = problem
    with pytest.raises(
        ValueError, match=r"query_data batch 0: the model cannot take inputs of shape \[5, 6\]"
    ):
        influence_scores(model, CE, train, (torch.randn(5, 6, dtype=DOUBLE), yq), "identity")
    with pytest.raises(
        ValueError, match=r"train_data batch 1: the model cannot take inputs of shape \[7, 3\]"
    ):
        self_influence(model, CE, [train[0], (x[5:, :3], y[5:])], "identity")
    with pytest.raises(ValueError, match=r"loss cannot compare.*outputs of shape \[5, 2\].*targets of shape"):
        influence_scores(model, CE, train, (xq, torch.zeros(5, 3, 2)), "identity")
    with pytest.raises(ValueError, match=r"one row per target, 4 of them"):
        influence_scores(model, CE, train, (xq, yq[:4]), "identity")
    with pytest.raises(ValueError, match="train_data is empty"):
        influence_scores(model, CE, [], query, "identity")
    with pytest.raises(ValueError, match="query_data is empty"):
        influence_scores(model, CE, train, [], "identity")
    with pytest.raises(ValueError, match="query_data holds no examples"):
        influence_scores(model, CE, train, (xq[:0], yq[:0]), "identity")
    with pytest.raises(TypeError, match="query_data must be a re-iterable"):
        influence_scores(model, CE, train, (b for b in query), "identity")
    with pytest.raises(TypeError, match="train_data must be a re-iterable"):
        influence_scores(model, CE, 3, query, "identity")


def test_argument_errors(problem):
    model, *_, train, query = problem
    with pytest.raises(ValueError, match=r"shape \(5, 5\), but the parameters have D = 23"):
        influence_scores(model, CE, train, query, curvops.Identity(5, dtype=DOUBLE))
    with pytest.raises(ValueError, match="float32"):
        influence_scores(model, CE, train, query, curvops.Identity(23, dtype=torch.float32))
    with pytest.raises(TypeError, match="curvature must be one of"):
        influence_scores(model, CE, train, query, torch.eye(23, dtype=DOUBLE))
    with pytest.raises(ValueError, match="Unknown curvature 'hessian'"):
        influence_scores(model, CE, train, query, "hessian")
    with pytest.raises(ValueError, match="Unknown fisher_type"):
        self_influence(model, CE, train, "kfac", fisher_type="forward-only")
    with pytest.raises(ValueError, match="Unknown bias"):
        influence_curvature(model, CE, train, "kfac", bias="shared")
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        influence_scores(model, CE, train, query, "identity", damping=-1.0)
    with pytest.raises(ValueError, match="damping must be a number >= 0 or 'heuristic'"):
        self_influence(model, CE, train, "identity", damping="auto")
    with pytest.raises(ValueError, match="train_batch_size must be a positive integer"):
        influence_scores(model, CE, train, query, "identity", train_batch_size=0)
    with pytest.raises(ValueError, match="query_batch_size must be a positive integer"):
        influence_scores(model, CE, train, query, "identity", query_batch_size=2.5)
    with pytest.raises(curvops.SingularOperatorError, match="damping > 0"):
        influence_scores(model, CE, train, query, "ggn", damping=0.0, fisher_type="empirical")
    with pytest.raises(IndexError, match="removed index 12 is out of range for 12"):
        leave_one_out_scores(model, CE, train, query, 12)
    for removed in ([], [1.0], "3", True, torch.tensor([0.5])):
        with pytest.raises(ValueError, match="removed must be a training index"):
            leave_one_out_scores(model, CE, train, query, removed)

    def summed(output, target):
        return nn.functional.cross_entropy(output, target, reduction="sum")

    summed.reduction = "sum"
    with pytest.raises(ValueError, match=r"reduction='sum'.*mean training loss"):
        influence_scores(model, summed, train, query, "identity")


def test_train_mode_layers():
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=DOUBLE), torch.randint(0, 2, (6,))
    dropout = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 2)).double()
    with pytest.warns(UserWarning, match="train mode and has Dropout"):
        with pytest.raises(curvops.NonDeterministicDataError, match=r"model\.eval"):
            self_influence(dropout, CE, (x, y), "identity")
    own = self_influence(dropout.eval(), CE, (x, y), "identity")
    assert own.shape == (6,)
    normed = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()
    with pytest.raises(ValueError, match=r"batch normalisation.*model\.eval"):
        self_influence(normed, CE, (x, y), "identity")
    assert self_influence(normed.eval(), CE, (x, y), "identity").shape == (6,)
