"""Hyperparameters learned during training (``OnlineMarglik``): each update is the Laplace
evidence's Adam steps from the current values, the penalty is the prior of the log joint in the
loss's scale, and on a toy regression the learned ``σ`` finds the data's noise."""

import math

import pytest
import torch
from test_laplace import DOUBLE, network
from torch import nn

from curvops.laplace import Laplace, OnlineMarglik


def _regression(n=64, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-3, 3, n, dtype=DOUBLE).unsqueeze(1).repeat(1, 4)
    y = torch.sin(x[:, :2]) + noise * torch.randn(n, 2, generator=g, dtype=DOUBLE)
    return x, y


def test_an_update_is_the_evidences_adam_steps_from_the_current_values():
    x, y = _regression()
    model, data = network(), [(x[:40], y[:40]), (x[40:], y[40:])]
    online = OnlineMarglik(
        model, nn.MSELoss(), data, prior_precision=[1.0, 2.0, 1.0, 2.0], learn_sigma_noise=True
    )
    tau = online.update(steps=30)
    with pytest.warns(UserWarning, match="not at a minimum"):
        laplace = Laplace(model, nn.MSELoss(), data, prior_precision=[1.0, 2.0, 1.0, 2.0])
    expected = laplace.optimize_prior_precision(steps=30, learn_sigma_noise=True)
    torch.testing.assert_close(tau, expected)
    assert online.sigma_noise == laplace.sigma_noise
    assert online.history[-1][2] == pytest.approx(float(laplace.log_marginal_likelihood()))
    second = online.update(steps=30)  # from the new values, with σ now given
    assert second.shape == (4,) and online.laplace.sigma_noise == online.sigma_noise


@pytest.mark.parametrize(("loss", "reduction"), [("mse", "mean"), ("mse", "sum"), ("ce", "mean")])
def test_the_penalty_is_the_prior_of_the_log_joint_in_the_losss_scale(loss, reduction):
    """``loss + penalty`` is the negative log joint ``L_sum + ½ τ ‖θ‖²`` divided by the loss's
    factor to it, so their gradients are proportional."""
    x, y = _regression()
    model = network(outputs=2)
    if loss == "ce":
        y = (y[:, 0] > 0).long()
    loss_fn = (nn.MSELoss if loss == "mse" else nn.CrossEntropyLoss)(reduction=reduction)
    sigma = 0.4 if loss == "mse" else None
    online = OnlineMarglik(model, loss_fn, (x, y), prior_precision=3.0, sigma_noise=sigma)
    terms = y.numel() if loss == "mse" else len(y)
    summed = (nn.MSELoss if loss == "mse" else nn.CrossEntropyLoss)(reduction="sum")(model(x), y)
    likelihood = summed / (2 * sigma**2) if loss == "mse" else summed
    joint = likelihood + 0.5 * 3.0 * sum(p.square().sum() for p in model.parameters())
    factor = (1 / (2 * sigma**2) if loss == "mse" else 1.0) * (terms if reduction == "mean" else 1.0)
    torch.testing.assert_close(loss_fn(model(x), y) + online.penalty(), joint / factor)


def test_training_with_it_finds_the_noise_of_the_data():
    """Noisy sine (σ = 0.3): Adam on loss + penalty, an update every 25 epochs; the learned σ
    lands near 0.3 and the evidence rises."""
    torch.manual_seed(0)
    x, y = _regression(n=96, noise=0.3)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).to(DOUBLE)
    data, loss_fn = [(x, y)], nn.MSELoss()
    online = OnlineMarglik(model, loss_fn, data, learn_sigma_noise=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for epoch in range(300):
        optimizer.zero_grad()
        (loss_fn(model(x), y) + online.penalty()).backward()
        optimizer.step()
        if epoch % 25 == 24:
            online.update(steps=50)
    assert 0.22 < online.sigma_noise < 0.4
    assert online.history[-1][2] > online.history[0][2]
    assert math.isfinite(float(online.prior_precision))


def test_bad_options_are_refused():
    x, y = _regression()
    classes = (y[:, 0] > 0).long()
    with pytest.raises(ValueError, match="MSELoss"):
        OnlineMarglik(network(), nn.CrossEntropyLoss(), (x, classes), learn_sigma_noise=True)
    with pytest.raises(ValueError, match="MSELoss"):
        OnlineMarglik(network(), nn.CrossEntropyLoss(), (x, classes), sigma_noise=0.5)
    with pytest.raises(ValueError, match="prior_precision"):
        OnlineMarglik(network(), nn.MSELoss(), (x, y), prior_precision=-1.0)
    with pytest.raises(ValueError, match="sigma_noise"):
        OnlineMarglik(network(), nn.MSELoss(), (x, y), sigma_noise=0.0)
