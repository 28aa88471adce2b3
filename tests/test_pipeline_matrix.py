"""A table of every entry point against the real-pipeline cases of issue 11 (items 1-9).

Each entry point is a function ``(model, loss_fn, data, params) -> {name: tensor}`` of the
answers a user reads from it (products, dense matrices, traces, log-determinants, Laplace's
evidence, samples and predictives, influence scores, ``compare``'s metrics). A case holds for
an entry point when the answers are right (against a dense float64 truth from ``torch.func``,
or against the same entry point on one clean batch where the truth is the same matrix) or the
call raises a clear curvops error.
"""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import jacrev
from torch.utils.data import DataLoader, TensorDataset

import curvops
from curvops.influence import (
    influence_curvature,
    influence_scores,
    leave_one_out_scores,
    self_influence,
    top_influences,
)
from curvops.laplace import Laplace

DOUBLE = torch.float64
IGNORE = -100
RANDOM = r"random numbers in its forward pass.*model\.eval\(\) or use a fixed dropout mask"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Laplace's "not at a minimum", influence's mode notes
        yield


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DOUBLE)


def mlp(*extra):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), *extra, nn.Tanh(), nn.Linear(4, 3)).double()


def labelled(n=40, ignored=15):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, dtype=DOUBLE, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    y[:ignored] = IGNORE
    return x, y


def batches_of(x, y, size=10):
    return list(zip(x.split(size), y.split(size), strict=True))


def shuffled(x, y, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True, generator=generator)


# ------------------------------------------------------------------ the answers of entry points


def operator_answers(op):
    """Products, and for a square operator its dense matrix, diagonal, trace and logdet."""
    v = randn(op.shape[1], 2, seed=3)
    answers = {"product": op @ v, "empty product": op @ torch.zeros(op.shape[1], 0, dtype=DOUBLE)}
    if op.shape[0] == op.shape[1]:
        answers.update(
            dense=op.to_dense(),
            diagonal=op.diagonal(),
            trace=op.trace(),
            logdet=op.logdet(damping=1.0, method="exact"),
            inverse=op.inverse(damping=1.0, method="exact") @ v,
        )
    return answers


def laplace_answers(la):
    x = randn(5, 3, seed=4)
    answers = {
        "marglik": la.log_marginal_likelihood(),
        "marglik at 2": la.log_marginal_likelihood(2.0),
        "posterior precision": la.posterior_precision.to_dense(),
        "sample": la.sample(3, generator=torch.Generator().manual_seed(0)),
        "predictive": la.predictive(x),
        "glm mean": la.glm_distribution(x)[0],
        "glm covariance": la.glm_distribution(x)[1],
    }
    answers["prior"] = la.optimize_prior_precision(steps=20)  # last: it changes τ
    return answers


def compare_answers(reference, approximation):
    c = curvops.compare(
        reference, approximation, damping=[0.1, 1.0], k=2, generator=torch.Generator().manual_seed(0)
    )
    return {
        "frobenius": torch.tensor(c.frobenius_error),
        "trace ratio": torch.tensor(c.trace_ratio),
        "logdet": torch.tensor(c.logdet_error),
        "top": torch.tensor(c.top_eigenvalues_approximation),
    }


def kron(name, **fixed):
    def build(m, lf, d, params=None):
        return curvops.nn.kfac.kronecker_approximation(name, m, lf, d, params=params, **fixed)

    return build


OPERATORS = {
    "GGN": lambda m, lf, d, params=None: curvops.GGN(m, lf, d, params=params),
    "Hessian": lambda m, lf, d, params=None: curvops.Hessian(m, lf, d, params=params),
    "EmpiricalFisher": lambda m, lf, d, params=None: curvops.EmpiricalFisher(m, lf, d, params=params),
    "FisherMC": lambda m, lf, d, params=None: curvops.FisherMC(m, lf, d, params=params),
    "Jacobian": lambda m, lf, d, params=None: curvops.Jacobian(m, d, params=params),
    "KFAC": kron("kfac", fisher_type="type-2"),
    "EKFAC": kron("ekfac", fisher_type="type-2"),
    "TKFAC": kron("tkfac", fisher_type="type-2"),
    "TEKFAC": kron("tekfac", fisher_type="type-2"),
    "KFAC mc": kron("kfac", fisher_type="mc"),
    "EKFAC empirical": kron("ekfac", fisher_type="empirical"),
}
LAPLACE = ["kfac", "ekfac", "tkfac", "tekfac", "diagonal", "full"]


