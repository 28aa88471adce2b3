"""Inputs of real pipelines (issue 11, items 5, 7, 8, 9): shared modules, targets, parameter
subsets and graphs, frozen parameters, ``params`` dicts, empty products and bare ``(X, y)`` pairs.

Ground truth is dense float64 autodiff written here: a hand-written forward pass for the shared
model (no ``functional_call``), ``torch.func.jacrev`` over a flat parameter vector otherwise.
"""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import curvops
from curvops.influence import influence_scores

DOUBLE = torch.float64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Laplace's "not at a minimum" on untrained models
        yield


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DOUBLE)


# ------------------------------------------------------------------------------ dense truth


class FlatTruth:
    """Dense curvature of ``loss_sum(f(x; θ), y)`` in a flat vector over ``params`` (the others fixed).

    ``forward(values, x)`` maps ``[tensor per param]`` to the output; by default it is
    ``functional_call`` on a model without shared modules.
    """

    def __init__(self, params, x, y, loss_sum, forward):
        self.shapes = [p.shape for p in params]
        self.theta = torch.cat([p.detach().reshape(-1) for p in params])
        self.x, self.y, self.loss_sum, self.forward = x, y, loss_sum, forward

    def unflatten(self, theta):
        parts = theta.split([math.prod(s) for s in self.shapes])
        return [part.reshape(s) for part, s in zip(parts, self.shapes, strict=True)]

    def output(self, theta, x=None):
        return self.forward(self.unflatten(theta), self.x if x is None else x)

    def jacobian(self, x=None):
        return jacrev(lambda t: self.output(t, x).reshape(-1))(self.theta)

    def ggn(self):
        out = self.output(self.theta).detach()
        lam = jacrev(jacrev(lambda o: self.loss_sum(o.reshape(out.shape), self.y)))(out.reshape(-1))
        j = self.jacobian()
        return j.T @ lam @ j

    def hessian(self):
        return jacrev(jacrev(lambda t: self.loss_sum(self.output(t), self.y)))(self.theta)

    def datum_gradients(self, targets):
        rows = [
            jacrev(lambda t, n=n: self.loss_sum(self.output(t, self.x[n : n + 1]), targets[n : n + 1]))(
                self.theta
            )
            for n in range(len(self.x))
        ]
        return torch.stack(rows)

    def fisher(self, targets):
        g = self.datum_gradients(targets)
        return g.T @ g


def model_forward(model, params):
    """``functional_call`` of a model without shared modules, with ``params`` replaced."""
    names = {id(p): name for name, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    return lambda values, x: functional_call(model, dict(zip(keys, values, strict=True)), (x,))


def sum_mse(output, target):
    return (output - target).square().sum()


def sum_ce(output, target):
    return nn.functional.cross_entropy(output, target, reduction="sum")


def mlp(seed=0, layer_norm=False):
    torch.manual_seed(seed)
    middle = nn.LayerNorm(4) if layer_norm else nn.Tanh()
    return nn.Sequential(nn.Linear(3, 4), middle, nn.Linear(4, 3)).double()


# ------------------------------------------------------------------ item 5: shared modules


def shared_model():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(3, 2)).double()


def shared_forward(values, x):
    """The shared model written out: ``W2 tanh(lin(tanh(lin(x)))) + b2`` with ``lin`` used twice."""
    w, b, w2, b2 = values
    hidden = torch.tanh(x @ w.T + b) @ w.T + b
    return hidden @ w2.T + b2


SHARED_X, SHARED_Y = randn(6, 3, seed=1), torch.tensor([0, 1, 1, 0, 1, 0])


def shared_truth(model):
    return FlatTruth(list(model.parameters()), SHARED_X, SHARED_Y, sum_ce, shared_forward)


def check_untouched_and_trainable(model, original):
    """The model still holds its own Parameters and training gives them a gradient."""
    assert model[0].weight is original[0] and model[2].weight is original[0]
    assert [p for p in model.parameters()] == original
    assert all(type(p) is nn.Parameter for p in model.parameters())
    model.zero_grad()
    nn.functional.cross_entropy(model(SHARED_X), SHARED_Y).backward()
    assert all(p.grad is not None for p in model.parameters())
    truth = jacrev(lambda t: sum_ce(shared_truth(model).output(t), SHARED_Y) / len(SHARED_Y))
    expected = truth(shared_truth(model).theta)
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), expected)


