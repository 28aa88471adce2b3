"""Laplace hyperparameters and links against dense formulas (float64): the Laplace bridge's closed
form, the evidence at any Gaussian ``σ`` and ``σ`` learned with ``τ``, and ``τ`` tuned on the
validation negative log-likelihood of the predictive."""

import math

import pytest
import torch
from model_truth import Truth
from test_laplace import DOUBLE, batches, network, train
from torch import nn
from torch.nn import functional as F

from curvops.laplace import Laplace

IGNORE = -100


def _data(kind: str, seed: int = 3, n: int = 20):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DOUBLE)
    if kind == "regression":
        y = torch.stack([torch.sin(x[:, 0]), x[:, 1] * x[:, 2]], 1) + 0.3 * torch.randn(
            n, 2, generator=g, dtype=DOUBLE
        )
    elif kind == "binary":
        y = (x[:, :2] + 0.5 * torch.randn(n, 2, generator=g, dtype=DOUBLE) > 0).to(DOUBLE)
    else:
        y = ((x[:, 0] + x[:, 1] + torch.randn(n, generator=g, dtype=DOUBLE)) > 0).long() + (
            x[:, 2] > 1
        ).long()
    return x, y


LOSSES = {"regression": nn.MSELoss, "binary": nn.BCEWithLogitsLoss, "classification": nn.CrossEntropyLoss}


def _fitted(kind: str, outputs: int = 3, **options):
    x, y = _data(kind)
    outputs = 2 if kind != "classification" else outputs
    model = train(network(outputs=outputs), LOSSES[kind](reduction="sum"), x, y)
    return Laplace(model, LOSSES[kind](reduction="sum"), batches(x, y), **options), model, x, y


# ------------------------------------------------------------------ the Laplace bridge
def test_the_bridge_is_its_closed_form_on_the_glm_logits():
    """``α_k = (1 - 2/K + e^{μ_k} Σ_l e^{-μ_l} / K²) / Σ_kk``, ``p = α / Σ α``, entry by entry."""
    la = _fitted("classification", curvature="full")[0]
    x_test = torch.randn(5, 4, generator=torch.Generator().manual_seed(9), dtype=DOUBLE)
    mean, covariance = la.glm_distribution(x_test)
    probabilities = la.predictive(x_test, link_approx="bridge")
    classes = mean.shape[1]
    for b in range(5):
        mu, var = mean[b].tolist(), covariance[b].diagonal().tolist()
        alpha = [
            (1 - 2 / classes + math.exp(mu[k]) * sum(math.exp(-m) for m in mu) / classes**2) / var[k]
            for k in range(classes)
        ]
        expected = torch.tensor([a / sum(alpha) for a in alpha], dtype=DOUBLE)
        torch.testing.assert_close(probabilities[b], expected, rtol=1e-12, atol=1e-14)


def test_the_bridge_stays_finite_for_large_logits_and_tiny_variances():
    from curvops.laplace.predictive import laplace_bridge

    mean = torch.tensor([[800.0, -800.0, 0.0], [1.0, 2.0, 3.0]], dtype=DOUBLE)
    variance = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=DOUBLE)
    probabilities = laplace_bridge(mean, variance)
    assert bool(torch.isfinite(probabilities).all())
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, dtype=DOUBLE))
    assert float(probabilities[0, 0]) > 0.999  # the dominant logit


def test_the_bridge_needs_softmax_outputs():
    la, _, x, _ = _fitted("binary")
    with pytest.raises(ValueError, match=r"bridge.*CrossEntropyLoss"):
        la.predictive(x, link_approx="bridge")


# ------------------------------------------------------------------ σ of a Gaussian likelihood
def _dense_evidence(truth: Truth, tau, sigma, squared_errors: float, terms: int):
    """``-[E/(2σ²) + (N/2) log 2πσ²] - ½ logdet(K_MSE/(2σ²) + τI) + (D/2) log τ - (τ/2) ‖θ‖²``."""
    k = truth.ggn()
    size = k.shape[0]
    loss = squared_errors / (2 * sigma**2) + 0.5 * terms * torch.log(2 * math.pi * sigma**2)
    precision = k / (2 * sigma**2) + tau * torch.eye(size, dtype=DOUBLE)
    return (
        -loss
        - 0.5 * torch.logdet(precision)
        + 0.5 * size * torch.log(tau)
        - 0.5 * tau * truth.theta.square().sum()
    )


