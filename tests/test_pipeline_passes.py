"""Real data pipelines (issue 11, items 1-4 and 6): the right matrix from any batch order, or a
clear error for a changed pass, a random forward, train-mode batch norm or a stale operator.

Ground truths are dense float64 matrices from ``torch.func`` on the whole data set at once.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import DOUBLE
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

import curvops
from curvops.influence import influence_scores
from curvops.laplace import Laplace

IGNORE = -100
RANDOM = r"random numbers in its forward pass.*model\.eval\(\) or use a fixed dropout mask"


def mlp(*extra: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), *extra, nn.Tanh(), nn.Linear(4, 3)).double()


def labelled(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, dtype=DOUBLE, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    y[:15] = IGNORE  # padding labels on the first rows: a shuffled loader spreads them unevenly
    return x, y


def shuffled(x, y, batch_size=10, seed=0):
    return DataLoader(
        TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


class Dense:
    """Dense curvature of ``loss_fn(model(X), y)`` on the whole data at once (``torch.func``)."""

    def __init__(self, model, loss_fn, x, y):
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        named = dict(model.named_parameters())
        self.names, self.shapes = list(named), [p.shape for p in named.values()]
        self.theta = torch.cat([p.detach().flatten() for p in named.values()])

    def output(self, theta, x):
        parts = theta.split([s.numel() for s in self.shapes])
        params = {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}
        return functional_call(self.model, params, (x,))

    def loss(self, theta):
        return self.loss_fn(self.output(theta, self.x), self.y)

    def hessian(self):
        return hessian(self.loss)(self.theta)

    def ggn(self):
        out = self.output(self.theta, self.x).detach()
        lam = hessian(lambda o: self.loss_fn(o.reshape(out.shape), self.y))(out.flatten())
        jac = jacrev(lambda t: self.output(t, self.x).flatten())(self.theta)
        return jac.T @ lam @ jac

    def terms(self):
        """``Z``: the (weighted) number of targets the mean divides by."""
        kept = self.y[self.y != IGNORE]
        weight = getattr(self.loss_fn, "weight", None)
        return float(len(kept) if weight is None else weight[kept].sum())

    def empirical_fisher(self):
        summed = nn.CrossEntropyLoss(weight=self.loss_fn.weight, ignore_index=IGNORE, reduction="sum")

        def datum(theta, xn, yn):
            return summed(self.output(theta, xn.unsqueeze(0)), yn.unsqueeze(0))

        gradients = vmap(jacrev(datum), in_dims=(None, 0, 0))(self.theta, self.x, self.y)
        return gradients.T @ gradients / self.terms()


LOSSES = {
    "ignore_index": lambda: nn.CrossEntropyLoss(ignore_index=IGNORE),
    "class weight": lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([0.5, 2.0, 1.0], dtype=DOUBLE), ignore_index=IGNORE
    ),
}
EXACT = {"GGN": "ggn", "Hessian": "hessian", "EmpiricalFisher": "empirical_fisher"}


# ------------------------------------------------------------------------------ item 1


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("name", list(EXACT))
def test_shuffled_loader_gives_the_whole_data_matrix(name, loss):
    model, loss_fn = mlp(), LOSSES[loss]()
    x, y = labelled()
    truth = getattr(Dense(model, loss_fn, x, y), EXACT[name])()
    op = getattr(curvops, name)(model, loss_fn, shuffled(x, y))
    torch.testing.assert_close(op.to_dense(), truth, rtol=1e-9, atol=1e-11)
    v = torch.randn(op.shape[0], dtype=DOUBLE)
    torch.testing.assert_close(op @ v, op @ v, rtol=1e-12, atol=1e-13)  # two products of one operator
    one_batch = getattr(curvops, name)(model, loss_fn, [(x, y)])
    torch.testing.assert_close(op @ v, one_batch @ v, rtol=1e-9, atol=1e-11)


def test_float32_shuffled_loaders_pass_the_order_free_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(3000, 8) * 100
    x = x - x.mean(0)  # sums near 0: float32 rounding of reordered batches must not count as a change
    y = torch.randint(0, 3, (3000,))
    ggn = curvops.GGN(
        model, nn.CrossEntropyLoss(), DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True)
    )
    v = torch.randn(ggn.shape[0])
    for _ in range(3):
        ggn @ v


def test_laplace_full_marginal_likelihood_from_a_shuffled_loader():
    model, loss_fn = mlp(), LOSSES["ignore_index"]()
    x, y = labelled()
    dense = Dense(model, loss_fn, x, y)
    terms = dense.terms()
    curvature = terms * dense.ggn()  # K of the summed negative log-likelihood
    theta = dense.theta
    expected = -terms * dense.loss(theta) - 0.5 * torch.logdet(
        curvature + torch.eye(len(theta), dtype=DOUBLE)
    )
    expected = expected - 0.5 * theta @ theta  # τ = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # θ is not trained: not at a minimum
        la = Laplace(model, loss_fn, shuffled(x, y), curvature="full")
    assert la.num_terms == terms
    torch.testing.assert_close(la.curvature.to_dense(), curvature, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(la.log_marginal_likelihood(), expected, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ item 2


class Shrinking:
    """Re-iterable data that yields one batch fewer on every pass (an exhausted stream, say)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        batches, self.batches = self.batches, self.batches[:-1]
        return iter(batches)


