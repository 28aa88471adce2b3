"""Laplace approximations against dense ground truth (float64, tiny trained networks)."""

import math
import warnings

import pytest
import torch
from model_truth import Truth
from torch import nn
from torch.func import functional_call

import curvops
from curvops.errors import NotPositiveDefiniteError
from curvops.laplace import CURVATURES, Laplace

DOUBLE = torch.float64
TEMPERATURE = 0.7


def network(seed: int = 0, outputs: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, outputs)).to(DOUBLE)


def train(model: nn.Module, summed: nn.Module, x, y, weight_decay: float = 1.0) -> nn.Module:
    """To the minimum of ``L_sum + weight_decay/2 ‖θ‖²`` (a MAP estimate) with L-BFGS."""
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = summed(model(x), y) + 0.5 * weight_decay * sum(p.square().sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def batches(x, y):
    return [(x[:10], y[:10]), (x[10:], y[10:])]


@pytest.fixture(scope="module")
def classification():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=g, dtype=DOUBLE)
    y = ((x[:, 0] + 0.5 * x[:, 1] + 0.5 * torch.randn(20, generator=g, dtype=DOUBLE)) > 0).long()
    model = train(network(), nn.CrossEntropyLoss(reduction="sum"), x, y)
    return model, x, y


@pytest.fixture(scope="module")
def regression():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 4, generator=g, dtype=DOUBLE)
    y = torch.stack([torch.sin(x[:, 0]), x[:, 1] * x[:, 2]], 1) + 0.1 * torch.randn(
        20, 2, generator=g, dtype=DOUBLE
    )
    model = train(network(), nn.MSELoss(reduction="sum"), x, y)
    return model, x, y


def flat_params(model, params=None):
    params = list(model.parameters()) if params is None else params
    return torch.cat([p.detach().reshape(-1) for p in params]), [p.numel() for p in params]


def expand(taus, sizes):
    taus = torch.as_tensor(taus, dtype=DOUBLE)
    if taus.ndim == 0:
        taus = taus.expand(len(sizes))
    return torch.repeat_interleave(taus, torch.tensor(sizes))


def dense_marglik(curvature, theta, sizes, taus, temperature, loss_sum):
    """``-L/T - ½ (logdet(K/T + diag τ) - Σ D_l log τ_l) - ½ Σ τ_l ‖θ_l‖²``, densely."""
    tau = expand(taus, sizes)
    sign, logdet = torch.linalg.slogdet(curvature / temperature + torch.diag(tau))
    assert sign > 0
    return -loss_sum / temperature - 0.5 * (logdet - tau.log().sum()) - 0.5 * (tau * theta.square()).sum()


def dense_covariance(curvature, sizes, taus, temperature):
    return torch.linalg.inv(curvature / temperature + torch.diag(expand(taus, sizes)))


def reference_curvature(name, model, x, y, params=None, **options):
    """``K`` of the summed loss, built independently of :class:`Laplace`."""
    data = batches(x, y)
    mean_loss = nn.CrossEntropyLoss()
    if name in ("kfac", "ekfac", "tkfac", "tekfac"):
        builder = {"kfac": curvops.KFAC, "ekfac": curvops.EKFAC, "tkfac": curvops.TKFAC}.get(name)
        if name == "tekfac":
            builder, options = curvops.TKFAC, {**options, "eigenvalue_correction": True}
        return (
            len(y)
            * builder(model, mean_loss, data, params=params, fisher_type="type-2", **options).to_dense()
        )
    ggn = Truth(model, nn.CrossEntropyLoss(reduction="sum"), x, y).ggn()
    return torch.diag(ggn.diagonal()) if name == "diagonal" else ggn


def summed_loss(model, x, y, loss=None):
    loss = loss or nn.CrossEntropyLoss(reduction="sum")
    with torch.no_grad():
        return loss(model(x), y)