@pytest.mark.parametrize("built_sigma", [None, 0.7])
def test_the_evidence_at_any_sigma_is_the_dense_formula(built_sigma):
    la, model, x, y = _fitted("regression", curvature="full", sigma_noise=built_sigma)
    truth = Truth(model, nn.MSELoss(reduction="sum"), x, y)
    squared_errors = float((model(x) - y).square().sum().detach())
    for tau, sigma in [(0.5, 0.3), (2.0, 1.5)]:
        expected = _dense_evidence(truth, torch.tensor(tau, dtype=DOUBLE), torch.tensor(sigma, dtype=DOUBLE),
                                   squared_errors, y.numel())  # fmt: skip
        torch.testing.assert_close(la.log_marginal_likelihood(tau, sigma_noise=sigma), expected)


@pytest.mark.parametrize("curvature", ["full", "kfac"])
def test_sigma_learned_with_tau_maximises_the_evidence(curvature):
    """The learned ``(τ, σ)`` against L-BFGS on the dense evidence (``"full"``), or a maximum
    of curvops's own evidence (``"kfac"``: no better point nearby); then ``σ²`` in the predictive."""
    la, model, x, y = _fitted("regression", curvature=curvature)
    tau = la.optimize_prior_precision(learn_sigma_noise=True, steps=1000, lr=0.05)
    sigma = la.sigma_noise
    assert isinstance(sigma, float) and sigma > 0
    if curvature == "full":
        truth = Truth(model, nn.MSELoss(reduction="sum"), x, y)
        squared_errors = float((model(x) - y).square().sum().detach())
        logs = torch.zeros(2, dtype=DOUBLE, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [logs], max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-12
        )

        def closure():
            optimizer.zero_grad()
            value = -_dense_evidence(truth, logs[0].exp(), logs[1].exp(), squared_errors, y.numel())
            value.backward()
            return value

        optimizer.step(closure)
        torch.testing.assert_close(tau, logs[0].exp().detach(), rtol=2e-3, atol=0)
        assert math.isclose(sigma, float(logs[1].detach().exp()), rel_tol=2e-3)
    best = float(la.log_marginal_likelihood())
    for factor in (0.95, 1.05):
        assert float(la.log_marginal_likelihood(tau * factor)) <= best + 1e-9
        assert float(la.log_marginal_likelihood(sigma_noise=sigma * factor)) <= best + 1e-9
    _, covariance = la.glm_distribution(x[:3])
    _, variance = la.predictive(x[:3])
    torch.testing.assert_close(variance, covariance.diagonal(dim1=1, dim2=2) + sigma**2)


# ------------------------------------------------------------------ τ on validation data
def _nll(probabilities_or_gaussian, y, kind):
    """The mean validation NLL by torch's own losses."""
    if kind == "regression":
        mean, variance = probabilities_or_gaussian
        return float(F.gaussian_nll_loss(mean, y, variance, full=True, reduction="mean"))
    if kind == "binary":
        return float(F.binary_cross_entropy(probabilities_or_gaussian, y))
    return float(F.nll_loss(probabilities_or_gaussian.log(), y, ignore_index=IGNORE))


def _validation(kind, la):
    x_val, y_val = _data(kind, seed=11, n=12)
    if kind == "classification":
        y_val[:3] = IGNORE
        la.loss_fn.ignore_index = IGNORE
    return x_val, y_val


def _nll_at(la, tau, x_val, y_val, kind, **options):
    la.prior_precision = tau
    return _nll(la.predictive(x_val, **options), y_val, kind)


@pytest.mark.parametrize("kind", ["classification", "binary", "regression"])
def test_nll_tuning_refines_the_grids_least_validation_nll(kind):
    """The grid's best by torch's own losses, then Adam with the exact gradient: never worse, and a
    stationary point of the validation NLL (central differences in log τ) where it moved."""
    la, _, _, _ = _fitted(kind, curvature="kfac", **({"sigma_noise": 0.3} if kind == "regression" else {}))
    x_val, y_val = _validation(kind, la)
    grid = torch.logspace(-2, 2, 9, dtype=DOUBLE)
    scores = [_nll_at(la, tau, x_val, y_val, kind) for tau in grid.tolist()]
    best = float(grid[scores.index(min(scores))])
    la.prior_precision = 1.0
    chosen = float(
        la.optimize_prior_precision(
            "nll", val_data=[(x_val[:5], y_val[:5]), (x_val[5:], y_val[5:])], grid=grid
        )
    )
    assert float(la.prior_precision) == chosen
    assert _nll_at(la, chosen, x_val, y_val, kind) <= min(scores) + 1e-12
    if chosen != best:
        h = 1e-3
        slope = (
            _nll_at(la, chosen * math.exp(h), x_val, y_val, kind)
            - _nll_at(la, chosen * math.exp(-h), x_val, y_val, kind)
        ) / (2 * h)
        assert abs(slope) < 1e-3