@pytest.mark.parametrize("kind", ["GGN", "Hessian", "EmpiricalFisher", "FisherMC"])
def test_shared_module_curvature_is_exact_and_keeps_parameters(kind):
    model = shared_model()
    original = list(model.parameters())
    data = [(SHARED_X[:4], SHARED_Y[:4]), (SHARED_X[4:], SHARED_Y[4:])]
    op = getattr(curvops, kind)(model, nn.CrossEntropyLoss(), data)
    v = randn(op.shape[0], 3, seed=2)
    product = op @ v
    truth = shared_truth(model)
    if kind == "GGN":
        dense = truth.ggn()
    elif kind == "Hessian":
        dense = truth.hessian()
    elif kind == "EmpiricalFisher":
        dense = truth.fisher(SHARED_Y)
    else:
        outputs = [shared_forward(truth.unflatten(truth.theta), x) for x, _ in data]
        labels = torch.cat(
            [op.sample_targets(i, o, y)[0] for i, (o, (_, y)) in enumerate(zip(outputs, data, strict=True))]
        )
        dense = truth.fisher(labels)
    assert torch.allclose(product, dense @ v / len(SHARED_Y), atol=1e-10)
    check_untouched_and_trainable(model, original)


def test_shared_module_jacobian_is_exact_and_keeps_parameters():
    model = shared_model()
    original = list(model.parameters())
    jac = curvops.Jacobian(model, [(SHARED_X, None)])
    dense = shared_truth(model).jacobian()
    v, u = randn(jac.shape[1], 2, seed=3), randn(jac.shape[0], 2, seed=4)
    assert torch.allclose(jac @ v, dense @ v) and torch.allclose(jac.T @ u, dense.T @ u)
    check_untouched_and_trainable(model, original)


def test_shared_module_laplace_diagonal_and_influence():
    model = shared_model()
    original = list(model.parameters())
    truth = shared_truth(model)
    la = curvops.Laplace(model, nn.CrossEntropyLoss(), [(SHARED_X, SHARED_Y)], curvature="diagonal")
    check_untouched_and_trainable(model, original)
    curvature = torch.diag(truth.ggn().diagonal())
    expected = dense_marglik(curvature, truth.theta, sum_ce(truth.output(truth.theta), SHARED_Y), 1.0)
    assert torch.allclose(la.log_marginal_likelihood(), expected)

    train, query = (SHARED_X, SHARED_Y), (SHARED_X[:2], SHARED_Y[:2])
    scores = influence_scores(model, nn.CrossEntropyLoss(), train, query, curvature="identity", damping=0.0)
    check_untouched_and_trainable(model, original)
    g = truth.datum_gradients(SHARED_Y)
    assert torch.allclose(scores, g[:2] @ g.T)


def test_tied_weight_of_two_modules_sums_both_uses():
    torch.manual_seed(0)
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second, nn.Linear(3, 2)).double()
    original = list(model.parameters())  # 0.weight, 0.bias, 2.bias, 3.weight, 3.bias

    def tied_forward(values, x):
        w, b, b2, w3, b3 = values
        return (torch.tanh(x @ w.T + b) @ w.T + b2) @ w3.T + b3

    truth = FlatTruth(original, SHARED_X, SHARED_Y, sum_ce, tied_forward)
    ggn = curvops.GGN(model, nn.CrossEntropyLoss(), [(SHARED_X, SHARED_Y)])
    assert torch.allclose(ggn.to_dense(), truth.ggn() / len(SHARED_Y))
    assert list(model.parameters()) == original and model[2].weight is model[0].weight


# ------------------------------------------------------------------------- item 7: targets

X6 = randn(6, 3, seed=5)


def first_product(build):
    """Build an operator and multiply once (GGN-like operators check targets on their passes)."""
    op = build()
    if isinstance(op, curvops.CurvatureOperator):
        op @ torch.ones(op.shape[0], dtype=DOUBLE)
    return op


