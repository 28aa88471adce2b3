"""Query gradients compressed to rank ``r`` per Kronecker block (``query_rank``): exact at full
rank, the dense formula of the truncated SVD at lower ranks, the error shrinking with the rank."""

import pytest
import torch
from helpers import DOUBLE, generator
from test_influence import CE, _batches, _gradients, _model
from test_influence_measurements import margin
from torch import nn

from curvops.influence import Influence, influence_curvature, influence_scores

DAMPING = 0.1


@pytest.fixture(scope="module")
def data():
    model = _model()
    x = torch.randn(12, 4, generator=generator(0), dtype=DOUBLE)
    y = torch.randint(0, 2, (12,), generator=generator(1))
    xq = torch.randn(5, 4, generator=generator(2), dtype=DOUBLE)
    yq = torch.randint(0, 2, (5,), generator=generator(3))
    return model, _batches(x, y, [5, 7]), (xq, yq), x, y


def _truncated_scores(op, queries, trains, rank, joint):
    """``(F + λI)^-1 ∇m_t`` (dense), each layer's part as its weight matrix (``[W b]`` for a joint
    bias; a separate bias stays a vector, exact), truncated to its top ``rank`` singular triplets
    (``torch.linalg.svd``) where that holds fewer numbers, and dotted with each training
    gradient's part. Parameters in the flat
    order ``W0 [3, 4], b0 [3], W2 [2, 3], b2 [2]``."""
    damped = op.to_dense() + DAMPING * torch.eye(op.shape[0], dtype=DOUBLE)
    preconditioned = torch.linalg.solve(damped, queries)  # [D, M]
    layers = [(0, 3, 4), (15, 2, 3)]  # (offset, n_out, n_in)

    def matrices(columns, offset, n_out, n_in):  # [M, n_out, n_in (+1)]
        weights = columns[offset : offset + n_out * n_in].T.reshape(-1, n_out, n_in)
        bias = columns[offset + n_out * n_in : offset + n_out * n_in + n_out].T.unsqueeze(2)
        return torch.cat([weights, bias], 2) if joint else weights

    total = 0.0
    for offset, n_out, n_in in layers:
        p, g = matrices(preconditioned, offset, n_out, n_in), matrices(trains, offset, n_out, n_in)
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
        low = (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
        if rank * (p.shape[1] + p.shape[2]) >= p.shape[1] * p.shape[2]:
            low = p  # rank r would hold as many numbers as the matrix: kept exact
        total = total + torch.einsum("tij,nij->tn", low, g)
        if not joint:  # the bias, exact
            bias = slice(offset + n_out * n_in, offset + n_out * n_in + n_out)
            total = total + preconditioned[bias].T @ trains[bias]
    return total


@pytest.mark.parametrize(
    ("curvature", "bias"), [("kfac", "joint"), ("ekfac", "separate"), ("ekfac", "joint")]
)
def test_rank_r_is_the_truncated_svd_of_each_block_and_full_rank_is_exact(data, curvature, bias):
    model, train, query, x, y = data
    op = influence_curvature(model, CE, train, curvature, bias=bias)
    exact = influence_scores(model, CE, train, query, op, DAMPING, measurement=margin)
    from test_influence_measurements import _measurement_gradients

    queries, trains = _measurement_gradients(model, margin, *query), _gradients(model, CE, x, y)
    errors = []
    for rank in (1, 2, 3):
        scores = influence_scores(model, CE, train, query, op, DAMPING, measurement=margin, query_rank=rank)
        torch.testing.assert_close(scores, _truncated_scores(op, queries, trains, rank, bias == "joint"))
        errors.append(float((scores - exact).norm() / exact.norm()))
    assert errors[0] > 1e-6 and errors[-1] < 1e-10  # rank 3 >= min(n_out, n_in) of every block
    assert errors == sorted(errors, reverse=True)


def test_per_module_low_rank_parts_sum_to_the_total(data):
    model, train, query, _, _ = data
    influence = Influence(model, CE, train, curvature="kfac", damping=DAMPING)
    total = influence.scores(query, query_rank=1)
    parts = influence.scores(query, query_rank=1, per_module=True)
    torch.testing.assert_close(sum(parts.values()), total)
    assert list(parts) == ["0", "2"]


def test_a_grouped_convolution_is_compressed_per_group():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 2, groups=2), nn.Flatten(), nn.Linear(4 * 4, 2)).to(DOUBLE)
    x = torch.randn(6, 2, 3, 3, generator=generator(5), dtype=DOUBLE)
    y = torch.randint(0, 2, (6,), generator=generator(6))
    exact = influence_scores(model, CE, (x, y), (x[:2], y[:2]), "kfac", DAMPING)
    full = influence_scores(model, CE, (x, y), (x[:2], y[:2]), "kfac", DAMPING, query_rank=9)
    torch.testing.assert_close(full, exact)
    low = influence_scores(model, CE, (x, y), (x[:2], y[:2]), "kfac", DAMPING, query_rank=1)
    assert float((low - exact).norm()) > 0


def test_bad_ranks_and_curvatures_without_blocks_are_refused(data):
    model, train, query, _, _ = data
    with pytest.raises(ValueError, match="query_rank"):
        influence_scores(model, CE, train, query, "kfac", query_rank=0)
    with pytest.raises(ValueError, match="has none"):
        influence_scores(model, CE, train, query, "ggn", DAMPING, query_rank=2)