def batches_of(x, y, size=10):
    return list(zip(x.split(size), y.split(size), strict=True))


def test_fewer_batches_on_a_later_pass_raise(monkeypatch):
    model, loss_fn = mlp(), LOSSES["ignore_index"]()
    x, y = labelled()
    ggn = curvops.GGN(model, loss_fn, Shrinking(batches_of(x, y)))  # the type check takes a pass
    with pytest.raises(
        curvops.NonDeterministicDataError,
        match=r"GGN product: data yielded 2 batches.*3 on the first.*shuffle=False",
    ):
        ggn @ torch.ones(ggn.shape[0], dtype=DOUBLE)
    # EKFAC corrects from the batches its statistics pass kept: no second pass over the data
    kept = curvops.EKFAC(model, loss_fn, Shrinking(batches_of(x, y)))
    seen = batches_of(x, y)[:-1]  # a first look at the data, then the statistics pass
    assert torch.allclose(kept.to_dense(), curvops.EKFAC(model, loss_fn, seen).to_dense())
    monkeypatch.setattr("curvops.nn.kronecker_pass.CORRECTION_CACHE_BYTES", 0)  # too large to keep
    with pytest.raises(
        curvops.NonDeterministicDataError, match=r"EKFAC eigenvalue correction: data yielded 2 batches"
    ):
        curvops.EKFAC(model, loss_fn, Shrinking(batches_of(x, y)))


class Growing:
    """Re-iterable data that yields one batch more on every pass."""

    def __init__(self, batches, start):
        self.batches, self.stop = batches, start

    def __iter__(self):
        self.stop += 1
        return iter(self.batches[: self.stop])


@pytest.mark.parametrize("name", ["GGN", "Jacobian"])
def test_more_batches_on_a_later_pass_raise_at_the_extra_batch(name):
    model, loss_fn = mlp(), LOSSES["ignore_index"]()
    x, y = labelled()
    data = Growing(batches_of(x, y), 0)  # the type check takes one pass, the build the next
    op = curvops.GGN(model, loss_fn, data) if name == "GGN" else curvops.Jacobian(model, data)
    with pytest.raises(curvops.NonDeterministicDataError, match=r"product: data yielded more than 2 batches"):
        op @ torch.ones(op.shape[1], dtype=DOUBLE)
    if name == "Jacobian":
        with pytest.raises(curvops.NonDeterministicDataError, match=r"yielded more than 2 batches"):
            op.T @ torch.ones(op.shape[0], dtype=DOUBLE)


class Passes:
    """Re-iterable data that yields ``first`` twice (the type check, the build), then ``later``."""

    def __init__(self, first, later):
        self.first, self.later, self.passes = first, later, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.first if self.passes <= 2 else self.later)


def test_jacobian_refuses_other_batch_shapes_before_using_them():
    model = mlp()
    x, y = labelled()
    data = Passes(batches_of(x, y, 16), batches_of(x.flip(0), y.flip(0), 16)[::-1])  # sizes 16, 16, 8
    jac = curvops.Jacobian(model, data)
    with pytest.raises(
        curvops.NonDeterministicDataError, match=r"batch 0 gives outputs of shape \[8, 3\], \[16, 3\]"
    ):
        jac.T @ torch.ones(jac.shape[0], dtype=DOUBLE)