BUILDERS = {
    "GGN": lambda m, lf, d: curvops.GGN(m, lf, d),
    "Hessian": lambda m, lf, d: curvops.Hessian(m, lf, d),
    "EmpiricalFisher": lambda m, lf, d: curvops.EmpiricalFisher(m, lf, d),
    "FisherMC": lambda m, lf, d: curvops.FisherMC(m, lf, d),
    "KFAC type-2": lambda m, lf, d: curvops.KFAC(m, lf, d, fisher_type="type-2"),
    "KFAC mc": lambda m, lf, d: curvops.KFAC(m, lf, d, fisher_type="mc"),
    "EKFAC empirical": lambda m, lf, d: curvops.EKFAC(m, lf, d, fisher_type="empirical"),
    "Laplace kfac": lambda m, lf, d: curvops.Laplace(m, lf, d, curvature="kfac"),
    "Laplace diagonal": lambda m, lf, d: curvops.Laplace(m, lf, d, curvature="diagonal"),
    "influence": lambda m, lf, d: influence_scores(m, lf, d, d[:1], curvature="identity"),
}

LONG = torch.long
TARGET_CASES = {
    # name: (loss, good targets of batch 0, bad targets of batch 1, a phrase of the message)
    "MSE [N,1] for [N,3]": (nn.MSELoss(), randn(3, 3), randn(3, 1), r"shape \[3, 3\], got \[3, 1\]"),
    "MSE [N,2] for [N,3]": (nn.MSELoss(), randn(3, 3), randn(3, 2), r"shape \[3, 3\], got \[3, 2\]"),
    "CE float indices": (
        nn.CrossEntropyLoss(),
        torch.tensor([0, 1, 2]),
        torch.tensor([0.0, 1.0, 2.0], dtype=DOUBLE),
        r"y\.long\(\)",
    ),
    "CE labels [N,1]": (
        nn.CrossEntropyLoss(),
        torch.tensor([0, 1, 2]),
        torch.tensor([[0], [1], [2]]),
        r"shape \[3\], got \[3, 1\].*squeeze\(1\)",
    ),
    "CE label 5": (nn.CrossEntropyLoss(), torch.tensor([0, 1, 2]), torch.tensor([0, 5, 2]), "class index 5"),
    "CE label -1": (
        nn.CrossEntropyLoss(),
        torch.tensor([0, 1, 2]),
        torch.tensor([0, -1, 2]),
        "class index -1",
    ),
    "BCE [N,1] for [N,3]": (
        nn.BCEWithLogitsLoss(),
        torch.rand(3, 3, dtype=DOUBLE),
        torch.rand(3, 1, dtype=DOUBLE),
        r"shape \[3, 3\], got \[3, 1\]",
    ),
}


@pytest.mark.parametrize("case", TARGET_CASES)
@pytest.mark.parametrize("builder", BUILDERS)
def test_bad_targets_raise_naming_the_batch_and_shapes(case, builder):
    loss_fn, good, bad, phrase = TARGET_CASES[case]
    data = [(X6[:3], good), (X6[3:], bad)]
    with pytest.raises(ValueError, match=f"Batch 1: .*{phrase}"):
        first_product(lambda: BUILDERS[builder](mlp(), loss_fn, data))


@pytest.mark.parametrize("builder", ["GGN", "KFAC type-2", "Laplace kfac", "influence"])
def test_sequence_output_for_cross_entropy_says_what_torch_wants(builder):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3)).double()  # [B, S, V] = [2, 4, 3]
    tokens, labels = torch.randint(0, 5, (2, 4)), torch.randint(0, 3, (2, 4))
    with pytest.raises(ValueError, match=r"Batch 0: .*\[B, S, C\].*\[2, 3, 4\].*\[8, 3\]"):
        first_product(lambda: BUILDERS[builder](model, nn.CrossEntropyLoss(), [(tokens, labels)]))


def test_weighted_cross_entropy_label_out_of_range_is_refused():
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=DOUBLE))
    with pytest.raises(ValueError, match="out of range for the 3 class weights"):
        first_product(lambda: curvops.GGN(mlp(), loss_fn, [(X6, torch.tensor([0, 1, 2, 0, 1, -1]))]))


def test_good_targets_still_pass_the_check():
    """Ignored labels, probabilities and [N, C, S] outputs are accepted."""
    targets = torch.tensor([0, -100, 2, 1, 1, 0])
    first_product(lambda: curvops.GGN(mlp(), nn.CrossEntropyLoss(), [(X6, targets)]))
    probabilities = torch.softmax(randn(6, 3, seed=7), dim=1)
    first_product(lambda: curvops.GGN(mlp(), nn.CrossEntropyLoss(), [(X6, probabilities)]))