def sampled_network(model, theta, x):
    """The model's output with the flat parameters ``theta``."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    parts = theta.split([s.numel() for s in shapes])
    params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
    with torch.no_grad():
        return functional_call(model, params, (x,))


PER_PARAM = [0.5, 2.0, 1.5, 3.0]  # 0.weight, 0.bias, 2.weight, 2.bias


# --------------------------------------------------------------------- evidence
@pytest.mark.parametrize("name", CURVATURES)
def test_log_marginal_likelihood_matches_dense_formula(classification, name):
    model, x, y = classification
    lap = Laplace(model, nn.CrossEntropyLoss(), batches(x, y), curvature=name, temperature=TEMPERATURE)
    curvature = reference_curvature(name, model, x, y)
    torch.testing.assert_close(lap.curvature.to_dense(), curvature, rtol=1e-8, atol=1e-10)
    theta, sizes = flat_params(model)
    loss = summed_loss(model, x, y)
    torch.testing.assert_close(lap.loss, loss)
    for taus in (0.8, PER_PARAM):
        expected = dense_marglik(curvature, theta, sizes, taus, TEMPERATURE, loss)
        torch.testing.assert_close(lap.log_marginal_likelihood(taus), expected, rtol=1e-10, atol=1e-9)
    # the default is the current prior precision
    lap.prior_precision = PER_PARAM
    torch.testing.assert_close(
        lap.log_marginal_likelihood(), dense_marglik(curvature, theta, sizes, PER_PARAM, TEMPERATURE, loss)
    )


def test_sum_and_mean_reduction_give_one_posterior(classification):
    model, x, y = classification
    mean = Laplace(model, nn.CrossEntropyLoss(), batches(x, y), prior_precision=PER_PARAM)
    summed = Laplace(model, nn.CrossEntropyLoss(reduction="sum"), batches(x, y), prior_precision=PER_PARAM)
    assert mean.num_terms == summed.num_terms == 20
    assert repr(mean) == (
        "Laplace(likelihood='classification', D=23, curvature=BlockDiagonal, "
        "prior_precision=[0.5, 2, 1.5, 3], temperature=1)"
    )
    torch.testing.assert_close(mean.curvature.to_dense(), summed.curvature.to_dense())
    torch.testing.assert_close(mean.log_marginal_likelihood(), summed.log_marginal_likelihood())


def test_prebuilt_operators(classification):
    model, x, y = classification
    data = batches(x, y)
    kfac = curvops.KFAC(model, nn.CrossEntropyLoss(), data, fisher_type="type-2")
    named = Laplace(model, nn.CrossEntropyLoss(), data, curvature="kfac", prior_precision=PER_PARAM)
    prebuilt = Laplace(model, nn.CrossEntropyLoss(), data, curvature=kfac, prior_precision=PER_PARAM)
    torch.testing.assert_close(named.log_marginal_likelihood(), prebuilt.log_marginal_likelihood())
    # a matrix-free model operator is made dense once
    ggn = curvops.GGN(model, nn.CrossEntropyLoss(), data)
    exact = Laplace(model, nn.CrossEntropyLoss(), data, curvature=ggn, prior_precision=PER_PARAM)
    full = Laplace(model, nn.CrossEntropyLoss(), data, curvature="full", prior_precision=PER_PARAM)
    torch.testing.assert_close(exact.log_marginal_likelihood(), full.log_marginal_likelihood())


def test_joint_bias_blocks_mixing_two_precisions(classification):
    """A joint weight+bias KFAC block with two τ goes dense; with one τ it stays structured."""
    model, x, y = classification
    lap = Laplace(
        model,
        nn.CrossEntropyLoss(),
        batches(x, y),
        curvature_options={"bias": "joint"},
        temperature=TEMPERATURE,
    )
    curvature = reference_curvature("kfac", model, x, y, bias="joint")
    theta, sizes = flat_params(model)
    loss = summed_loss(model, x, y)
    for taus in (0.8, PER_PARAM):
        expected = dense_marglik(curvature, theta, sizes, taus, TEMPERATURE, loss)
        torch.testing.assert_close(lap.log_marginal_likelihood(taus), expected)
    lap.prior_precision = PER_PARAM
    torch.testing.assert_close(
        lap.posterior_covariance.to_dense(), dense_covariance(curvature, sizes, PER_PARAM, TEMPERATURE)
    )
    torch.testing.assert_close(
        lap.posterior_precision.to_dense(), curvature / TEMPERATURE + torch.diag(expand(PER_PARAM, sizes))
    )


def test_large_mixed_blocks_are_refused(classification, monkeypatch):
    model, x, y = classification
    lap = Laplace(model, nn.CrossEntropyLoss(), batches(x, y), curvature_options={"bias": "joint"})
    monkeypatch.setattr(curvops.laplace.posterior, "_MAX_DENSE_BLOCK", 10)
    lap.log_marginal_likelihood(2.0)  # one τ: every block stays structured
    with pytest.raises(ValueError, match=r"spans the parameters \['0.weight', '0.bias'\]"):
        lap.log_marginal_likelihood(PER_PARAM)


def test_parameter_order_that_splits_layers(classification):
    """``params`` with weights before biases and joint bias blocks: a permuted block-diagonal operator."""
    model, x, y = classification
    params = [model[0].weight, model[2].weight, model[0].bias, model[2].bias]
    data = batches(x, y)
    options = {"bias": "joint"}
    curvature = reference_curvature("kfac", model, x, y, params=params, **options)
    theta, sizes = flat_params(model, params)
    for taus in (0.7, [0.5, 3.0, 2.0, 1.5]):
        lap = Laplace(
            model, nn.CrossEntropyLoss(), data, params=params, prior_precision=taus, curvature_options=options
        )
        assert isinstance(lap.curvature, curvops.Permuted)
        torch.testing.assert_close(lap.mean, theta)
        expected = dense_marglik(curvature, theta, sizes, taus, 1.0, summed_loss(model, x, y))
        torch.testing.assert_close(lap.log_marginal_likelihood(), expected)
        covariance = dense_covariance(curvature, sizes, taus, 1.0)
        torch.testing.assert_close(lap.posterior_covariance.to_dense(), covariance)
        samples = lap.sample(20000, generator=torch.Generator().manual_seed(0))
        empirical = torch.cov(samples.T)
        assert torch.linalg.norm(empirical - covariance) / torch.linalg.norm(covariance) < 0.1


def test_regression_with_sigma_noise(regression):
    model, x, y = regression
    sigma = 0.3
    lap = Laplace(
        model, nn.MSELoss(), batches(x, y), curvature="full", sigma_noise=sigma, temperature=TEMPERATURE
    )
    ggn = Truth(model, nn.MSELoss(reduction="sum"), x, y).ggn() / (2 * sigma**2)
    squares = summed_loss(model, x, y, nn.MSELoss(reduction="sum"))
    loss = squares / (2 * sigma**2) + 0.5 * y.numel() * math.log(2 * math.pi * sigma**2)
    torch.testing.assert_close(lap.loss, loss)
    theta, sizes = flat_params(model)
    expected = dense_marglik(ggn, theta, sizes, PER_PARAM, TEMPERATURE, loss)
    torch.testing.assert_close(lap.log_marginal_likelihood(PER_PARAM), expected)
    # without sigma_noise: the loss as given, Σ (f - y)², and its GGN
    plain = Laplace(model, nn.MSELoss(), batches(x, y), curvature="full")
    ggn = Truth(model, nn.MSELoss(reduction="sum"), x, y).ggn()
    torch.testing.assert_close(
        plain.log_marginal_likelihood(0.5), dense_marglik(ggn, theta, sizes, 0.5, 1.0, squares)
    )


# --------------------------------------------------------------- prior precision
def dense_optimum(curvature, theta, sizes, loss, temperature):
    """The scalar τ maximising the dense formula, by a fine grid in log τ and its eigenvalues."""
    eigenvalues = torch.linalg.eigvalsh(curvature)
    taus = torch.logspace(-3, 3, 60001, dtype=DOUBLE)
    logdet = torch.log(eigenvalues / temperature + taus.unsqueeze(1)).sum(1)
    values = (
        -loss / temperature - 0.5 * (logdet - theta.numel() * taus.log()) - 0.5 * taus * theta.square().sum()
    )
    return taus[values.argmax()]


@pytest.mark.parametrize("name", ["kfac", "full"])
def test_optimize_prior_precision_marglik_finds_the_dense_optimum(classification, name):
    model, x, y = classification
    lap = Laplace(model, nn.CrossEntropyLoss(), batches(x, y), curvature=name, temperature=TEMPERATURE)
    curvature = reference_curvature(name, model, x, y)
    theta, sizes = flat_params(model)
    loss = summed_loss(model, x, y)
    tau = lap.optimize_prior_precision()
    assert tau.ndim == 0 and lap.prior_precision is tau
    best = dense_optimum(curvature, theta, sizes, loss, TEMPERATURE)
    assert abs(math.log(tau.item() / best.item())) < 2e-3
    # one τ per parameter tensor: a stationary point of the dense formula, above the scalar optimum
    taus = lap.optimize_prior_precision(prior_precision=PER_PARAM, steps=500)
    assert taus.shape == (4,)
    log_taus = taus.log().clone().requires_grad_(True)
    value = dense_marglik(curvature, theta, sizes, log_taus.exp(), TEMPERATURE, loss)
    (gradient,) = torch.autograd.grad(value, log_taus)
    assert gradient.abs().max() < 1e-3
    assert value > dense_marglik(curvature, theta, sizes, best, TEMPERATURE, loss)


def test_optimize_prior_precision_grid(classification):
    model, x, y = classification
    lap = Laplace(model, nn.CrossEntropyLoss(), batches(x, y), curvature="ekfac")
    curvature = reference_curvature("ekfac", model, x, y)
    theta, sizes = flat_params(model)
    loss = summed_loss(model, x, y)
    grid = torch.logspace(-2, 2, 41)
    values = torch.stack([dense_marglik(curvature, theta, sizes, tau, 1.0, loss) for tau in grid])
    tau = lap.optimize_prior_precision(method="grid", grid=grid)
    assert tau.item() == pytest.approx(grid[values.argmax()].item())
    taus = lap.optimize_prior_precision(method="grid", prior_precision=PER_PARAM, grid=grid)
    assert taus.tolist() == pytest.approx([grid[values.argmax()].item()] * 4)


# --------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", ["kfac", "tekfac", "diagonal", "full"])
def test_sample_covariance(classification, name):
    model, x, y = classification
    lap = Laplace(
        model,
        nn.CrossEntropyLoss(),
        batches(x, y),
        curvature=name,
        prior_precision=PER_PARAM,
        temperature=TEMPERATURE,
    )
    _, sizes = flat_params(model)
    covariance = dense_covariance(reference_curvature(name, model, x, y), sizes, PER_PARAM, TEMPERATURE)
    samples = lap.sample(20000, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (20000, 23)
    empirical = torch.cov(samples.T)
    assert torch.linalg.norm(empirical - covariance) / torch.linalg.norm(covariance) < 0.1
    standard_error = (covariance.diagonal() / 20000).sqrt()
    assert ((samples.mean(0) - lap.mean).abs() < 5 * standard_error).all()
    first, again = (lap.sample(3, generator=torch.Generator().manual_seed(1)) for _ in range(2))
    torch.testing.assert_close(first, again)


# ------------------------------------------------------------------- predictive
def test_glm_covariance_matches_dense_jacobian(classification):
    model, x, y = classification
    x_test = torch.randn(7, 4, generator=torch.Generator().manual_seed(5), dtype=DOUBLE)
    for name in ("kfac", "full"):
        lap = Laplace(
            model,
            nn.CrossEntropyLoss(),
            batches(x, y),
            curvature=name,
            prior_precision=PER_PARAM,
            temperature=2.0,
        )
        _, sizes = flat_params(model)
        covariance = dense_covariance(reference_curvature(name, model, x, y), sizes, PER_PARAM, 2.0)
        jacobian = Truth(model, None, x, y).jacobian(x_test)  # [7 * 2, D]
        expected = (jacobian @ covariance @ jacobian.T).reshape(7, 2, 7, 2)
        expected = torch.stack([expected[b, :, b] for b in range(7)])
        mean, glm = lap.glm_distribution(x_test, batch_size=3)
        torch.testing.assert_close(glm, expected)
        torch.testing.assert_close(mean, model(x_test).detach())
        probit = lap.predictive(x_test)
        variance = expected.diagonal(dim1=1, dim2=2)
        torch.testing.assert_close(
            probit, torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * variance), dim=1)
        )


def test_mc_link_approximation(classification):
    model, x, y = classification
    lap = Laplace(model, nn.CrossEntropyLoss(), batches(x, y), curvature="full", prior_precision=0.3)
    x_test = torch.randn(5, 4, generator=torch.Generator().manual_seed(6), dtype=DOUBLE)
    mean, covariance = lap.glm_distribution(x_test)
    estimate = lap.predictive(
        x_test, link_approx="mc", n_samples=50000, generator=torch.Generator().manual_seed(0)
    )
    # an independent estimate: logits drawn with a Cholesky factor
    factor = torch.linalg.cholesky(covariance + 1e-12 * torch.eye(2, dtype=DOUBLE))
    draws = torch.randn(50000, 5, 2, generator=torch.Generator().manual_seed(1), dtype=DOUBLE)
    logits = mean + torch.einsum("bce,sbe->sbc", factor, draws)
    torch.testing.assert_close(estimate, torch.softmax(logits, -1).mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(estimate.sum(1), torch.ones(5, dtype=DOUBLE))


def test_mc_predictive_averages_sampled_networks(classification):
    model, x, y = classification
    lap = Laplace(model, nn.CrossEntropyLoss(), batches(x, y), prior_precision=PER_PARAM)
    x_test = torch.randn(5, 4, generator=torch.Generator().manual_seed(7), dtype=DOUBLE)
    estimate = lap.predictive(x_test, method="mc", n_samples=30, generator=torch.Generator().manual_seed(3))
    samples = lap.sample(30, generator=torch.Generator().manual_seed(3))
    probabilities = [torch.softmax(sampled_network(model, theta, x_test), -1) for theta in samples]
    torch.testing.assert_close(estimate, torch.stack(probabilities).mean(0))
    # a tight posterior: sampled networks agree with the linearised one
    lap.prior_precision = 1e5
    mc = lap.predictive(x_test, method="mc", n_samples=200, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc, lap.predictive(x_test), atol=2e-3, rtol=0)


def test_regression_predictive(regression):
    model, x, y = regression
    lap = Laplace(
        model, nn.MSELoss(), batches(x, y), curvature="full", sigma_noise=0.3, prior_precision=PER_PARAM
    )
    x_test = torch.randn(6, 4, generator=torch.Generator().manual_seed(8), dtype=DOUBLE)
    _, sizes = flat_params(model)
    ggn = Truth(model, nn.MSELoss(reduction="sum"), x, y).ggn() / (2 * 0.3**2)
    covariance = dense_covariance(ggn, sizes, PER_PARAM, 1.0)
    jacobian = Truth(model, None, x, y).jacobian(x_test)
    variance = (jacobian @ covariance @ jacobian.T).diagonal().reshape(6, 2)
    mean, var = lap.predictive(x_test)
    torch.testing.assert_close(mean, model(x_test).detach())
    torch.testing.assert_close(var, variance + 0.09)
    mc_mean, mc_var = lap.predictive(
        x_test, method="mc", n_samples=20, generator=torch.Generator().manual_seed(0)
    )
    samples = lap.sample(20, generator=torch.Generator().manual_seed(0))
    outputs = torch.stack([sampled_network(model, theta, x_test) for theta in samples])
    torch.testing.assert_close(mc_mean, outputs.mean(0))
    torch.testing.assert_close(mc_var, outputs.var(0, unbiased=False) + 0.09)


def test_scalar_regression_and_binary_outputs():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(20, 4, generator=g, dtype=DOUBLE)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(20, generator=g, dtype=DOUBLE)
    model = nn.Sequential(network(outputs=1), nn.Flatten(0))
    train(model, nn.MSELoss(reduction="sum"), x, y)
    lap = Laplace(model, nn.MSELoss(), batches(x, y), curvature="diagonal")
    mean, variance = lap.predictive(x[:3])
    assert mean.shape == variance.shape == (3,) and bool((variance > 0).all())
    labels = (x[:, :2] > 0).to(DOUBLE)
    model = train(network(), nn.BCEWithLogitsLoss(reduction="sum"), x, labels)
    lap = Laplace(model, nn.BCEWithLogitsLoss(), batches(x, labels), curvature="kfac")
    mean, covariance = lap.glm_distribution(x[:3])
    expected = torch.sigmoid(mean / torch.sqrt(1 + math.pi / 8 * covariance.diagonal(dim1=1, dim2=2)))
    torch.testing.assert_close(lap.predictive(x[:3]), expected)
    ggn = Truth(model, nn.BCEWithLogitsLoss(reduction="sum"), x, labels).ggn()
    diagonal = Laplace(model, nn.BCEWithLogitsLoss(), batches(x, labels), curvature="diagonal")
    torch.testing.assert_close(diagonal.curvature.diagonal(), ggn.diagonal())


# -------------------------------------------------------------- bad inputs
def test_warns_when_not_at_a_minimum(classification, regression):
    model, x, y = classification
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Laplace(model, nn.CrossEntropyLoss(), batches(x, y))  # trained: silent
    _, x, y = regression
    with pytest.warns(UserWarning, match="not at a minimum"):
        Laplace(network(), nn.MSELoss(), batches(x, y + 10.0))


@pytest.mark.parametrize(
    "bad", [0.0, -1.0, math.nan, math.inf, [1.0, 2.0], [1.0, 1.0, 1.0, -1.0], [[1.0] * 4]]
)
def test_bad_prior_precision(classification, bad):
    model, x, y = classification
    with pytest.raises(ValueError, match="prior_precision"):
        Laplace(model, nn.CrossEntropyLoss(), batches(x, y), prior_precision=bad)
    lap = Laplace(model, nn.CrossEntropyLoss(), batches(x, y))
    with pytest.raises(ValueError, match="prior_precision"):
        lap.prior_precision = bad
    with pytest.raises(ValueError, match="prior_precision"):
        lap.log_marginal_likelihood(bad)


def test_bad_arguments(classification):
    model, x, y = classification
    data = batches(x, y)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            Laplace(model, nn.CrossEntropyLoss(), data, temperature=bad)
    with pytest.raises(ValueError, match="Unknown curvature"):
        Laplace(model, nn.CrossEntropyLoss(), data, curvature="kfca")
    with pytest.raises(TypeError, match="curvature"):
        Laplace(model, nn.CrossEntropyLoss(), data, curvature=torch.eye(23))
    with pytest.raises(ValueError, match="size 5"):
        Laplace(model, nn.CrossEntropyLoss(), data, curvature=curvops.Identity(5, dtype=DOUBLE))
    with pytest.raises(ValueError, match="sigma_noise"):
        Laplace(model, nn.CrossEntropyLoss(), data, sigma_noise=1.0)
    with pytest.raises(ValueError, match="negative log-likelihood"):
        Laplace(model, nn.L1Loss(), data)
    with pytest.raises(ValueError, match="weight"):
        Laplace(model, nn.CrossEntropyLoss(weight=torch.ones(2, dtype=DOUBLE)), data)
    with pytest.raises(ValueError, match="curvature_options"):
        Laplace(model, nn.CrossEntropyLoss(), data, curvature="full", curvature_options={"bias": "joint"})
    lap = Laplace(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match="temperature"):
        lap.temperature = -2.0
    with pytest.raises(ValueError, match=r"rejects inputs of shape \[3, 5\]"):
        lap.predictive(torch.randn(3, 5, dtype=DOUBLE))
    with pytest.raises(ValueError, match="rejects inputs"):
        lap.predictive(torch.randn(3, 5, dtype=DOUBLE), method="mc", n_samples=2)
    with pytest.raises(TypeError, match="tensor"):
        lap.predictive([[0.0] * 4])
    with pytest.raises(ValueError, match="predictive method"):
        lap.predictive(x, method="laplace")
    with pytest.raises(ValueError, match="link approximation"):
        lap.predictive(x, link_approx="laplace")
    with pytest.raises(ValueError, match="n_samples"):
        lap.predictive(x, n_samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        lap.glm_distribution(x, batch_size=0)
    with pytest.raises(ValueError, match="n must"):
        lap.sample(0)
    with pytest.raises(ValueError, match="prior precision method"):
        lap.optimize_prior_precision(method="cv")
    with pytest.raises(ValueError, match="grid"):
        lap.optimize_prior_precision(method="grid", grid=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="steps"):
        lap.optimize_prior_precision(steps=0)


def test_indefinite_curvature_is_refused(classification):
    model, x, y = classification
    indefinite = curvops.Diagonal(torch.linspace(-1.0, 1.0, 23, dtype=DOUBLE))
    lap = Laplace(model, nn.CrossEntropyLoss(), batches(x, y), curvature=indefinite, prior_precision=5.0)
    with pytest.raises(NotPositiveDefiniteError):
        lap.log_marginal_likelihood()