def test_order_dependent_operators_refuse_a_reshuffled_pass(monkeypatch):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = labelled()
    y[:15] = 0
    loader = shuffled(x, y)
    fisher = curvops.FisherMC(model, loss_fn, loader)
    with pytest.raises(
        curvops.NonDeterministicDataError, match=r"FisherMC product: batch 0 differs.*shuffle=False"
    ):
        fisher @ torch.ones(fisher.shape[0], dtype=DOUBLE)
    jac = curvops.Jacobian(model, loader)
    with pytest.raises(curvops.NonDeterministicDataError, match=r"Jacobian product: batch 0 differs"):
        jac @ torch.ones(jac.shape[1], dtype=DOUBLE)
    curvops.EKFAC(model, loss_fn, loader, fisher_type="mc")  # corrected from the one pass it kept
    monkeypatch.setattr("curvops.nn.kronecker_pass.CORRECTION_CACHE_BYTES", 0)  # a second pass
    with pytest.raises(
        curvops.NonDeterministicDataError, match=r"EKFAC eigenvalue correction: batch 0 differs"
    ):
        curvops.EKFAC(model, loss_fn, loader, fisher_type="mc")
    curvops.EKFAC(model, loss_fn, loader, fisher_type="type-2")  # a sum over batches in any order
    fixed = curvops.FisherMC(model, loss_fn, DataLoader(TensorDataset(x, y), batch_size=10))
    torch.testing.assert_close(fixed.to_dense(), fixed.to_dense(), rtol=0, atol=0)


def test_changed_data_raise_even_for_order_free_operators():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = labelled()
    y[:15] = 0

    class Augmented(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, n):
            return x[n] + 0.1 * torch.randn(3, dtype=DOUBLE), y[n]

    ggn = curvops.GGN(model, loss_fn, DataLoader(Augmented(), batch_size=10))
    with pytest.raises(curvops.NonDeterministicDataError, match=r"the values of X differ.*augmentation"):
        ggn @ torch.ones(ggn.shape[0], dtype=DOUBLE)
    relabelled = [(x, y.clone())]
    hessian = curvops.Hessian(model, loss_fn, relabelled)
    relabelled[0][1][0] = 1 - relabelled[0][1][0]  # one label changed: integers compare exactly
    with pytest.raises(curvops.NonDeterministicDataError, match=r"the values of y differ"):
        hessian @ torch.ones(hessian.shape[0], dtype=DOUBLE)


# ------------------------------------------------------------------------------ item 3


def _product(op):
    op @ torch.ones(op.shape[1], dtype=DOUBLE)


def _data():
    x, y = labelled(12)
    return [(x, y.clamp(min=0))]


USES = {
    "Hessian": lambda m, d: _product(curvops.Hessian(m, nn.CrossEntropyLoss(), d)),
    "GGN": lambda m, d: _product(curvops.GGN(m, nn.CrossEntropyLoss(), d)),
    "EmpiricalFisher": lambda m, d: _product(curvops.EmpiricalFisher(m, nn.CrossEntropyLoss(), d)),
    "FisherMC": lambda m, d: _product(curvops.FisherMC(m, nn.CrossEntropyLoss(), d)),
    "Jacobian": lambda m, d: _product(curvops.Jacobian(m, d)),
    "KFAC": lambda m, d: curvops.KFAC(m, nn.CrossEntropyLoss(), d),
    "KFAC restricted": lambda m, d: curvops.KFAC(
        m, nn.CrossEntropyLoss(), d, params=list(m[-1].parameters())
    ),
    "EKFAC": lambda m, d: curvops.EKFAC(m, nn.CrossEntropyLoss(), d),
    "TKFAC": lambda m, d: curvops.TKFAC(m, nn.CrossEntropyLoss(), d),
    "KFAC dense": lambda m, d: curvops.KFAC(m, nn.CrossEntropyLoss(), d, unsupported="dense"),
    "Laplace kfac": lambda m, d: Laplace(m, nn.CrossEntropyLoss(), d, curvature="kfac"),
    "Laplace full": lambda m, d: Laplace(m, nn.CrossEntropyLoss(), d, curvature="full"),
    "influence": lambda m, d: influence_scores(m, nn.CrossEntropyLoss(), d, d, "ggn"),
}
RANDOM_USES = [name for name in USES if name != "KFAC dense"]


@pytest.mark.parametrize("use", RANDOM_USES)
def test_dropout_in_train_mode_is_refused_with_one_message(use):
    model = mlp(nn.Dropout(0.5))
    before = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # influence warns about dropout up front
        with pytest.raises(curvops.NonDeterministicDataError, match=RANDOM):
            USES[use](model, _data())
    assert torch.equal(torch.get_rng_state(), before)  # the user's random stream did not move