def laplace_entry(curvature):
    def run(m, lf, d, params=None):
        return laplace_answers(Laplace(m, lf, d, curvature=curvature, params=params))

    return run


def influence_entry(kind):
    def run(m, lf, d, params=None):
        common = {"params": params, "damping": 0.5, "train_batch_size": 7}
        if kind == "influence_scores ggn":
            scores = influence_scores(m, lf, d, d, curvature="ggn", **common)
            return {"scores": scores, "top values": top_influences(scores, 3).helpful_scores}
        if kind == "influence_scores ekfac":
            return {"scores": influence_scores(m, lf, d, d, curvature="ekfac", **common)}
        if kind == "self_influence":
            return {"self": self_influence(m, lf, d, curvature="ekfac", **common)}
        if kind == "leave_one_out_scores":
            return {"loo": leave_one_out_scores(m, lf, d, d, [1, 4], curvature="ggn", **common)}
        op = influence_curvature(m, lf, d, curvature="ekfac", params=params)
        return operator_answers(op)

    return run


INFLUENCE = [
    "influence_scores ggn",
    "influence_scores ekfac",
    "self_influence",
    "leave_one_out_scores",
    "influence_curvature",
]


def compare_entry(m, lf, d, params=None):
    reference = curvops.GGN(m, lf, d, params=params)
    return compare_answers(reference, curvops.KFAC(m, lf, d, params=params, fisher_type="type-2"))


def operator_entry(build):
    def run(m, lf, d, params=None):
        return operator_answers(build(m, lf, d, params=params))

    return run


ENTRIES = {
    **{name: operator_entry(build) for name, build in OPERATORS.items()},
    **{f"Laplace {c}": laplace_entry(c) for c in LAPLACE},
    **{name: influence_entry(name) for name in INFLUENCE},
    "compare": compare_entry,
}
ORDER_FREE = [
    *["GGN", "Hessian", "EmpiricalFisher", "KFAC", "EKFAC", "TKFAC", "TEKFAC", "EKFAC empirical"],
    *[f"Laplace {c}" for c in LAPLACE],
    "influence_curvature",
    "compare",
]
BY_POSITION = ["influence_scores ggn", "influence_scores ekfac", "self_influence", "leave_one_out_scores"]


def assert_same_answers(first, second, rtol=1e-9, atol=1e-10):
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=rtol, atol=atol, msg=name)


def assert_no_graph(answers):
    for name, tensor in answers.items():
        assert not tensor.requires_grad and tensor.grad_fn is None, name


# --------------------------------------------------------------- case 1: shuffled loader, padding


LOSSES = {
    "ignore_index": lambda: nn.CrossEntropyLoss(ignore_index=IGNORE),
    "class weight": lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([0.5, 2.0, 1.0], dtype=DOUBLE), ignore_index=IGNORE
    ),
}


def outcome(run):
    """The answers of ``run()``, or the message of the clear ``ValueError`` it raises."""
    try:
        return run()
    except ValueError as error:
        return str(error)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("entry", ORDER_FREE)
def test_shuffled_padded_loader_gives_the_one_batch_answers(entry, loss):
    """The same answers as one batch; where a weighted loss is refused, the same refusal."""
    x, y = labelled()
    one_batch = outcome(lambda: ENTRIES[entry](mlp(), LOSSES[loss](), [(x, y)]))
    answers = outcome(lambda: ENTRIES[entry](mlp(), LOSSES[loss](), shuffled(x, y)))
    if isinstance(one_batch, str):
        assert loss == "class weight" and "weight" in one_batch and answers == one_batch
    else:
        assert_same_answers(answers, one_batch)


@pytest.mark.parametrize("entry", BY_POSITION)
def test_scores_by_position_refuse_a_reshuffled_loader(entry):
    x, y = labelled(ignored=0)
    with pytest.raises(curvops.NonDeterministicDataError, match=r"differs.*shuffle=False"):
        ENTRIES[entry](mlp(), nn.CrossEntropyLoss(), shuffled(x, y))