# ---------------------------------------------------- item 8: no graph leaves an operator


def last_layer_setup():
    model = mlp()
    x, y = randn(6, 3, seed=8), randn(6, 3, seed=9)
    return model, [model[2].weight, model[2].bias], x, y


def assert_no_graph(tensor):
    assert not tensor.requires_grad and tensor.grad_fn is None


@pytest.mark.parametrize("kind", ["GGN", "Hessian", "EmpiricalFisher", "FisherMC"])
def test_operators_on_a_parameter_subset_return_no_graph(kind):
    model, subset, x, y = last_layer_setup()
    op = getattr(curvops, kind)(model, nn.MSELoss(), [(x, y)], params=subset)
    v = randn(op.shape[0], 2, seed=10)
    for result in (op @ v, op.to_dense(), op.diagonal(), op.trace(), op.inverse(damping=1.0) @ v):
        assert_no_graph(result)


def test_jacobian_on_a_parameter_subset_returns_no_graph():
    model, subset, x, _ = last_layer_setup()
    jac = curvops.Jacobian(model, [(x.requires_grad_(True), None)], params=subset)
    assert_no_graph(jac @ randn(jac.shape[1], seed=11))
    assert_no_graph(jac.T @ randn(jac.shape[0], seed=12))
    assert_no_graph(jac.to_dense())


@pytest.mark.parametrize("unsupported", ["dense", "diagonal"])
def test_kfac_unsupported_blocks_carry_no_graph(unsupported):
    model, x, y = mlp(layer_norm=True), randn(6, 3, seed=8), randn(6, 3, seed=9)
    op = curvops.KFAC(model, nn.MSELoss(), [(x, y)], fisher_type="type-2", unsupported=unsupported)
    tensors = []

    def collect(state):
        tensors.extend(state["tensors"].values())
        for child in state["children"]:
            collect(child)

    collect(op.state_dict())
    assert tensors and all(t.grad_fn is None and not t.requires_grad for t in tensors)
    assert_no_graph(op @ randn(op.shape[0], seed=13))


def dense_marglik(curvature, theta, loss_sum, tau):
    """``-L - ½ (logdet(K + τI) - D log τ) - ½ τ ‖θ‖²`` in float64."""
    size, tau = theta.numel(), torch.as_tensor(tau, dtype=DOUBLE)
    logdet = torch.linalg.slogdet(curvature + tau * torch.eye(size, dtype=DOUBLE))[1]
    return -loss_sum - 0.5 * (logdet - size * tau.log()) - 0.5 * tau * theta @ theta


@pytest.mark.parametrize("curvature", ["full", "diagonal"])
def test_last_layer_laplace_optimizes_its_prior(curvature):
    model, subset, x, y = last_layer_setup()
    la = curvops.Laplace(model, nn.MSELoss(), [(x, y)], curvature=curvature, params=subset)
    tau = float(la.optimize_prior_precision())
    truth = FlatTruth(subset, x, y, sum_mse, model_forward(model, subset))
    ggn = truth.ggn()
    ggn = ggn if curvature == "full" else torch.diag(ggn.diagonal())
    expected = dense_marglik(ggn, truth.theta, sum_mse(truth.output(truth.theta), y), tau)
    assert torch.allclose(la.log_marginal_likelihood(), expected)
    log_tau = torch.tensor(tau, dtype=DOUBLE).log()
    gradient = torch.func.grad(lambda t: dense_marglik(ggn, truth.theta, 0.0, t.exp()))(log_tau)
    assert abs(float(gradient)) < 1e-3 * truth.theta.numel()  # at the maximum of the true evidence