# ------------------------------------------------------------------------------ item 4


def bn_model(kind=nn.BatchNorm1d, **options):
    """``Linear-BatchNorm-Tanh-Linear`` in train mode, with running means that are not all 0."""
    model = mlp(kind(4, **options))
    if model[1].running_mean is not None:
        with torch.no_grad():
            model[1].running_mean.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("use", list(USES))
def test_batch_norm_in_train_mode_is_refused_naming_the_module(use):
    with pytest.raises(
        ValueError, match=r"'1' is a BatchNorm1d in train mode.*not a sum over data.*model\.eval\(\)"
    ):
        USES[use](bn_model(), _data())


def test_any_batch_norm_with_batch_statistics_is_refused():
    data = _data()
    with pytest.raises(ValueError, match=r"'1' is a SyncBatchNorm in train mode"):
        curvops.GGN(bn_model(nn.SyncBatchNorm), nn.CrossEntropyLoss(), data)
    model = bn_model(track_running_stats=False).eval()
    with pytest.raises(ValueError, match=r"'1' is a BatchNorm1d without running statistics"):
        curvops.Hessian(model, nn.CrossEntropyLoss(), data)


@pytest.mark.parametrize("use", list(USES))
def test_no_operator_changes_parameters_or_buffers(use):
    model = bn_model().eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    tensors = [*model.parameters(), *model.buffers()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if use.startswith("KFAC") and use != "KFAC restricted":
            curvops.KFAC(model, nn.CrossEntropyLoss(), _data(), unsupported="dense")
        elif use in ("EKFAC", "TKFAC", "Laplace kfac"):
            options = {"unsupported": "dense"}
            if use == "Laplace kfac":
                Laplace(model, nn.CrossEntropyLoss(), _data(), curvature="kfac", curvature_options=options)
            else:
                getattr(curvops, use)(model, nn.CrossEntropyLoss(), _data(), **options)
        else:
            USES[use](model, _data())
    assert all(a is b for a, b in zip(tensors, [*model.parameters(), *model.buffers()], strict=True))
    for name, t in model.state_dict().items():
        assert torch.equal(t, state[name]), name


# ------------------------------------------------------------------------------ item 6

EDITS = {
    "mul_": (lambda m: m[0].weight.data.mul_(2), "Parameter '0.weight'"),
    "copy_": (lambda m: m[3].bias.data.copy_(torch.ones(3)), "Parameter '3.bias'"),
    "buffer": (lambda m: m[1].running_var.data.add_(1.0), "Buffer '1.running_var'"),
    "counter": (lambda m: m[1].num_batches_tracked.data.add_(1), "Buffer '1.num_batches_tracked'"),
    "not chosen": (lambda m: m[1].weight.data.mul_(3), "Parameter '1.weight'"),
}
STALE = {
    "GGN": lambda m, d: curvops.GGN(m, nn.CrossEntropyLoss(), d, params=list(m[0].parameters())),
    "Hessian": lambda m, d: curvops.Hessian(m, nn.CrossEntropyLoss(), d),
    "FisherMC": lambda m, d: curvops.FisherMC(m, nn.CrossEntropyLoss(), d),
    "Jacobian": lambda m, d: curvops.Jacobian(m, d),
}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("name", list(STALE))
def test_changed_values_make_an_operator_stale(name, edit):
    model = bn_model().eval()
    op = STALE[name](model, _data())
    v = torch.ones(op.shape[1], dtype=DOUBLE)
    before = op @ v
    change, named = EDITS[edit]
    change(model)
    with pytest.raises(curvops.StaleParametersError, match=rf"{named} changed after this operator was built"):
        op @ v
    if name != "Jacobian":
        with pytest.raises(curvops.StaleParametersError):
            op.inverse(damping=1.0) @ v
    assert before.isfinite().all()


def test_fingerprint_benchmark_quick_mode_runs():
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "benchmarks" / "fingerprint.py"), "--quick"]
    environment = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300, env=environment)
    assert "stale check" in out.stdout and out.stdout.count("% of GGN @ v") == 2


def test_a_changed_thread_count_does_not_make_an_operator_stale():
    model = bn_model().eval()
    op = curvops.GGN(model, nn.CrossEntropyLoss(), _data())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        op @ torch.ones(op.shape[0], dtype=DOUBLE)
    finally:
        torch.set_num_threads(threads)