@pytest.mark.parametrize(
    ("kind", "link", "per_parameter"),
    [
        ("classification", "probit", False),
        ("classification", "bridge", True),
        ("binary", "probit", True),
        ("regression", "probit", True),
    ],
)
def test_the_gradient_of_the_validation_nll_is_exact(kind, link, per_parameter):
    """Autograd through ``∂Σ/∂τ_g = -J P^-1 E_g P^-1 J^T`` against central differences of the
    predictive's NLL (torch's own losses), one ``τ`` or one per parameter tensor."""
    from curvops.laplace.nll_gradient import validation_objective

    options = {"sigma_noise": 0.3} if kind == "regression" else {}
    bias = {"curvature_options": {"bias": "separate" if per_parameter else "joint"}}
    la, _, _, _ = _fitted(kind, curvature="kfac", **bias, **options)
    x_val, y_val = _validation(kind, la)
    tau = torch.tensor([0.5, 2.0, 1.0, 3.0] if per_parameter else 1.5, dtype=DOUBLE, requires_grad=True)
    objective = validation_objective(la, [(x_val, y_val)], {"link_approx": link})
    objective(tau).backward()
    for index in range(tau.numel()):
        step = torch.zeros(tau.numel(), dtype=DOUBLE)
        step[index] = 1e-5
        step = step.reshape(tau.shape)
        up = _nll_at(la, (tau + step).detach(), x_val, y_val, kind, link_approx=link)
        down = _nll_at(la, (tau - step).detach(), x_val, y_val, kind, link_approx=link)
        assert float(tau.grad.reshape(-1)[index]) == pytest.approx((up - down) / 2e-5, rel=1e-5, abs=1e-9)


def test_nll_tuning_takes_predictive_options():
    """With the Monte-Carlo link (not differentiable) the grid's best, by the predictive it names."""
    la, _, _, _ = _fitted("classification", curvature="kfac")
    x_val, y_val = _data("classification", seed=11, n=12)
    grid = [0.01, 1.0, 100.0]
    options = {"method": "mc", "n_samples": 20}
    scores = []
    for tau in grid:
        la.prior_precision = tau
        generator = torch.Generator().manual_seed(0)
        scores.append(_nll(la.predictive(x_val, **options, generator=generator), y_val, "classification"))
    chosen = la.optimize_prior_precision(
        "nll",
        val_data=(x_val, y_val),
        grid=grid,
        predictive_options={**options, "generator": torch.Generator().manual_seed(0)},
    )
    assert float(chosen) in grid


def test_tuning_arguments_that_do_not_go_together_are_refused():
    la, _, x, y = _fitted("classification", curvature="kfac")
    with pytest.raises(ValueError, match="val_data"):
        la.optimize_prior_precision("nll")
    with pytest.raises(ValueError, match="for method='nll'"):
        la.optimize_prior_precision("marglik", val_data=(x, y))
    with pytest.raises(ValueError, match="predictive_options takes"):
        la.optimize_prior_precision("nll", val_data=(x, y), predictive_options={"samples": 3})
    with pytest.raises(ValueError, match="MSELoss"):
        la.optimize_prior_precision(learn_sigma_noise=True)
    with pytest.raises(ValueError, match="MSELoss"):
        la.log_marginal_likelihood(sigma_noise=1.0)
    with pytest.raises(ValueError, match="val_data batch 0"):
        la.optimize_prior_precision("nll", val_data=[x], grid=[1.0])
    regression, _, _, _ = _fitted("regression", curvature="kfac")
    with pytest.raises(ValueError, match="method='marglik'"):
        regression.optimize_prior_precision("grid", learn_sigma_noise=True)
    with pytest.raises(ValueError, match="sigma_noise"):
        regression.log_marginal_likelihood(sigma_noise=-1.0)