def test_layer_norm_laplace_kfac_optimizes_its_prior():
    """One datum: KFAC's Linear blocks and the LayerNorm's exact blocks are the exact GGN's blocks."""
    model, x, y = mlp(layer_norm=True), randn(1, 3, seed=14), randn(1, 3, seed=15)
    options = {"unsupported": "dense"}
    la = curvops.Laplace(model, nn.MSELoss(), [(x, y)], curvature="kfac", curvature_options=options)
    tau = float(la.optimize_prior_precision())
    params = list(model.parameters())
    truth = FlatTruth(params, x, y, sum_mse, model_forward(model, params))
    sizes = [p.numel() for p in params]
    groups = [[0], [1], [2], [3], [4], [5]]  # weight, bias, LayerNorm weight, bias (bias="separate"), ...
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    mask = torch.zeros(sum(sizes), sum(sizes), dtype=torch.bool)
    for group in groups:
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in group])
        mask[rows.unsqueeze(1), rows] = True
    ggn = truth.ggn() * mask
    expected = dense_marglik(ggn, truth.theta, sum_mse(truth.output(truth.theta), y), tau)
    assert torch.allclose(la.log_marginal_likelihood(), expected)


# ----------------------------------------- item 9: frozen parameters, dicts, empty, bare pairs


def frozen_setup():
    model = mlp()
    for p in [*model[0].parameters(), model[2].bias]:
        p.requires_grad_(False)
    x, y = randn(6, 3, seed=16), torch.tensor([0, 1, 2, 2, 1, 0])
    params = list(model.parameters())
    return model, params, x, y, FlatTruth(params, x, y, sum_ce, model_forward(model, params))


@pytest.mark.parametrize("kind", ["GGN", "Hessian", "EmpiricalFisher", "Jacobian"])
def test_frozen_parameters_in_params_are_exact(kind):
    model, params, x, y, truth = frozen_setup()
    if kind == "Jacobian":
        op, dense = curvops.Jacobian(model, [(x, y)], params=params), truth.jacobian()
    else:
        op = getattr(curvops, kind)(model, nn.CrossEntropyLoss(), [(x, y)], params=params)
        dense = {"GGN": truth.ggn, "Hessian": truth.hessian}.get(kind, lambda: truth.fisher(y))() / len(y)
    v = randn(op.shape[1], 2, seed=17)
    assert torch.allclose(op @ v, dense @ v, atol=1e-10)
    assert all(not p.requires_grad for p in [*model[0].parameters(), model[2].bias])


def separate_blocks(dense, params):
    """``dense`` with only its diagonal blocks per parameter tensor."""
    sizes = [p.numel() for p in params]
    return torch.block_diag(*[block.split(sizes, dim=1)[i] for i, block in enumerate(dense.split(sizes))])


@pytest.mark.parametrize("build", ["KFAC", "EKFAC", "Laplace", "influence"])
def test_frozen_parameters_in_kronecker_operators(build):
    """One datum: KFAC (type-2, separate bias) is the exact GGN's block diagonal."""
    model, params, x, y, _ = frozen_setup()
    x, y = x[:1], y[:1]
    truth = FlatTruth(params, x, y, sum_ce, model_forward(model, params))
    blocks = separate_blocks(truth.ggn(), params)
    if build in ("KFAC", "EKFAC"):
        op = getattr(curvops, build)(
            model, nn.CrossEntropyLoss(), [(x, y)], params=params, fisher_type="type-2"
        )
        assert torch.allclose(op.to_dense(), blocks, atol=1e-10)
    elif build == "Laplace":
        la = curvops.Laplace(model, nn.CrossEntropyLoss(), [(x, y)], params=params, curvature="kfac")
        expected = dense_marglik(blocks, truth.theta, sum_ce(truth.output(truth.theta), y), 1.0)
        assert torch.allclose(la.log_marginal_likelihood(), expected)
    else:
        scores = influence_scores(
            model, nn.CrossEntropyLoss(), (x, y), (x, y), params=params, curvature="kfac", bias="separate",
            damping=0.5,
        )  # fmt: skip
        g = truth.datum_gradients(y)
        expected = g @ torch.linalg.solve(blocks + 0.5 * torch.eye(len(blocks), dtype=DOUBLE), g.T)
        assert torch.allclose(scores, expected)


