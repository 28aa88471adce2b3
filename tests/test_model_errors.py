"""Bad input to the model operators gets a clear error."""

import pytest
import torch
from helpers import DOUBLE
from torch import nn

import curvops


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=DOUBLE)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    return model, nn.CrossEntropyLoss(), [(x[:4], y[:4]), (x[4:], y[4:])]


@pytest.mark.parametrize("op", [curvops.EmpiricalFisher, curvops.FisherMC])
def test_fisher_types_need_a_likelihood_loss(problem, op):
    model, _, data = problem
    with pytest.raises(ValueError, match=r"negative log-likelihood: one of nn\.MSELoss"):
        op(model, nn.L1Loss(), data)
    with pytest.raises(ValueError, match="negative log-likelihood"):
        op(model, lambda o, t: o.sum(), data)


def test_fisher_mc_rejects_weighted_and_smoothed_losses(problem):
    model, _, data = problem
    with pytest.raises(ValueError, match="weighted loss"):
        curvops.FisherMC(model, nn.CrossEntropyLoss(weight=torch.ones(2, dtype=DOUBLE)), data)
    with pytest.raises(ValueError, match="label smoothing"):
        curvops.FisherMC(model, nn.CrossEntropyLoss(label_smoothing=0.1), data)
    with pytest.raises(ValueError, match="mc_samples must be a positive integer"):
        curvops.FisherMC(model, nn.CrossEntropyLoss(), data, mc_samples=0)


def test_unreduced_loss(problem):
    model, _, data = problem
    with pytest.raises(ValueError, match="reduction='none'"):
        curvops.GGN(model, nn.CrossEntropyLoss(reduction="none"), data)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        curvops.GGN(model, "cross-entropy", data)


def test_parameters_not_in_the_model(problem):
    model, loss_fn, data = problem
    stranger = nn.Parameter(torch.zeros(3, dtype=DOUBLE))
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \[3\]\) is not a parameter of the model"):
        curvops.GGN(model, loss_fn, data, params=[model[0].weight, stranger])
    with pytest.raises(ValueError, match="twice"):
        curvops.GGN(model, loss_fn, data, params=[model[0].weight, model[0].weight])
    with pytest.raises(TypeError, match=r"nn\.Module"):
        curvops.Hessian(lambda x: x, loss_fn, data)


def test_empty_or_one_shot_or_malformed_data(problem):
    model, loss_fn, data = problem
    with pytest.raises(ValueError, match="data is empty"):
        curvops.GGN(model, loss_fn, [])
    with pytest.raises(TypeError, match="re-iterable"):
        curvops.GGN(model, loss_fn, iter(data))
    with pytest.raises(TypeError, match=r"Batch 0 must be an \(X, y\) pair"):
        curvops.GGN(model, loss_fn, [data[0][0]])
    ignored = [(data[0][0], torch.full((4,), -100))]
    with pytest.raises(ValueError, match="no loss terms"):
        curvops.GGN(model, loss_fn, ignored)


def test_nan_in_data_output_or_loss(problem):
    model, loss_fn, data = problem
    bad = data[1][0].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="Batch 1: X contains NaN or inf"):
        curvops.GGN(model, loss_fn, [data[0], (bad, data[1][1])])
    nan_loss = lambda o, t: (o - 1).sqrt().sum()  # noqa: E731
    op = curvops.GGN(model, nan_loss, data)
    with pytest.raises(ValueError, match="Batch 0: the loss is nan"):
        op @ torch.zeros(op.shape[0], dtype=DOUBLE)
    with torch.no_grad():
        model[2].bias.fill_(float("inf"))
    op = curvops.Hessian(model, loss_fn, data)
    with pytest.raises(ValueError, match="Batch 0: the model output contains NaN or inf"):
        op @ torch.zeros(op.shape[0], dtype=DOUBLE)


def test_stale_parameters_cannot_be_used(problem):
    model, loss_fn, data = problem
    op = curvops.GGN(model, loss_fn, data)
    inverse = op.inverse(damping=1.0)
    v = torch.ones(op.shape[0], dtype=DOUBLE)
    op @ v
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn(model(data[0][0]), data[0][1]).backward()
    optimizer.step()
    with pytest.raises(curvops.StaleParametersError, match=r"Parameter '0.weight' changed"):
        op @ v
    with pytest.raises(curvops.StaleParametersError):
        inverse @ v
    jac = curvops.Jacobian(model, data)
    model[2].bias.data = torch.zeros(2, dtype=DOUBLE)
    with pytest.raises(curvops.StaleParametersError, match=r"'2\.bias'"):
        jac @ torch.ones(jac.shape[1], dtype=DOUBLE)


def test_shuffled_data_is_detected_when_asked(problem):
    model, loss_fn, data = problem
    x = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3, shuffle=True)
    torch.manual_seed(1)
    op = curvops.GGN(model, loss_fn, loader, check_deterministic=True)
    with pytest.raises(curvops.NonDeterministicDataError, match="shuffling"):
        for _ in range(5):
            op @ torch.ones(op.shape[0], dtype=DOUBLE)
    fixed = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    steady = curvops.GGN(model, loss_fn, fixed, check_deterministic=True)
    torch.testing.assert_close(steady.to_dense(), curvops.GGN(model, loss_fn, data).to_dense())


def test_dropout_in_train_mode_is_reported():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    data = [(torch.randn(5, 3, dtype=DOUBLE), torch.randint(0, 2, (5,)))]
    op = curvops.GGN(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(curvops.NonDeterministicDataError, match=r"dropout.*model\.eval\(\)"):
        op @ torch.ones(op.shape[0], dtype=DOUBLE)
    model.eval()
    op @ torch.ones(op.shape[0], dtype=DOUBLE)


def test_changing_outputs_are_detected_when_asked():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2).double()
            self.calls = 0.0  # a plain attribute: a changed buffer would be a stale operator

        def forward(self, x):
            return self.linear(x) + self.calls

    model = Noisy()
    data = [(torch.randn(5, 3, dtype=DOUBLE), torch.randint(0, 2, (5,)))]
    op = curvops.GGN(model, nn.CrossEntropyLoss(), data, check_deterministic=True)
    v = torch.ones(op.shape[0], dtype=DOUBLE)
    op @ v
    model.calls += 1.0
    with pytest.raises(curvops.NonDeterministicDataError, match="model output changed"):
        op @ v


def test_model_operators_have_no_state_dict(problem):
    model, loss_fn, data = problem
    with pytest.raises(TypeError, match="no state dict"):
        curvops.GGN(model, loss_fn, data).state_dict()


def test_jacobian_input_checks(problem):
    model, _, data = problem
    jac = curvops.Jacobian(model, data)
    assert jac.shape == (12, 26)
    with pytest.raises(ValueError, match=r"\[26\] or \[26, K\], got \[12\]"):
        jac @ torch.ones(12, dtype=DOUBLE)
    with pytest.raises(ValueError, match=r"\[12\] or \[12, K\], got \[26\]"):
        jac.T @ torch.ones(26, dtype=DOUBLE)
