"""Influence with a query measurement and per-module scores against dense ground truth (float64):
``∇m_t^T (F + λI)^-1 ∇ℓ_n`` with ``∇m_t`` from a python loop of ``torch.autograd.grad`` of the
measurement, ``F`` from ``torch.func`` (:class:`Truth`) or the operator's ``to_dense()``."""

import pytest
import torch
from helpers import DOUBLE, generator
from model_truth import Truth
from test_influence import CE, _batches, _dense_scores, _gradients, _model
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from curvops.influence import influence_curvature, influence_scores, leave_one_out_scores

DAMPING = 0.1


def margin(output, target):
    """``f_y - max_{c≠y} f_c`` per example."""
    true = output.gather(1, target.unsqueeze(1)).squeeze(1)
    others = output.scatter(1, target.unsqueeze(1), float("-inf"))
    return true - others.max(dim=1).values


@pytest.fixture(scope="module")
def data():
    model = _model()
    x = torch.randn(12, 4, generator=generator(0), dtype=DOUBLE)
    y = torch.randint(0, 2, (12,), generator=generator(1))
    xq = torch.randn(5, 4, generator=generator(2), dtype=DOUBLE)
    yq = torch.randint(0, 2, (5,), generator=generator(3))
    return model, x, y, xq, yq


def _measurement_gradients(model, measurement, x, y):
    """``[D, M]``: each query's measurement differentiated on its own."""
    columns = []
    for n in range(len(x)):
        parts = torch.autograd.grad(
            measurement(model(x[n : n + 1]), y[n : n + 1]).sum(), list(model.parameters())
        )
        columns.append(torch.cat([p.reshape(-1) for p in parts]))
    return torch.stack(columns, dim=1)


def test_a_margin_measurement_is_the_dense_formula(data):
    model, x, y, xq, yq = data
    ggn = Truth(model, CE, x, y).ggn()
    expected = _dense_scores(
        ggn + DAMPING * torch.eye(ggn.shape[0], dtype=DOUBLE),
        _measurement_gradients(model, margin, xq, yq),
        _gradients(model, CE, x, y),
    )
    query = DataLoader(TensorDataset(xq, yq), batch_size=2)  # uneven batches: 2, 2, 1
    scores = influence_scores(
        model, CE, _batches(x, y, [5, 7]), query, "ggn", DAMPING, measurement=margin, query_batch_size=3
    )
    torch.testing.assert_close(scores, expected)


