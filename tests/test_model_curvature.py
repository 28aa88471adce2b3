"""Hessian, GGN, EmpiricalFisher, FisherMC and Jacobian against dense torch.func ground truth.

Ground truth is computed on the whole data set at once (reverse-over-reverse ``jacrev``),
while the operators see it in uneven batches.
"""

import pytest
import torch
from helpers import DOUBLE, dense_inverse, dense_logdet, generator
from model_truth import Truth
from torch import nn

import curvops

N = 8
BATCHES = [3, 1, 4]


class ClassesFirst(nn.Module):
    """A token model: Linear on [N, S, F] inputs, output [N, C, S] (classes on axis 1)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.linear(x)).transpose(1, 2)


def _model(name):
    torch.manual_seed(0)
    if name == "mlp-relu":
        model, x = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)), torch.randn(N, 4)
    elif name == "mlp-tanh":
        model, x = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(N, 4)
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
        x = torch.randn(N, 1, 4, 4)
    else:
        model, x = ClassesFirst(), torch.randn(N, 2, 4)
    return model.double(), x.double()


def _targets(loss_fn, output):
    g = generator(1)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        shape = (output.shape[0], *output.shape[2:])
        return torch.randint(0, output.shape[1], shape, generator=g)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return torch.rand(output.shape, generator=g, dtype=DOUBLE)
    return torch.randn(output.shape, generator=g, dtype=DOUBLE)


def _problem(model_name, loss_name, reduction):
    model, x = _model(model_name)
    loss_fn = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}[loss_name](
        reduction=reduction
    )
    with torch.no_grad():
        y = _targets(loss_fn, model(x))
    data = list(zip(x.split(BATCHES), y.split(BATCHES), strict=True))
    return model, loss_fn, x, y, data


MODELS = ["mlp-relu", "mlp-tanh", "cnn", "tokens"]
LOSSES = ["mse", "ce", "bce"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("model_name", MODELS)
def test_exact_operators_match_dense_ground_truth(model_name, loss_name, reduction):
    model, loss_fn, x, y, data = _problem(model_name, loss_name, reduction)
    truth = Truth(model, loss_fn, x, y)
    v = torch.randn(truth.theta.numel(), 3, generator=generator(0), dtype=DOUBLE)
    for op, expected in [
        (curvops.Hessian(model, loss_fn, data), truth.hessian()),
        (curvops.GGN(model, loss_fn, data), truth.ggn()),
        (curvops.EmpiricalFisher(model, loss_fn, data), truth.empirical_fisher()),
    ]:
        torch.testing.assert_close(op @ v, expected @ v, msg=type(op).__name__)
        torch.testing.assert_close(op @ v[:, 0], expected @ v[:, 0])
        torch.testing.assert_close(op.to_dense(), expected, msg=type(op).__name__)


def test_results_do_not_depend_on_the_batching():
    model, loss_fn, x, y, data = _problem("mlp-tanh", "ce", "mean")
    whole = curvops.GGN(model, loss_fn, [(x, y)]).to_dense()
    singles = curvops.GGN(model, loss_fn, list(zip(x.split(1), y.split(1), strict=True))).to_dense()
    torch.testing.assert_close(curvops.GGN(model, loss_fn, data).to_dense(), whole)
    torch.testing.assert_close(singles, whole)


def test_ignore_index_and_class_weights_follow_what_the_loss_averages():
    model, _, x, _, _ = _problem("tokens", "ce", "mean")
    y = torch.randint(0, 3, (N, 2), generator=generator(2))
    y[0, 1] = y[5, 0] = -100
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=DOUBLE))
    data = list(zip(x.split(BATCHES), y.split(BATCHES), strict=True))
    truth = Truth(model, loss_fn, x, y)
    torch.testing.assert_close(curvops.GGN(model, loss_fn, data).to_dense(), truth.ggn())
    torch.testing.assert_close(curvops.Hessian(model, loss_fn, data).to_dense(), truth.hessian())


def test_any_differentiable_loss_for_ggn_and_hessian():
    model, _, x, y, data = _problem("mlp-tanh", "mse", "mean")
    loss_fn = lambda o, t: ((o - t) ** 4).mean()  # noqa: E731
    truth = Truth(model, loss_fn, x, y)
    torch.testing.assert_close(curvops.Hessian(model, loss_fn, data).to_dense(), truth.hessian())
    torch.testing.assert_close(curvops.GGN(model, loss_fn, data).to_dense(), truth.ggn())


def test_subset_of_parameters():
    model, loss_fn, x, y, data = _problem("mlp-relu", "ce", "mean")
    first, last = model[0].weight, model[2].bias
    op = curvops.GGN(model, loss_fn, data, params=[last, first])
    full = Truth(model, loss_fn, x, y).ggn()
    offsets = {name: (start, p.numel()) for name, start, p in _offsets(model)}
    index = torch.cat([torch.arange(offsets[n][0], sum(offsets[n])) for n in ("2.bias", "0.weight")])
    torch.testing.assert_close(op.to_dense(), full[index][:, index])
    assert op.params == [last, first]


def _offsets(model):
    start = 0
    for name, p in model.named_parameters():
        yield name, start, p
        start += p.numel()


def test_fisher_mc_equals_empirical_fisher_at_its_sampled_labels():
    model, loss_fn, x, y, data = _problem("mlp-tanh", "ce", "mean")
    op = curvops.FisherMC(model, loss_fn, data, mc_samples=3, seed=7)
    truth = Truth(model, loss_fn, x, y)
    expected = torch.zeros(truth.theta.numel(), truth.theta.numel(), dtype=DOUBLE)
    for index, (xb, yb) in enumerate(data):
        sampled = op.sample_targets(index, model(xb).detach(), yb)
        for labels in sampled:
            g = Truth(model, loss_fn, xb, labels).per_datum_gradients(labels)
            expected += g.T @ g / 3
    torch.testing.assert_close(op.to_dense(), expected / truth.normalizer())


@pytest.mark.parametrize("loss_name", LOSSES)
def test_fisher_mc_converges_to_the_ggn(loss_name):
    model, loss_fn, x, y, data = _problem("mlp-tanh", loss_name, "mean")
    ggn = Truth(model, loss_fn, x, y).ggn()

    def error(samples, seed):
        fisher = curvops.FisherMC(model, loss_fn, data, mc_samples=samples, seed=seed).to_dense()
        return ((fisher - ggn).norm() / ggn.norm()).item()

    few = sum(error(10, s) for s in range(3)) / 3
    many = sum(error(4000, s) for s in range(3)) / 3
    # Monte-Carlo error shrinks like 1/sqrt(M): 20x from 10 to 4000 samples; ask for 5x.
    assert many < few / 5 and many < 0.05


def test_fisher_mc_is_reproducible_and_seed_dependent():
    model, loss_fn, _, _, data = _problem("mlp-relu", "bce", "sum")
    a = curvops.FisherMC(model, loss_fn, data, mc_samples=2, seed=3).to_dense()
    b = curvops.FisherMC(model, loss_fn, data, mc_samples=2, seed=3)
    torch.testing.assert_close(a, b.to_dense(), rtol=0, atol=0)
    torch.testing.assert_close(b @ torch.eye(a.shape[0], dtype=DOUBLE)[:, :2], a[:, :2])
    assert not torch.allclose(a, curvops.FisherMC(model, loss_fn, data, mc_samples=2, seed=4).to_dense())


def test_jacobian_and_its_transpose():
    model, _, x, _, _ = _problem("cnn", "mse", "mean")
    data = [(xb, None) for xb in x.split(BATCHES)]
    jac = curvops.Jacobian(model, data)
    expected = Truth(model, None, x, None).jacobian()
    assert jac.shape == tuple(expected.shape)
    torch.testing.assert_close(jac.to_dense(), expected)
    u = torch.randn(expected.shape[0], 2, generator=generator(0), dtype=DOUBLE)
    torch.testing.assert_close(jac.T @ u, expected.T @ u)
    torch.testing.assert_close(jac.T.to_dense(), expected.T)
    assert jac.T.T is jac
    linear = jac.to_scipy()
    torch.testing.assert_close(torch.from_numpy(linear.rmatvec(u[:, 0].numpy())), expected.T @ u[:, 0])


def test_base_class_quantities_on_a_model_operator():
    model, loss_fn, x, y, data = _problem("mlp-tanh", "ce", "mean")
    op = curvops.GGN(model, loss_fn, data)
    dense = Truth(model, loss_fn, x, y).ggn()
    torch.testing.assert_close(op.trace(), dense.trace())
    torch.testing.assert_close(op.diagonal(), dense.diagonal())
    v = torch.randn(dense.shape[0], generator=generator(0), dtype=DOUBLE)
    inverse = op.inverse(0.1, rtol=1e-12)
    assert isinstance(inverse, curvops.CGInverse)
    torch.testing.assert_close(inverse @ v, dense_inverse(dense, 0.1) @ v)
    torch.testing.assert_close(op.logdet(0.1, method="exact"), dense_logdet(dense, 0.1))
    estimate = op.logdet(0.1, num_samples=50, num_steps=dense.shape[0], generator=generator(0))
    assert abs(estimate - dense_logdet(dense, 0.1)) < 0.05 * abs(dense_logdet(dense, 0.1))
    torch.testing.assert_close(op.inverse(0.1, method="exact").to_dense(), dense_inverse(dense, 0.1))
    import scipy.sparse.linalg

    top = scipy.sparse.linalg.eigsh(op.to_scipy(), k=2, return_eigenvectors=False)
    torch.testing.assert_close(torch.from_numpy(top).sort().values, torch.linalg.eigvalsh(dense)[-2:])


def test_progressbar_on_every_pass(capsys):
    model, loss_fn, _, _, data = _problem("mlp-relu", "mse", "mean")
    op = curvops.GGN(model, loss_fn, data, progressbar=True)
    op @ torch.zeros(op.shape[0], dtype=DOUBLE)
    err = capsys.readouterr().err
    assert "GGN: reading data" in err and "GGN product" in err


def test_operators_run_on_the_parameters_device(device):
    model, loss_fn, _, _, data = _problem("cnn", "ce", "mean")
    expected = {cls: cls(model, loss_fn, data).to_dense() for cls in (curvops.GGN, curvops.Hessian)}
    jacobian = curvops.Jacobian(model, data).to_dense()
    model = model.to(device)
    moved = [(xb.to(device), yb.to(device)) for xb, yb in data]
    for cls, dense in expected.items():
        op = cls(model, loss_fn, moved)
        assert op.device.type == device.type
        torch.testing.assert_close(op.to_dense().cpu(), dense)
    torch.testing.assert_close(curvops.Jacobian(model, moved).to_dense().cpu(), jacobian)
    fisher = curvops.FisherMC(model, loss_fn, moved, mc_samples=2)
    v = torch.randn(fisher.shape[0], 2, dtype=DOUBLE, device=fisher.device)
    torch.testing.assert_close(fisher @ v, fisher @ v, rtol=0, atol=0)  # same labels every pass
    assert bool(torch.isfinite(fisher.inverse(1.0) @ v).all())
