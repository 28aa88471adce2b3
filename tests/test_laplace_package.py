"""The helpers the Laplace package moved into ``curvops.nn`` (issue 12, item 5): per-datum
Jacobians (``nn.jacobian.datum_jacobians``/``datum_chunks``) and the summed GGN's diagonal
(``nn.diagonal.summed_ggn_diagonal``), against dense float64 truth from ``torch.func.jacrev``."""

import pytest
import torch
from model_truth import Truth
from torch import nn

import curvops
from curvops.errors import NonDeterministicDataError
from curvops.nn.diagonal import summed_ggn_diagonal
from curvops.nn.jacobian import datum_chunks, datum_jacobians
from curvops.nn.losses import LossAdapter
from curvops.nn.model import ModelData

DOUBLE = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DOUBLE)


def mlp(outputs=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, outputs)).double()


def test_datum_jacobians_are_the_rows_of_the_dense_jacobian():
    model, x = mlp(), randn(6, 4)
    data = ModelData(model, [(x, None)])
    jac = datum_jacobians(data, data.param_dict(), x)
    dense = Truth(model, None, x, None).jacobian()  # [6·3, D], datum-major rows
    assert jac.shape == (6, 3, data.size)
    torch.testing.assert_close(jac.reshape(18, -1), dense, rtol=1e-12, atol=1e-12)


def test_datum_jacobians_at_other_parameter_values():
    """``params`` is where the Jacobian is taken, not the model's own values (Laplace's copy of θ*)."""
    model, x = mlp(), randn(3, 4)
    data = ModelData(model, [(x, None)])
    shifted = {name: p + 0.5 for name, p in data.param_dict().items()}
    other = mlp()
    with torch.no_grad():
        for p, q in zip(other.parameters(), model.parameters(), strict=True):
            p.copy_(q + 0.5)
    dense = Truth(other, None, x, None).jacobian()
    torch.testing.assert_close(datum_jacobians(data, shifted, x).reshape(9, -1), dense)


def test_datum_jacobians_refuse_a_random_forward():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).double()
    data = ModelData(model, [(randn(2, 4), None)])
    with pytest.raises(NonDeterministicDataError, match="random"):
        datum_jacobians(data, data.param_dict(), randn(2, 4))


def test_datum_chunks_cover_the_rows_once():
    x = torch.arange(10.0).reshape(10, 1)
    chunks = list(datum_chunks(x, datum_entries=1, batch_size=4))
    assert [start for start, _ in chunks] == [0, 4, 8]
    assert torch.equal(torch.cat([chunk for _, chunk in chunks]), x)
    default = list(datum_chunks(x, datum_entries=2**21))  # 2 data per chunk of 2^22 entries
    assert [len(chunk) for _, chunk in default] == [2] * 5
    with pytest.raises(ValueError, match="batch_size"):
        list(datum_chunks(x, 1, batch_size=0))


@pytest.mark.parametrize(
    "loss_fn, target",
    [
        (
            nn.CrossEntropyLoss(),
            lambda n: torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(1)),
        ),
        (nn.MSELoss(reduction="sum"), lambda n: randn(n, 3, seed=1)),
        (nn.BCEWithLogitsLoss(), lambda n: (randn(n, 3, seed=1) > 0).double()),
    ],
    ids=["cross-entropy-mean", "mse-sum", "bce-mean"],
)
def test_summed_ggn_diagonal_matches_the_dense_ggn(loss_fn, target):
    """The diagonal of the *summed* loss's GGN whatever the reduction, any batching, empty batches too."""
    model, x = mlp(), randn(7, 4)
    y = target(7)
    batches = [(x[:3], y[:3]), (x[3:3], y[3:3]), (x[3:], y[3:])]
    diagonal = summed_ggn_diagonal(ModelData(model, batches), LossAdapter(loss_fn, likelihood=True))
    summed = type(loss_fn)(reduction="sum")
    expected = Truth(model, summed, x, y).ggn().diagonal()
    assert diagonal.labels == ("0.weight", "0.bias", "2.weight", "2.bias")
    torch.testing.assert_close(diagonal.diagonal(), expected, rtol=1e-10, atol=1e-12)


def test_summed_ggn_diagonal_in_chunks(monkeypatch):
    """A batch larger than a chunk of per-datum Jacobians gives the same diagonal."""
    model, x = mlp(), randn(9, 4)
    y = randn(9, 3, seed=2)
    loss = LossAdapter(nn.MSELoss(), likelihood=True)
    whole = summed_ggn_diagonal(ModelData(model, [(x, y)]), loss).diagonal()
    monkeypatch.setattr("curvops.nn.jacobian.ELEMENTS_PER_CHUNK", 2 * 3 * 43)  # D = 43: 2 data per chunk
    chunked = summed_ggn_diagonal(ModelData(model, [(x, y)]), loss).diagonal()
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)


def test_summed_ggn_diagonal_takes_cross_entropy_over_positions():
    """``[N, C, d]`` logits: one loss-Hessian column per class and position, so the diagonal is the
    exact GGN's (matrix-free, from its own JVPs and VJPs)."""

    class PerPosition(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            h = self.linear(x)
            return (h + h.flip(1)).movedim(-1, 1)  # [N, 3 classes, 2 positions], positions mixed

    model, loss_fn = PerPosition().double(), nn.CrossEntropyLoss(reduction="sum")
    batches = [(randn(2, 2, 4), torch.tensor([[0, 2], [1, 1]]))]
    diagonal = summed_ggn_diagonal(ModelData(model, batches), LossAdapter(loss_fn, likelihood=True))
    exact = curvops.GGN(model, loss_fn, batches).to_dense()
    torch.testing.assert_close(diagonal.diagonal(), exact.diagonal())