@pytest.mark.parametrize("entry", ["influence_scores ggn", "self_influence", "leave_one_out_scores"])
def test_scores_by_position_with_padding_in_fixed_batches(entry):
    """A fixed loader of several batches with padding labels: the same scores as one batch."""
    x, y = labelled(n=14, ignored=5)
    one_batch = ENTRIES[entry](mlp(), LOSSES["ignore_index"](), [(x, y)])
    assert_same_answers(ENTRIES[entry](mlp(), LOSSES["ignore_index"](), batches_of(x, y, 4)), one_batch)


PADDING_BATCH = ["KFAC", "EKFAC", "TKFAC", "TEKFAC", "EKFAC empirical", "Laplace kfac", "influence_curvature"]


@pytest.mark.parametrize("entry", PADDING_BATCH)
def test_a_batch_of_only_padding_labels_gives_the_one_batch_answers(entry):
    """A fixed loader whose first batch holds padding labels only: its inputs enter no factor."""
    x, y = labelled(n=14, ignored=5)
    lf = LOSSES["ignore_index"]()
    one_batch = ENTRIES[entry](mlp(), lf, [(x, y)])
    assert_same_answers(ENTRIES[entry](mlp(), lf, batches_of(x, y, 4)), one_batch)


def test_weighted_padded_influence_matches_the_dense_truth_in_any_batching():
    """``ℓ_n`` the weighted summed CE of datum ``n``; ``F`` the GGN of the mean, ``Z = Σ w_y``."""
    x, y = labelled(n=14, ignored=5)
    weight = torch.tensor([0.5, 2.0, 1.0], dtype=DOUBLE)
    loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE)
    summed = nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE, reduction="sum")
    model = mlp()
    names, shapes = [n for n, _ in model.named_parameters()], [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def output(t, inputs):
        parts = t.split([s.numel() for s in shapes])
        values = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return torch.func.functional_call(model, values, (inputs,))

    out = output(theta, x)
    lam = jacrev(jacrev(lambda o: summed(o.reshape(out.shape), y)))(out.reshape(-1))
    jac = jacrev(lambda t: output(t, x).reshape(-1))(theta)
    terms = float(weight[y[y != IGNORE]].sum())
    damped = jac.T @ lam @ jac / terms + 0.5 * torch.eye(len(theta), dtype=DOUBLE)
    grads = torch.stack(
        [jacrev(lambda t, n=n: summed(output(t, x[n : n + 1]), y[n : n + 1]))(theta) for n in range(14)]
    )
    truth = grads @ torch.linalg.solve(damped, grads.T)
    for data in ([(x, y)], batches_of(x, y, 4)):
        scores = influence_scores(model, loss_fn, data, data, curvature="ggn", damping=0.5)
        torch.testing.assert_close(scores, truth)
        own = self_influence(model, loss_fn, data, curvature="ggn", damping=0.5)
        torch.testing.assert_close(own, truth.diagonal())


def test_query_scores_refuse_a_reshuffled_query_loader():
    x, y = labelled(ignored=0)
    with pytest.raises(curvops.NonDeterministicDataError, match=r"query_data gradients: batch 0 differs"):
        influence_scores(mlp(), nn.CrossEntropyLoss(), [(x, y)], shuffled(x, y), curvature="identity")


MC_DRAWS = ["FisherMC", "KFAC mc"]  # labels drawn per batch index: another batching, another sample


@pytest.mark.parametrize("entry", [name for name in ENTRIES if name not in MC_DRAWS])
def test_an_empty_batch_changes_nothing(entry):
    x, y = labelled(n=12, ignored=3)
    lf = LOSSES["ignore_index"]()
    with_empty = [(x[:6], y[:6]), (x[:0], y[:0]), (x[6:], y[6:])]
    assert_same_answers(ENTRIES[entry](mlp(), lf, with_empty), ENTRIES[entry](mlp(), lf, [(x, y)]))


# ------------------------------------------------------------- case 2: a pass with fewer batches


class Truncated:
    """Re-iterable data that loses its last batch once it has been read to the end (a stream that ran dry)."""

    def __init__(self, batches):
        self.batches, self.exhausted = batches, False

    def __iter__(self):
        batches = self.batches[:-1] if self.exhausted else self.batches
        yield from batches
        self.exhausted = True


SINGLE_PASS = ["KFAC", "TKFAC", "KFAC mc"]  # one pass: the matrix of the data it saw


@pytest.fixture
def second_correction_pass(monkeypatch):
    """EKFAC's corrections pass over the data again (the statistics pass keeps nothing for them)."""
    monkeypatch.setattr("curvops.nn.kronecker_pass.CORRECTION_CACHE_BYTES", 0)


@pytest.mark.parametrize("entry", [name for name in ENTRIES if name not in SINGLE_PASS])
def test_fewer_batches_on_a_later_pass_raise(entry, second_correction_pass):
    x, y = labelled(n=24, ignored=0)
    with pytest.raises(curvops.NonDeterministicDataError, match=r"yielded \d+ batches.*on the first"):
        ENTRIES[entry](mlp(), nn.CrossEntropyLoss(), Truncated(batches_of(x, y, 6)))


def test_kfac_exact_blocks_see_the_statistics_pass_data():
    """``unsupported="dense"``: a PReLU's exact block is built over the same data as A and G."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 3)).double()
    x, y = labelled(n=24, ignored=0)
    with pytest.raises(curvops.NonDeterministicDataError, match=r"exact block of '1'.*yielded 3 batches"):
        curvops.KFAC(model, nn.CrossEntropyLoss(), Truncated(batches_of(x, y, 6)), unsupported="dense")


MC_ENTRIES = {
    "FisherMC": lambda m, lf, d: operator_answers(curvops.FisherMC(m, lf, d)),
    "EKFAC mc": lambda m, lf, d: operator_answers(kron("ekfac", fisher_type="mc")(m, lf, d)),
    "TEKFAC mc": lambda m, lf, d: operator_answers(kron("tekfac", fisher_type="mc")(m, lf, d)),
    "Laplace kfac mc": lambda m, lf, d: laplace_answers(
        Laplace(m, lf, d, curvature="ekfac", curvature_options={"fisher_type": "mc"})
    ),
    "influence mc": lambda m, lf, d: {"self": self_influence(m, lf, d, curvature="ekfac", fisher_type="mc")},
    "influence_curvature mc": lambda m, lf, d: operator_answers(
        influence_curvature(m, lf, d, curvature="ekfac", fisher_type="mc")
    ),
}


@pytest.mark.parametrize("entry", list(MC_ENTRIES))
def test_monte_carlo_labels_refuse_a_reshuffled_loader(entry, second_correction_pass):
    x, y = labelled(ignored=0)
    with pytest.raises(curvops.NonDeterministicDataError, match=r"batch 0 differs.*shuffle=False"):
        MC_ENTRIES[entry](mlp(), nn.CrossEntropyLoss(), shuffled(x, y))


class Recorded:
    """Re-iterable data that records the batches of each of its passes."""

    def __init__(self, data):
        self.data, self.passes = data, []

    def __iter__(self):
        self.passes.append([])
        for batch in self.data:
            self.passes[-1].append(batch)
            yield batch


@pytest.mark.parametrize("name", ["ekfac", "tekfac"])
@pytest.mark.parametrize("data", ["shuffled", "fewer batches"])
def test_corrections_from_the_kept_statistics_pass_need_one_pass(name, data):
    """Data whose inputs and output gradients fit in CORRECTION_CACHE_BYTES are corrected from what
    the statistics pass kept: no pass more than KFAC's, so a reshuffling loader (with "mc" labels)
    or data that change on a later pass give the operator of the batches the statistics pass saw."""
    x, y = labelled(ignored=5)
    given = Recorded(shuffled(x, y) if data == "shuffled" else Truncated(batches_of(x, y, 6)))
    build = kron(name, fisher_type="mc")
    kept = operator_answers(build(mlp(), nn.CrossEntropyLoss(), given))
    kfac_passes = Recorded(batches_of(x, y, 6))
    curvops.KFAC(mlp(), nn.CrossEntropyLoss(), kfac_passes)
    assert len(given.passes) == len(kfac_passes.passes)
    seen = given.passes[-1]
    assert_same_answers(kept, operator_answers(build(mlp(), nn.CrossEntropyLoss(), seen)))


# ------------------------------------------------------------------ case 3: dropout in train mode


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_dropout_in_train_mode_is_refused_with_one_message(entry):
    x, y = labelled(n=12, ignored=0)
    model = mlp(nn.Dropout(0.5))
    before = torch.get_rng_state()
    with pytest.raises(curvops.NonDeterministicDataError, match=RANDOM):
        ENTRIES[entry](model, nn.CrossEntropyLoss(), [(x, y)])
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------ case 4: batch normalisation


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_batch_norm_in_train_mode_is_refused(entry):
    x, y = labelled(n=12, ignored=0)
    with pytest.raises(ValueError, match=r"'1' is a BatchNorm1d in train mode.*model\.eval\(\)"):
        ENTRIES[entry](mlp(nn.BatchNorm1d(4)), nn.CrossEntropyLoss(), [(x, y)])


def bn_eval_model():
    model = mlp(nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].weight.uniform_(0.5, 1.5)
    return model


KRONECKER_ONLY = ["KFAC", "EKFAC", "TKFAC", "TEKFAC", "KFAC mc", "EKFAC empirical", "compare"]
KRONECKER_ONLY += ["Laplace kfac", "Laplace ekfac", "Laplace tkfac", "Laplace tekfac"]
KRONECKER_ONLY += ["influence_scores ekfac", "self_influence", "influence_curvature"]


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_no_entry_point_changes_parameters_or_buffers(entry):
    """Batch norm in eval mode, restricted to the Linear layers where KFAC cannot take it."""
    model = bn_eval_model()
    state = {name: t.clone() for name, t in model.state_dict().items()}
    tensors = [*model.parameters(), *model.buffers()]
    params = [*model[0].parameters(), *model[3].parameters()] if entry in KRONECKER_ONLY else None
    x, y = labelled(n=12, ignored=0)
    ENTRIES[entry](model, nn.CrossEntropyLoss(), [(x, y)], params=params)
    assert all(a is b for a, b in zip(tensors, [*model.parameters(), *model.buffers()], strict=True))
    for name, t in model.state_dict().items():
        assert torch.equal(t, state[name]), name


def built_then_used(model):
    """``(build, use)`` pairs: built in eval mode, used after ``model.train()``."""
    x, y = labelled(n=12, ignored=0)
    data, lf = [(x, y)], nn.CrossEntropyLoss()
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=DOUBLE)
    head = list(model[-1].parameters())
    return {
        "GGN": (lambda: curvops.GGN(model, lf, data), lambda op: op @ v),
        "Hessian": (lambda: curvops.Hessian(model, lf, data), lambda op: op @ v),
        "Jacobian": (lambda: curvops.Jacobian(model, data), lambda op: op @ v),
        "Laplace predictive": (
            lambda: Laplace(model, lf, data, curvature="full"),
            lambda la: la.predictive(x),
        ),
        "Laplace mc predictive": (
            lambda: Laplace(model, lf, data, curvature="full"),
            lambda la: la.predictive(x, method="mc", generator=torch.Generator().manual_seed(0)),
        ),
        "Laplace glm": (
            lambda: Laplace(model, lf, data, curvature="kfac", params=head),
            lambda la: la.glm_distribution(x),
        ),
        "influence_scores(curvature=op)": (
            lambda: influence_curvature(model, lf, data, curvature="ggn"),
            lambda op: influence_scores(model, lf, data, data, curvature=op),
        ),
    }


MODE_USES = list(built_then_used(mlp()))


@pytest.mark.parametrize("use", MODE_USES)
def test_train_mode_switched_on_after_the_build_is_refused(use):
    """Batch norm: the clear ValueError (not torch.func's in-place error), buffers untouched;
    dropout: the one message."""
    model = bn_eval_model()
    build, run = built_then_used(model)[use]
    built = build()
    state = {name: t.clone() for name, t in model.state_dict().items()}
    model.train()
    with pytest.raises(ValueError, match=r"'1' is a BatchNorm1d in train mode.*model\.eval\(\)"):
        run(built)
    for name, t in model.state_dict().items():
        assert torch.equal(t, state[name]), name
    model = mlp(nn.Dropout(0.5)).eval()
    build, run = built_then_used(model)[use]
    built = build()
    model.train()
    with pytest.raises(curvops.NonDeterministicDataError, match=RANDOM):
        run(built)


# ------------------------------------------------------------------- case 5: a module used twice


def shared_model():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(3, 2)).double()


def shared_forward(theta, x):
    w, b, w2, b2 = theta[:9].reshape(3, 3), theta[9:12], theta[12:18].reshape(2, 3), theta[18:]
    return (torch.tanh(x @ w.T + b) @ w.T + b) @ w2.T + b2


SHARED_X, SHARED_Y = randn(6, 3, seed=1), torch.tensor([0, 1, 1, 0, 1, 0])


def shared_truth(model):
    """The mean-loss GGN, the summed loss and per-datum gradients of the shared model."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(t, x=SHARED_X, y=SHARED_Y):
        return nn.functional.cross_entropy(shared_forward(t, x), y, reduction="sum")

    out = shared_forward(theta, SHARED_X)
    lam = jacrev(
        jacrev(lambda o: nn.functional.cross_entropy(o.reshape(out.shape), SHARED_Y, reduction="sum"))
    )
    jac = jacrev(lambda t: shared_forward(t, SHARED_X).reshape(-1))(theta)
    ggn = jac.T @ lam(out.reshape(-1)) @ jac
    grads = torch.stack([jacrev(loss)(theta, SHARED_X[n : n + 1], SHARED_Y[n : n + 1]) for n in range(6)])
    return theta, ggn, loss(theta), grads


def check_parameters_kept(model, original):
    assert model[0] is model[2] and list(model.parameters()) == original
    assert all(type(p) is nn.Parameter for p in model.parameters())
    model.zero_grad()
    nn.functional.cross_entropy(model(SHARED_X), SHARED_Y).backward()
    assert all(p.grad is not None for p in model.parameters())


def dense_marglik(curvature, theta, loss_sum, tau):
    size = theta.numel()
    logdet = torch.linalg.slogdet(curvature + tau * torch.eye(size, dtype=DOUBLE))[1]
    return -loss_sum - 0.5 * (logdet - size * math.log(tau)) - 0.5 * tau * theta @ theta


SHARED_EXACT = ["GGN", "Laplace full", "Laplace diagonal", "influence_scores ggn", "leave_one_out_scores"]


@pytest.mark.parametrize("entry", SHARED_EXACT)
def test_shared_module_answers_are_exact_and_keep_the_parameters(entry):
    model = shared_model()
    original = list(model.parameters())
    theta, ggn, loss_sum, grads = shared_truth(model)
    data, lf = [(SHARED_X, SHARED_Y)], nn.CrossEntropyLoss()
    if entry == "GGN":
        torch.testing.assert_close(curvops.GGN(model, lf, data).to_dense(), ggn / 6)
    elif entry.startswith("Laplace"):
        la = Laplace(model, lf, data, curvature=entry.split()[1])
        curvature = ggn if entry == "Laplace full" else torch.diag(ggn.diagonal())
        torch.testing.assert_close(
            la.log_marginal_likelihood(), dense_marglik(curvature, theta, loss_sum, 1.0)
        )
    else:
        damped = ggn / 6 + 0.5 * torch.eye(len(theta), dtype=DOUBLE)
        expected = grads @ torch.linalg.solve(damped, grads.T)
        if entry == "influence_scores ggn":
            scores = influence_scores(model, lf, data, data, curvature="ggn", damping=0.5)
            torch.testing.assert_close(scores, expected)
        else:  # the empirical Fisher less datum 2's share (Sherman-Morrison's downdate)
            fisher = grads.T @ grads / 6
            removed = fisher - grads[2:3].T @ grads[2:3] / 6 + 0.5 * torch.eye(len(theta), dtype=DOUBLE)
            scores = leave_one_out_scores(
                model, lf, data, data, 2, curvature="ggn", fisher_type="empirical", damping=0.5
            )
            torch.testing.assert_close(scores, grads @ torch.linalg.solve(removed, grads.T))
    check_parameters_kept(model, original)


@pytest.mark.parametrize("entry", ["Jacobian", "Hessian", "EmpiricalFisher", "FisherMC", "compare"])
def test_shared_module_other_entry_points_keep_the_parameters(entry):
    model = shared_model()
    original = list(model.parameters())
    try:
        ENTRIES[entry](model, nn.CrossEntropyLoss(), [(SHARED_X, SHARED_Y)])
    except ValueError as error:  # KFAC cannot take a module used twice: a clear refusal is fine
        assert "twice" in str(error) or "tying" in str(error) or "ran" in str(error), error
    check_parameters_kept(model, original)


@pytest.mark.parametrize("entry", ["KFAC", "EKFAC", "TKFAC", "Laplace kfac", "self_influence"])
def test_shared_module_kronecker_entry_points_share_it_over_its_calls(entry):
    model = shared_model()  # a module called twice is weight sharing (issue 13, item 5)
    original = list(model.parameters())
    ENTRIES[entry](model, nn.CrossEntropyLoss(), [(SHARED_X, SHARED_Y)])
    check_parameters_kept(model, original)


# --------------------------------------------------------------------------- case 6: stale models


def stale_uses(model, data):
    lf = nn.CrossEntropyLoss()
    ggn = curvops.GGN(model, lf, data)
    kfac = curvops.KFAC(model, lf, data, fisher_type="type-2")
    curvature = influence_curvature(model, lf, data, curvature="ggn")
    return {
        "GGN": lambda: ggn @ torch.ones(ggn.shape[0], dtype=DOUBLE),
        "GGN inverse": lambda: ggn.inverse(damping=1.0) @ torch.ones(ggn.shape[0], dtype=DOUBLE),
        "compare": lambda: curvops.compare(ggn, kfac, k=2),
        "influence_scores(curvature=op)": lambda: influence_scores(
            model, lf, data, data, curvature=curvature
        ),
        "self_influence(curvature=op)": lambda: self_influence(model, lf, data, curvature=curvature),
        "Laplace(curvature=op)": lambda: Laplace(model, lf, data, curvature=ggn),
        "Laplace(curvature=KFAC)": lambda: Laplace(model, lf, data, curvature=kfac),
        "influence_scores(curvature=KFAC)": lambda: influence_scores(model, lf, data, data, curvature=kfac),
    }


STALE_USES = list(stale_uses(mlp(), [labelled(6, 0)]))


@pytest.mark.parametrize("use", STALE_USES)
def test_a_changed_parameter_makes_the_next_use_stale(use):
    model = mlp()
    uses = stale_uses(model, [labelled(6, 0)])
    model[0].weight.data.mul_(2)
    with pytest.raises(curvops.StaleParametersError, match=r"'0\.weight' changed"):
        uses[use]()


def test_last_layer_laplace_refuses_a_changed_feature_extractor():
    """θ* is copied, but the layers outside ``params`` are read from the model at prediction."""
    model = mlp()
    la = Laplace(model, nn.CrossEntropyLoss(), [labelled(6, 0)], params=list(model[2].parameters()))
    la.predictive(randn(2, 3))
    model[0].weight.data.mul_(2)
    for predict in (la.predictive, lambda x: la.predictive(x, method="mc"), la.glm_distribution):
        with pytest.raises(curvops.StaleParametersError, match=r"'0\.weight' changed"):
            predict(randn(2, 3))


def test_laplace_over_all_parameters_keeps_its_copy_after_training():
    """Documented: θ* is copied, so a full Laplace predicts as before after the model trains on."""
    model = mlp()
    la = Laplace(model, nn.CrossEntropyLoss(), [labelled(6, 0)])
    before = la.predictive(randn(2, 3))
    model[0].weight.data.mul_(2)
    torch.testing.assert_close(la.predictive(randn(2, 3)), before, rtol=0, atol=0)


# ------------------------------------------------------------------------------ case 7: targets


X6 = randn(6, 3, seed=5)
TARGETS = {
    "MSE [N,1] for [N,3]": (nn.MSELoss(), randn(3, 1), r"shape \[3, 3\], got \[3, 1\]"),
    "CE float indices": (nn.CrossEntropyLoss(), torch.tensor([0.0, 1.0, 2.0], dtype=DOUBLE), r"y\.long\(\)"),
    "CE int32 labels": (
        nn.CrossEntropyLoss(),
        torch.tensor([0, 1, 2], dtype=torch.int32),
        r"int64.*y\.long\(\)",
    ),
    "CE labels [N,1]": (nn.CrossEntropyLoss(), torch.tensor([[0], [1], [2]]), r"got \[3, 1\]"),
    "CE label 5": (nn.CrossEntropyLoss(), torch.tensor([0, 5, 2]), "class index 5"),
    "CE label -1": (nn.CrossEntropyLoss(), torch.tensor([0, -1, 2]), "class index -1"),
}
GOOD = {"MSE": randn(3, 3, seed=6), "CE": torch.tensor([0, 1, 2])}
TARGET_ENTRIES = [name for name in ENTRIES if name != "Jacobian"]


@pytest.mark.parametrize("case", list(TARGETS))
@pytest.mark.parametrize("entry", TARGET_ENTRIES)
def test_bad_targets_raise_naming_the_batch(entry, case):
    loss_fn, bad, phrase = TARGETS[case]
    data = [(X6[:3], GOOD[case.split()[0]]), (X6[3:], bad)]
    with pytest.raises(ValueError, match=rf"Batch 1.*{phrase}"):
        ENTRIES[entry](mlp(), loss_fn, data)


class Sequence3(nn.Module):
    """``[B, S, V]`` outputs: a language model's logits before the transpose cross-entropy needs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 4).double()

    def forward(self, x):
        return self.lin(x)  # [B, S, 3] -> [B, S, 4]


@pytest.mark.parametrize("entry", TARGET_ENTRIES)
def test_sequence_outputs_for_cross_entropy_say_what_torch_wants(entry):
    x, y = randn(2, 5, 3, seed=7), torch.randint(0, 4, (2, 5))
    with pytest.raises(ValueError, match=r"Batch 0.*\[B, S, C\].*movedim\(-1, 1\)"):
        ENTRIES[entry](Sequence3(), nn.CrossEntropyLoss(), [(x, y)])


# ---------------------------------------------------- case 8: no graph, on a parameter subset


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_answers_on_a_parameter_subset_carry_no_graph(entry):
    model = mlp()
    x, y = labelled(n=12, ignored=3)
    answers = ENTRIES[entry](
        model, nn.CrossEntropyLoss(ignore_index=IGNORE), [(x, y)], params=list(model[2].parameters())
    )
    assert_no_graph(answers)


def test_kfac_optimizer_step_leaves_no_graph_on_a_subset():
    model = mlp()
    x, y = labelled(n=12, ignored=3)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    opt = curvops.optim.KFACOptimizer(model, loss_fn, lr=0.1, damping=0.1)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    assert all(type(p) is nn.Parameter and p.grad_fn is None for p in model.parameters())


# ------------------------------------------- case 9: frozen params, params dicts, bare pairs


def frozen_copy(model, frozen):
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return model


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_frozen_parameters_in_params_give_the_trainable_answers(entry):
    x, y = labelled(n=12, ignored=3)
    lf = nn.CrossEntropyLoss(ignore_index=IGNORE)
    trainable = mlp()
    expected = ENTRIES[entry](trainable, lf, [(x, y)], params=list(trainable.parameters()))
    frozen = frozen_copy(mlp(), {"0.weight", "0.bias", "2.bias"})
    answers = ENTRIES[entry](frozen, lf, [(x, y)], params=list(frozen.parameters()))
    assert_same_answers(answers, expected)
    assert [p.requires_grad for p in frozen.parameters()] == [False, False, True, False]


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_params_as_a_dict_give_the_list_answers(entry):
    x, y = labelled(n=12, ignored=3)
    lf = nn.CrossEntropyLoss(ignore_index=IGNORE)
    model = mlp()
    named = {"2.weight": model[2].weight, "0.bias": model[0].bias}
    expected = ENTRIES[entry](model, lf, [(x, y)], params=list(named.values()))
    assert_same_answers(ENTRIES[entry](model, lf, [(x, y)], params=named), expected)


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_a_bare_pair_is_one_batch(entry):
    x, y = labelled(n=12, ignored=3)
    lf = nn.CrossEntropyLoss(ignore_index=IGNORE)
    assert_same_answers(
        ENTRIES[entry](mlp(), lf, (x, y)), ENTRIES[entry](mlp(), lf, [(x, y)]), rtol=0, atol=0
    )


def optimizer_steps(model, params, steps=2):
    """The parameters after ``steps`` KFACOptimizer steps on one fixed padded batch."""
    x, y = labelled(n=12, ignored=3)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    opt = curvops.optim.KFACOptimizer(model, loss_fn, params=params, lr=0.1, damping=0.1, T_inv=1)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_kfac_optimizer_takes_frozen_parameters_and_dicts():
    """Frozen parameters in ``params`` stay put and change nothing else; a dict means its values."""
    trainable = mlp()
    frozen_copy(trainable, {"0.weight", "0.bias"})
    expected = optimizer_steps(trainable, list(trainable[2].parameters()))
    frozen = frozen_copy(mlp(), {"0.weight", "0.bias"})
    torch.testing.assert_close(optimizer_steps(frozen, list(frozen.parameters())), expected, rtol=0, atol=0)
    named = mlp()
    frozen_copy(named, {"0.weight", "0.bias"})
    by_name = optimizer_steps(named, dict(named.named_parameters()))
    torch.testing.assert_close(by_name, expected, rtol=0, atol=0)
    start = torch.cat([p.detach().reshape(-1) for p in mlp()[0].parameters()])
    torch.testing.assert_close(expected[: start.numel()], start, rtol=0, atol=0)