def test_params_as_a_dict_means_its_values_in_order():
    model, x, y = mlp(), X6, randn(6, 3, seed=18)
    named = dict(model.named_parameters())
    params = list(named.values())
    dense = FlatTruth(params, x, y, sum_mse, model_forward(model, params)).ggn() / y.numel()
    ggn = curvops.GGN(model, nn.MSELoss(), [(x, y)], params=named)
    assert torch.allclose(ggn.to_dense(), dense)
    subset = {"2.weight": model[2].weight, "0.bias": model[0].bias}
    assert curvops.GGN(model, nn.MSELoss(), [(x, y)], params=subset).params == list(subset.values())
    kfac = curvops.KFAC(model, nn.MSELoss(), [(x, y)], params=named, fisher_type="type-2")
    assert kfac.shape == ggn.shape
    with pytest.raises(TypeError, match="not one tensor"):
        curvops.GGN(model, nn.MSELoss(), [(x, y)], params=model[0].weight)


def empty_product_operators():
    model, x, y = mlp(), X6, randn(6, 3, seed=19)
    data, loss_fn = [(x, y)], nn.MSELoss()
    ggn = curvops.GGN(model, loss_fn, data)
    kfac = curvops.KFAC(model, loss_fn, data, fisher_type="type-2")
    return {
        "GGN": ggn,
        "Hessian": curvops.Hessian(model, loss_fn, data),
        "EmpiricalFisher": curvops.EmpiricalFisher(model, loss_fn, data),
        "FisherMC": curvops.FisherMC(model, loss_fn, data),
        "Jacobian": curvops.Jacobian(model, data),
        "Jacobian.T": curvops.Jacobian(model, data).T,
        "CG inverse": ggn.inverse(damping=1.0),
        "KFAC": kfac,
        "KFAC inverse": kfac.inverse(damping=1.0),
        "EKFAC": curvops.EKFAC(model, loss_fn, data, fisher_type="type-2"),
        "Dense": curvops.Dense(torch.eye(4, dtype=DOUBLE)),
        "Diagonal": curvops.Diagonal(torch.ones(4, dtype=DOUBLE)),
        "Kronecker": curvops.Kronecker(torch.eye(2, dtype=DOUBLE), torch.eye(3, dtype=DOUBLE)),
        "Sum": ggn + 2.0 * curvops.Identity(ggn.shape[0], DOUBLE),
    }


def test_products_with_no_columns_are_empty():
    for name, op in empty_product_operators().items():
        result = op @ torch.zeros(op.shape[1], 0, dtype=DOUBLE)
        assert result.shape == (op.shape[0], 0), name
        assert op.matmat(torch.zeros(op.shape[1], 0).numpy()).shape == (op.shape[0], 0), name


def bare_pair_results(data):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    v = randn(31, seed=20)
    return {
        "GGN": curvops.GGN(model, loss_fn, data) @ v,
        "Hessian": curvops.Hessian(model, loss_fn, data) @ v,
        "KFAC": curvops.KFAC(model, loss_fn, data, fisher_type="type-2") @ v,
        "Jacobian": curvops.Jacobian(model, data) @ v,
        "Laplace": curvops.Laplace(model, loss_fn, data).log_marginal_likelihood(),
        "influence": influence_scores(model, loss_fn, data, data, curvature="identity"),
    }


def test_a_bare_pair_is_one_batch_everywhere():
    x, y = X6, torch.tensor([0, 1, 2, 2, 1, 0])
    model = mlp()
    params = list(model.parameters())
    truth = FlatTruth(params, x, y, sum_ce, model_forward(model, params))
    bare, listed = bare_pair_results((x, y)), bare_pair_results([(x, y)])
    for name in bare:
        assert torch.equal(bare[name], listed[name]), name
    assert torch.allclose(bare["GGN"], truth.ggn() @ randn(31, seed=20) / len(y))
    pairs = ((x[:3], y[:3]), (x[3:], y[3:]))  # a tuple of batches stays a data set of two batches
    assert curvops.Jacobian(model, pairs).shape == (18, 31)


@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_kfac_optimizer_refuses_a_broadcast_target(fisher_type):
    """torch's MSELoss only warns and broadcasts; the capture's loss hook raises, naming the step."""
    model, loss_fn = mlp(), nn.MSELoss()
    opt = curvops.optim.KFACOptimizer(model, loss_fn, fisher_type=fisher_type, lr=0.1, damping=0.1)
    with pytest.raises(ValueError, match=r"Batch 0: MSELoss needs a target of the output's shape \[6, 3\]"):
        loss_fn(model(X6), randn(6, 1)).backward()
    opt.zero_grad()