def test_the_per_example_loss_as_measurement_is_the_default(data):
    model, x, y, xq, yq = data
    train, query = _batches(x, y, [5, 7]), (xq, yq)
    default = influence_scores(model, CE, train, query, "kfac", DAMPING)
    measured = influence_scores(
        model,
        CE,
        train,
        query,
        "kfac",
        DAMPING,
        measurement=lambda o, t: F.cross_entropy(o, t, reduction="none"),
    )
    torch.testing.assert_close(measured, default, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_per_module_scores_are_the_blocks_products_and_sum_to_the_total(data, bias):
    model, x, y, xq, yq = data
    train, query = _batches(x, y, [5, 7]), (xq, yq)
    op = influence_curvature(model, CE, train, "kfac", bias=bias)
    total = influence_scores(model, CE, train, query, op, DAMPING, measurement=margin)
    parts = influence_scores(model, CE, train, query, op, DAMPING, measurement=margin, per_module=True)
    assert list(parts) == list(op.labels)
    torch.testing.assert_close(sum(parts.values()), total)
    dense = op.to_dense()
    queries, trains = _measurement_gradients(model, margin, xq, yq), _gradients(model, CE, x, y)
    start = 0
    for label, size in zip(op.labels, op.block_sizes, strict=True):
        index = _block_indices(op, start, size)
        block = dense[index][:, index] + DAMPING * torch.eye(size, dtype=DOUBLE)
        torch.testing.assert_close(parts[label], _dense_scores(block, queries[index], trains[index]))
        start += size


def _block_indices(op, start, size):
    """The flat parameter indices of block rows ``start .. start + size`` (through the permutation)."""
    from curvops.linalg import block_layout

    layout = block_layout(op)
    order = torch.arange(op.shape[0]) if layout.permutation is None else layout.permutation
    return order[start : start + size]


def test_an_operator_without_blocks_is_split_by_module(data):
    model, x, y, xq, yq = data
    train, query = _batches(x, y, [5, 7]), (xq, yq)
    total = influence_scores(model, CE, train, query, "ggn", DAMPING)
    parts = influence_scores(model, CE, train, query, "ggn", DAMPING, per_module=True)
    assert list(parts) == ["0", "2"]
    torch.testing.assert_close(sum(parts.values()), total)
    ggn = Truth(model, CE, x, y).ggn()
    damped = ggn + DAMPING * torch.eye(ggn.shape[0], dtype=DOUBLE)
    preconditioned = torch.linalg.solve(damped, _gradients(model, CE, xq, yq))  # (F + λI)^-1 ∇ℓ_t
    trains = _gradients(model, CE, x, y)
    torch.testing.assert_close(parts["0"], preconditioned[:15].T @ trains[:15])  # layer 0: 15 entries


def test_bad_measurements_are_refused_with_the_batch(data):
    model, x, y, xq, yq = data
    train, query = (x, y), (xq, yq)
    with pytest.raises(TypeError, match="measurement must be a callable"):
        influence_scores(model, CE, train, query, "kfac", measurement="margin")
    with pytest.raises(
        ValueError, match=r"query_data batch 0: measurement must return one value per example"
    ):
        influence_scores(model, CE, train, query, "kfac", measurement=lambda o, t: o.sum())
    with pytest.raises(ValueError, match="query_data batch 0: measurement failed"):
        influence_scores(model, CE, train, query, "kfac", measurement=lambda o, t: o[:, 5].sum(1))
    with pytest.raises(TypeError, match="per_module"):
        influence_scores(model, CE, train, query, "kfac", per_module="yes")


def test_a_sequence_models_token_logit_measurement():
    """A measurement of ``[N, C, S]`` outputs: the summed log-probability of the targets over the
    kept positions (padding ``-100`` left out), against the dense formula."""
    torch.manual_seed(3)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return self.lin(x).transpose(1, 2)  # [N, 4, S]

    model = Tokens().double()
    x = torch.randn(6, 5, 3, generator=generator(4), dtype=DOUBLE)
    y = torch.randint(0, 4, (6, 5), generator=generator(5))
    y[0, 3:] = -100
    loss = nn.CrossEntropyLoss(ignore_index=-100)

    def log_likelihood(output, target):
        kept = target != -100
        log_p = output.log_softmax(1).gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
        return (log_p * kept).sum(1)

    scores = influence_scores(model, loss, (x, y), (x[:2], y[:2]), "ggn", DAMPING, measurement=log_likelihood)
    ggn = Truth(model, loss, x, y).ggn()
    expected = _dense_scores(
        ggn + DAMPING * torch.eye(ggn.shape[0], dtype=DOUBLE),
        _measurement_gradients(model, log_likelihood, x[:2], y[:2]),
        _gradients(model, loss, x, y),
    )
    torch.testing.assert_close(scores, expected)


def test_leave_one_out_takes_the_measurement(data):
    """With the per-example loss as measurement, the default; with a margin, the dense downdate."""
    model, x, y, xq, yq = data
    train, query = _batches(x, y, [5, 7]), (xq, yq)
    per_example = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731
    default = leave_one_out_scores(model, CE, train, query, removed=2, damping=DAMPING)
    measured = leave_one_out_scores(
        model, CE, train, query, removed=2, damping=DAMPING, measurement=per_example
    )
    torch.testing.assert_close(measured, default, rtol=1e-12, atol=1e-14)
    trains = _gradients(model, CE, x, y)
    fisher = (trains @ trains.T - trains[:, 2:3] @ trains[:, 2:3].T) / len(y)
    damped = fisher + DAMPING * torch.eye(fisher.shape[0], dtype=DOUBLE)
    expected = _dense_scores(damped, _measurement_gradients(model, margin, xq, yq), trains)
    scores = leave_one_out_scores(model, CE, train, query, removed=2, damping=DAMPING, measurement=margin)
    torch.testing.assert_close(scores, expected)


class _Tokens(nn.Module):
    """``[N, S, 3]`` to logits ``[N, 4, S]``: a token-wise linear layer and a head."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(3, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x))).transpose(1, 2)


def _token_problem():
    torch.manual_seed(3)
    model = _Tokens().double()
    x = torch.randn(6, 5, 3, generator=generator(4), dtype=DOUBLE)
    y = torch.randint(0, 4, (6, 5), generator=generator(5))
    y[0, 3:] = -100
    y[4, :2] = -100
    return model, x, y, nn.CrossEntropyLoss(ignore_index=-100)


def test_per_token_scores_are_each_positions_gradient_and_sum_to_the_datums():
    model, x, y, loss = _token_problem()
    train, query = [(x[:4], y[:4]), (x[4:], y[4:])], (x[:2], y[:2])
    scores = influence_scores(model, loss, train, query, "ggn", DAMPING, per_token=True)
    assert scores.shape == (2, 6, 5)
    torch.testing.assert_close(scores.sum(-1), influence_scores(model, loss, train, query, "ggn", DAMPING))
    ggn = Truth(model, loss, x, y).ggn()
    preconditioned = torch.linalg.solve(
        ggn + DAMPING * torch.eye(ggn.shape[0], dtype=DOUBLE), _gradients(model, loss, *query)
    )
    params = list(model.parameters())
    for n in range(6):
        for s in range(5):
            if y[n, s] == -100:
                assert torch.all(scores[:, n, s] == 0)
                continue
            token_loss = F.cross_entropy(model(x[n : n + 1])[:, :, s], y[n : n + 1, s], reduction="sum")
            gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(token_loss, params)])
            torch.testing.assert_close(scores[:, n, s], preconditioned.T @ gradient)


def test_per_token_goes_with_per_module_and_low_rank_and_refuses_targets_without_tokens():
    model, x, y, loss = _token_problem()
    train, query = (x, y), (x[:2], y[:2])
    parts = influence_scores(
        model, loss, train, query, "kfac", DAMPING, per_token=True, per_module=True, query_rank=1
    )
    assert list(parts) == ["lin", "head"] and parts["lin"].shape == (2, 6, 5)
    whole = influence_scores(model, loss, train, query, "kfac", DAMPING, per_token=True, query_rank=1)
    torch.testing.assert_close(sum(parts.values()), whole)
    classifier, xs, ys = _model(), torch.randn(4, 4, dtype=DOUBLE), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match=r"per_token needs targets \[N, S\]"):
        influence_scores(classifier, CE, (xs, ys), (xs, ys), "kfac", per_token=True)
    uneven = [(x[:3], y[:3]), (x[3:, :4], y[3:, :4])]
    with pytest.raises(ValueError, match="padded to the same length"):
        influence_scores(model, loss, uneven, query, "kfac", per_token=True)
