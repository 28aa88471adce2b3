"""The optimizers in real training loops (issue 11, items 15-21): copies and pickles of the
model at any point, abandoned forward passes, gradient accumulation, failing closures,
unusable TKFAC statistics, nn.MultiheadAttention, strict argument types and tampered state
dicts. Ground truths are written out here, independently of curvops."""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from helpers import DOUBLE
from torch import nn

import curvops
from curvops.errors import StateDictError
from curvops.nn.layers import OPAQUE_MODULES
from curvops.nn.statistics import STATISTICS
from curvops.optim import KFACOptimizer, ZerothOrderOptimizer

CURVATURES = ["kfac", "ekfac", "tkfac"]
TKFAC_STATISTICS = [name for name in STATISTICS if name != "exact_block"]  # a Linear layer's
BUILDERS = {"kfac": curvops.KFAC, "ekfac": curvops.EKFAC, "tkfac": curvops.TKFAC}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DOUBLE)


def batch(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 4, generator=g, dtype=DOUBLE), torch.randint(0, 3, (size,), generator=g)


def train_step(model, opt, loss_fn, x, y) -> None:
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()


def parameters(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(first, second) -> None:
    for p, q in zip(first, second, strict=True):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- item 17: copies and pickles
def copy_and_pickle(model, loss_fn, x, y) -> None:
    """torch.save / deepcopy of the model and the loss; the copies run a forward and backward."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loss_copy = pickle.loads(pickle.dumps(loss_fn))
    for clone in (loaded, copy.deepcopy(model)):
        with torch.no_grad():
            assert torch.equal(clone(x), model(x))
        loss_copy(clone(x), y).backward()  # the copies' hooks are inert: they capture nothing
    copy.deepcopy(loss_fn)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_model_copies_and_pickles_at_every_point_of_the_loop(curvature):
    loss_fn = nn.CrossEntropyLoss()
    data = [batch(8, seed) for seed in range(3)]
    options = {"curvature": curvature, "fisher_type": "type-2", "T_inv": 2, "lr": 0.1}
    reference = mlp()
    reference_opt = KFACOptimizer(reference, loss_fn, **options)
    for x, y in data:
        train_step(reference, reference_opt, loss_fn, x, y)
    reference_opt.remove_hooks()

    model = mlp()
    opt = KFACOptimizer(model, loss_fn, **options)
    probe_x, probe_y = batch(5, seed=9)
    copy_and_pickle(model, loss_fn, probe_x, probe_y)  # before any forward
    for x, y in data:
        opt.zero_grad()
        output = model(x)
        copy_and_pickle(model, loss_fn, probe_x, probe_y)  # between the forward and the loss
        loss = loss_fn(output, y)
        copy_and_pickle(model, loss_fn, probe_x, probe_y)  # before backward
        loss.backward()
        copy_and_pickle(model, loss_fn, probe_x, probe_y)  # before step
        opt.step()
        accuracy = (model(x).argmax(1) == y).float().mean()  # grad-enabled, no loss_fn
        copy_and_pickle(model, loss_fn, probe_x, probe_y)
        assert 0 <= float(accuracy) <= 1
    assert_same(parameters(model), parameters(reference))  # the copies never disturbed training


@pytest.mark.parametrize("curvature", CURVATURES)
def test_deep_copied_model_trains_like_the_original(curvature):
    loss_fn = nn.CrossEntropyLoss()
    data = [batch(8, seed) for seed in range(5)]
    options = {"curvature": curvature, "fisher_type": "type-2", "T_inv": 2, "lr": 0.1}
    model = mlp()
    opt = KFACOptimizer(model, loss_fn, **options)
    for x, y in data[:2]:
        train_step(model, opt, loss_fn, x, y)
    model(data[0][0])  # an accuracy check with grad enabled leaves a forward pass pending
    clone, clone_loss = copy.deepcopy(model), copy.deepcopy(loss_fn)
    clone_opt = KFACOptimizer(clone, clone_loss, **options)
    clone_opt.load_state_dict(opt.state_dict())
    for x, y in data[2:]:  # interleaved: each forward of one model runs between the other's
        opt.zero_grad(), clone_opt.zero_grad()
        output, clone_output = model(x), clone(x)
        loss_fn(output, y).backward()
        clone_loss(clone_output, y).backward()
        opt.step(), clone_opt.step()
    assert_same(parameters(clone), parameters(model))


def test_a_copy_captures_nothing_for_the_original_optimizer():
    loss_fn = nn.CrossEntropyLoss()
    model = mlp()
    opt = KFACOptimizer(model, loss_fn)
    clone = copy.deepcopy(model)
    x, y = batch(8, seed=0)
    loss_fn(clone(x), y).backward()  # the original loss_fn, the copy's forward
    with pytest.raises(RuntimeError, match="saw no forward and backward pass"):
        opt.step()


# ---------------------------------------------------------------- item 18: abandoned forwards
@pytest.mark.parametrize("abandon", ["no backward", "backward, then zero_grad"])
def test_an_abandoned_nonfinite_loss_does_not_skip_the_next_step(abandon):
    loss_fn = nn.CrossEntropyLoss()
    good, bad = batch(8, seed=0), batch(8, seed=1)
    bad[0][0, 0] = float("nan")
    reference = mlp()
    reference_opt = KFACOptimizer(reference, loss_fn, fisher_type="type-2", T_inv=1)
    train_step(reference, reference_opt, loss_fn, *good)

    model = mlp()
    opt = KFACOptimizer(model, loss_fn, fisher_type="type-2", T_inv=1)
    loss = loss_fn(model(bad[0]), bad[1])
    assert not torch.isfinite(loss)
    if abandon != "no backward":
        loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped step would warn
        train_step(model, opt, loss_fn, *good)
    assert opt.steps == 1
    assert_same(parameters(model), parameters(reference))


# ---------------------------------------------------------------- item 19: gradient accumulation
def true_factors(model, micro_batches, shares, fisher_type):
    """``[(G, A)]`` of both layers of ``mlp`` for the objective ``Σ_k c_k mean_n ℓ_n``, written out:
    per datum weight ``w = c_k / N_k``; ``G = Σ w J^T Λ J`` (``Λ = diag p - p p^T`` for type-2,
    ``r r^T`` with ``r = p - onehot(y)`` for empirical), ``A = Σ w a a^T / Σ w``."""
    w0, b0, w2, b2 = (p.detach() for p in model.parameters())
    g0, g2, a0, a2, total = 0, 0, 0, 0, 0
    for (x, y), c in zip(micro_batches, shares, strict=True):
        weight = c / len(x)
        h = torch.tanh(x @ w0.T + b0)
        p = torch.softmax(h @ w2.T + b2, dim=1)
        if fisher_type == "type-2":
            output_covariance = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        else:
            r = p - nn.functional.one_hot(y, 3).to(DOUBLE)
            output_covariance = r[:, :, None] * r[:, None, :]
        jacobian = w2[None] * (1 - h**2)[:, None, :]  # ∂ logits / ∂ (first layer's output)
        g2 = g2 + weight * output_covariance.sum(0)
        g0 = g0 + weight * torch.einsum("nci,ncd,ndj->ij", jacobian, output_covariance, jacobian)
        a0, a2 = a0 + weight * x.T @ x, a2 + weight * h.T @ h
        total = total + weight * len(x)
    return [(g0, a0 / total), (g2, a2 / total)]


def accumulate(model, opt, loss_fn, micro_batches, shares) -> None:
    opt.zero_grad()
    for (x, y), c in zip(micro_batches, shares, strict=True):
        (c * loss_fn(model(x), y)).backward()
    opt.step()


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("sizes", [(8, 8), (5, 11), (3, 6, 9)])
@pytest.mark.parametrize("share", ["union", "equal"])
def test_accumulated_statistics_are_those_of_the_backpropagated_objective(fisher_type, sizes, share):
    # share "union": c_k = N_k / N, the union batch's mean; "equal": c_k = 1 / K
    loss_fn = nn.CrossEntropyLoss()
    micro_batches = [batch(size, seed) for seed, size in enumerate(sizes)]
    total = sum(sizes)
    shares = [size / total if share == "union" else 1 / len(sizes) for size in sizes]
    model = mlp()
    before = copy.deepcopy(model)
    opt = KFACOptimizer(model, loss_fn, fisher_type=fisher_type, ema_decay=0.0)
    accumulate(model, opt, loss_fn, micro_batches, shares)
    expected = true_factors(before, micro_batches, shares, fisher_type)
    for layer, (g, a) in zip(opt.layers, expected, strict=True):
        torch.testing.assert_close(layer.output_factor, g, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(layer.input_factor, a, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("sizes", [(8, 8), (5, 11)])
def test_accumulated_curvature_equals_the_builder_on_the_union_batch(curvature, fisher_type, sizes):
    loss_fn = nn.CrossEntropyLoss()
    micro_batches = [batch(size, seed) for seed, size in enumerate(sizes)]
    union = [tuple(torch.cat(parts) for parts in zip(*micro_batches, strict=True))]
    model = mlp()
    expected = BUILDERS[curvature](copy.deepcopy(model), loss_fn, union, fisher_type=fisher_type)
    opt = KFACOptimizer(model, loss_fn, curvature=curvature, fisher_type=fisher_type, ema_decay=0.0)
    accumulate(model, opt, loss_fn, micro_batches, [size / sum(sizes) for size in sizes])
    actual = opt.curvature_operator().to_dense()
    torch.testing.assert_close(actual, expected.to_dense(), rtol=1e-9, atol=1e-12)


def test_accumulated_summed_loss_equals_the_builder_on_the_concatenated_batch():
    loss_fn = nn.MSELoss(reduction="sum")  # the union's loss is the plain sum of the micro-batches'
    g = torch.Generator().manual_seed(0)
    micro_batches = [
        (torch.randn(n, 4, generator=g, dtype=DOUBLE), torch.randn(n, 3, generator=g, dtype=DOUBLE))
        for n in (4, 7)
    ]
    union = [tuple(torch.cat(parts) for parts in zip(*micro_batches, strict=True))]
    model = mlp()
    expected = curvops.KFAC(copy.deepcopy(model), loss_fn, union, fisher_type="type-2")
    opt = KFACOptimizer(model, loss_fn, fisher_type="type-2", ema_decay=0.0)
    accumulate(model, opt, loss_fn, micro_batches, [1.0, 1.0])
    actual = opt.curvature_operator().to_dense()
    torch.testing.assert_close(actual, expected.to_dense(), rtol=1e-9, atol=1e-12)


def test_zero_grad_drops_the_statistics_of_earlier_backward_passes():
    loss_fn = nn.CrossEntropyLoss()
    dropped, kept = batch(8, seed=0), batch(8, seed=1)
    model = mlp()
    before = copy.deepcopy(model)
    opt = KFACOptimizer(model, loss_fn, fisher_type="type-2", ema_decay=0.0)
    loss_fn(model(dropped[0]), dropped[1]).backward()  # e.g. a gradient-norm probe
    train_step(model, opt, loss_fn, *kept)
    for layer, (g, a) in zip(opt.layers, true_factors(before, [kept], [1.0], "type-2"), strict=True):
        torch.testing.assert_close(layer.output_factor, g, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(layer.input_factor, a, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("pattern", ["accuracy check before the loss", "all forwards first"])
def test_a_loss_of_an_earlier_forward_pass_is_refused(pattern):
    loss_fn = nn.CrossEntropyLoss()
    model = mlp()
    KFACOptimizer(model, loss_fn)
    (x, y), (other, _) = batch(8, seed=0), batch(8, seed=1)
    output = model(x)
    later = model(other)  # grad enabled: its layer tensors replace those of x
    with pytest.raises(ValueError, match=r"earlier forward pass.*Compute each loss right after its forward"):
        loss_fn(output, y)
    if pattern == "all forwards first":
        loss_fn(later, y)  # the latest forward's own loss is fine


def test_a_loss_of_another_model_between_forward_and_loss_is_ignored():
    loss_fn = nn.CrossEntropyLoss()
    model, teacher = mlp(), mlp(seed=3)
    before = copy.deepcopy(model)
    opt = KFACOptimizer(model, loss_fn, fisher_type="type-2", ema_decay=0.0)
    x, y = batch(8, seed=0)
    opt.zero_grad()
    output = model(x)
    loss_fn(teacher(x), y).backward()  # the same loss module on another model's output
    loss_fn(output, y).backward()
    opt.step()
    for layer, (g, a) in zip(opt.layers, true_factors(before, [(x, y)], [1.0], "type-2"), strict=True):
        torch.testing.assert_close(layer.output_factor, g, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(layer.input_factor, a, rtol=1e-10, atol=1e-13)


def test_mc_micro_batches_draw_their_own_labels():
    loss_fn = nn.CrossEntropyLoss()
    x, y = batch(64, seed=0)
    factors = {}
    for repeats in (1, 2):
        model = mlp()
        opt = KFACOptimizer(model, loss_fn, fisher_type="mc", ema_decay=0.0)
        accumulate(model, opt, loss_fn, [(x, y)] * repeats, [1 / repeats] * repeats)
        factors[repeats] = opt.layers[1].output_factor
    # the same draws twice would give the single micro-batch's G exactly
    assert not torch.allclose(factors[1], factors[2], rtol=1e-6, atol=0)


def test_a_negatively_weighted_loss_is_refused():
    loss_fn = nn.CrossEntropyLoss()
    model = mlp()
    KFACOptimizer(model, loss_fn)
    x, y = batch(8, seed=0)
    with pytest.raises(ValueError, match=r"weight -1\.0 < 0"):
        (-loss_fn(model(x), y)).backward()


# ---------------------------------------------------------------- item 20: zeroth-order closures
def regression():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DOUBLE)
    x, y = torch.randn(16, 3, dtype=DOUBLE), torch.randn(16, 2, dtype=DOUBLE)
    return model, x, y


def test_zeroth_order_closure_returning_a_vector_leaves_the_weights_bit_exact():
    model, x, y = regression()
    opt = ZerothOrderOptimizer(model.parameters(), lr=0.1, epsilon=1e-2)
    before = parameters(model)
    per_datum = nn.MSELoss(reduction="none")
    with pytest.raises(TypeError, match=r"scalar.*shape \[16, 2\].*\.mean\(\)"):
        opt.step(lambda: per_datum(model(x), y))
    assert_same(parameters(model), before)
    assert opt.steps == 0 and not opt.state


def failing_closure(model, x, y, failing_call: int):
    """A closure whose ``failing_call``-th call raises."""
    calls = []

    def closure():
        calls.append(None)
        if len(calls) == failing_call:
            raise RuntimeError("out of memory")
        return nn.functional.mse_loss(model(x), y)

    return closure


def test_zeroth_order_closure_raising_restores_the_weights():
    model, x, y = regression()
    opt = ZerothOrderOptimizer(model.parameters(), lr=0.1, epsilon=1e-2)
    before = parameters(model)
    for failing_call in (1, 2, 3):  # at θ, at θ + εz, at θ − εz
        with pytest.raises(RuntimeError, match="out of memory"):
            opt.step(failing_closure(model, x, y, failing_call))
        if failing_call == 1:
            assert_same(parameters(model), before)  # nothing was perturbed yet
        for p, q in zip(model.parameters(), before, strict=True):
            # θ ± εz ∓ εz: within the rounding of one addition of εz
            torch.testing.assert_close(p.detach(), q, rtol=0, atol=4 * torch.finfo(DOUBLE).eps * 1e-2)
        assert opt.steps == 0 and not opt.state


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"betas": 0.9}, ValueError, r"betas must be a pair \(beta1, beta2\).*got 0\.9"),
        ({"betas": (0.9, True)}, ValueError, r"betas\[1\]"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        ({"seed": True}, TypeError, "seed"),
        ({"epsilon": True}, ValueError, "epsilon"),
        ({"lr": True}, ValueError, "lr"),
        ({"weight_decay": False}, ValueError, "weight_decay"),
    ],
)
def test_zeroth_order_arguments_have_strict_types(options, error, match):
    with pytest.raises(error, match=match):
        ZerothOrderOptimizer(nn.Linear(2, 1).parameters(), **options)


# ---------------------------------------------------------------- item 15: strict types
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"factored": "no"}, TypeError, "factored must be True or False"),
        ({"factored": 1}, TypeError, "factored"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        ({"seed": True}, TypeError, "seed"),
        ({"T_stats": True}, ValueError, "T_stats"),
        ({"T_inv": 10.0}, ValueError, "T_inv"),
        ({"mc_samples": 2.0}, ValueError, "mc_samples"),
        ({"momentum": True}, ValueError, "momentum"),
        ({"ema_decay": False}, ValueError, "ema_decay"),
        ({"weight_decay": True}, ValueError, "weight_decay"),
        ({"kl_clip": True}, ValueError, "kl_clip"),
        ({"lr": True}, ValueError, "lr"),
        ({"damping": True}, ValueError, "damping"),
        ({"curvature": 1}, ValueError, "curvature"),
    ],
)
def test_kfac_optimizer_arguments_have_strict_types(options, error, match):
    with pytest.raises(error, match=match):
        KFACOptimizer(mlp(), nn.CrossEntropyLoss(), **options)


def test_kfac_optimizer_needs_a_module():
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        KFACOptimizer(lambda x: x, nn.CrossEntropyLoss())


# ---------------------------------------------------------------- item 16: tampered state dicts
def trained_state(curvature: str, make=mlp, data=None, **options):
    loss_fn = nn.CrossEntropyLoss()
    model = make()
    opt = KFACOptimizer(model, loss_fn, curvature=curvature, **options)
    for x, y in data or [batch(8, seed) for seed in range(2)]:
        train_step(model, opt, loss_fn, x, y)
    return opt.state_dict(), make, loss_fn


def tamper(state, path, value):
    state = copy.deepcopy(state)
    entry = state
    for key in path[:-1]:
        entry = entry[key]
    entry[path[-1]] = value
    return state


@pytest.mark.parametrize(
    ("curvature", "path", "value", "match"),
    [
        ("kfac", ("curvature", "statistics", "0", "input_factor"), torch.zeros(5, 5),
         r"\['statistics'\]\['0'\]\['input_factor'\] is a tensor of shape \[5, 5\].*shape \[4, 4\]"),
        ("kfac", ("curvature", "statistics", "2", "output_factor"), torch.zeros(3),
         r"\['2'\]\['output_factor'\] is a tensor of shape \[3\].*shape \[3, 3\]"),
        ("tkfac", ("curvature", "statistics", "0", "trace"), torch.zeros(1),
         r"\['trace'\] is a tensor of shape \[1\].*shape \[\]"),
        ("ekfac", ("curvature", "bases", "2", 1), torch.eye(5, dtype=DOUBLE),
         r"\['bases'\]\['2'\]\[1\] is a tensor of shape \[5, 5\].*shape \[6, 6\]"),
        ("ekfac", ("curvature", "scales", "0", 0), torch.zeros(4, 6),
         r"\['scales'\]\['0'\]\[0\] is a tensor of shape \[4, 6\].*shape \[6, 4\]"),
        ("kfac", ("state", 0, "momentum_buffer"), torch.zeros(4, 6),
         r"\['state'\]\[0\]\['momentum_buffer'\] is a tensor of shape \[4, 6\]; parameter 0 has"),
        ("kfac", ("curvature", "statistics", "0"), None, r"\['statistics'\]\['0'\] must be a dict"),
        ("kfac", ("curvature", "statistics", "0", "trace"), torch.zeros(()), r"\['0'\] holds"),
        ("kfac", ("curvature", "steps"), 2.5, r"\['steps'\] must be an integer"),
    ],
)  # fmt: skip
def test_tampered_optimizer_state_is_refused_at_load(curvature, path, value, match):
    state, make, loss_fn = trained_state(curvature)
    opt = KFACOptimizer(make(), loss_fn, curvature=curvature)
    with pytest.raises(StateDictError, match=match):
        opt.load_state_dict(tamper(state, path, value))
    assert opt.steps == 0 and opt.preconditioner is None and opt.layers[0].input_factor is None


def test_optimizer_state_with_a_missing_key_is_refused():
    state, make, loss_fn = trained_state("kfac")
    del state["curvature"]["bases"]
    with pytest.raises(StateDictError, match="bases"):
        KFACOptimizer(make(), loss_fn).load_state_dict(state)


def cnn():
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3)]
    return nn.Sequential(*layers).to(DOUBLE)


def embedding():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 3)).to(DOUBLE)


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("kind", ["joint bias", "conv", "embedding"])
def test_valid_state_of_every_layer_kind_loads(curvature, kind):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (8,), generator=g)
    make, data = mlp, None
    if kind == "conv":
        make, data = cnn, [(torch.randn(8, 1, 4, 4, generator=g, dtype=DOUBLE), labels)]
    elif kind == "embedding":
        make, data = embedding, [(torch.randint(0, 7, (8, 3), generator=g), labels)]
    options = {"bias": "joint"} if kind == "joint bias" else {}
    state, make, loss_fn = trained_state(curvature, make, data, **options)
    opt = KFACOptimizer(make(), loss_fn, curvature=curvature, **options)
    opt.load_state_dict(state)
    assert opt.steps == len(data or [0, 0])


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("state", 0, "gradient_average"), torch.zeros(3),
         r"\['gradient_average'\] is \[3\]; parameter 0 has shape \[2, 3\]"),
        (("zeroth_order", "steps"), "3", r"\['steps'\] must be an integer"),
        (("zeroth_order", "curvature"), float("nan"), r"\['curvature'\] must be a finite number"),
    ],
)  # fmt: skip
def test_tampered_zeroth_order_state_is_refused_at_load(path, value, match):
    model, x, y = regression()
    opt = ZerothOrderOptimizer(model.parameters(), lr=0.1)
    opt.step(lambda: nn.functional.mse_loss(model(x), y))
    fresh = ZerothOrderOptimizer(model.parameters(), lr=0.1)
    with pytest.raises(StateDictError, match=match):
        fresh.load_state_dict(tamper(opt.state_dict(), path, value))
    assert fresh.steps == 0 and not fresh.state


# ---------------------------------------------------------------- item 21: TKFAC and attention
@pytest.mark.parametrize("scale", [1e160, 0.0])  # overflowing inputs (δ = nan), zero inputs (δ = 0)
def test_tkfac_unusable_statistics_are_skipped_with_a_warning(scale):
    loss_fn = nn.CrossEntropyLoss()
    model = mlp()
    opt = KFACOptimizer(model, loss_fn, curvature="tkfac", fisher_type="type-2", T_inv=1)
    x, y = batch(8, seed=0)
    train_step(model, opt, loss_fn, x, y)
    running = [{name: getattr(layer, name).clone() for name in TKFAC_STATISTICS} for layer in opt.layers]
    preconditioner = opt.preconditioner
    with pytest.warns(RuntimeWarning, match="curvature statistics"):
        train_step(model, opt, loss_fn, scale * x, y)
    for layer, values in zip(opt.layers, running, strict=True):
        for name, value in values.items():
            assert torch.equal(getattr(layer, name), value)
    assert opt.preconditioner is preconditioner and opt.steps == 2


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x)[0].mean(1))


def attention_data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 5, 4, generator=g, dtype=DOUBLE), torch.randint(0, 3, (6,), generator=g))]


OPAQUE_REASON = "treated as opaque by this test"


@pytest.fixture
def opaque_attention(monkeypatch):
    """nn.MultiheadAttention as a module without a rule (its projections have Kronecker blocks since
    issue 13; tests/test_attention.py checks those)."""
    monkeypatch.setitem(OPAQUE_MODULES, nn.MultiheadAttention, OPAQUE_REASON)


@pytest.mark.parametrize("which", ["all", "out_proj only"])
def test_kfac_names_multihead_attention_as_unsupported(which, opaque_attention):
    model = Attention().to(DOUBLE)
    params = None if which == "all" else list(model.attention.out_proj.parameters())
    message = r"'attention' \(MultiheadAttention\)\. nn\.MultiheadAttention is not supported yet by KFAC: "
    with pytest.raises(ValueError, match=message + OPAQUE_REASON):
        curvops.KFAC(model, nn.CrossEntropyLoss(), attention_data(), params=params, fisher_type="type-2")


def test_kfac_dense_block_of_multihead_attention_is_its_ggn_block(opaque_attention):
    model = Attention().to(DOUBLE)  # train mode (no dropout): forward-mode AD runs through attention
    loss_fn = nn.CrossEntropyLoss()
    data = attention_data()
    op = curvops.KFAC(model, loss_fn, data, fisher_type="type-2", unsupported="dense")
    names = [name for name, _ in model.attention.named_parameters()]
    values = {name: p.detach() for name, p in model.attention.named_parameters()}
    x = data[0][0]

    def logits(flat):
        shaped = dict(zip(names, flat.split([v.numel() for v in values.values()]), strict=True))
        shaped = {n: t.reshape(values[n].shape) for n, t in shaped.items()}
        attended = torch.func.functional_call(model.attention, shaped, (x, x, x))[0]
        return model.head(attended.mean(1))

    flat = torch.cat([v.reshape(-1) for v in values.values()])
    jacobian = torch.func.jacrev(logits)(flat).detach()  # [N, C, D]
    p = torch.softmax(logits(flat).detach(), dim=1)
    hessians = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    expected = torch.einsum("ncd,nce,nef->df", jacobian, hessians, jacobian) / len(x)
    torch.testing.assert_close(op.block("attention").to_dense(), expected, rtol=1e-9, atol=1e-12)


def test_kfac_optimizer_gives_multihead_attention_a_first_order_step(opaque_attention):
    model = Attention().to(DOUBLE)
    loss_fn = nn.CrossEntropyLoss()
    opt = KFACOptimizer(model, loss_fn, lr=0.1, momentum=0.0, fisher_type="type-2")
    assert [id(p) for p in opt.curvature_params] == [id(p) for p in model.head.parameters()]
    x, y = attention_data()[0]
    before = parameters(model.attention)
    loss_fn(model(x), y).backward()
    gradients = [p.grad.clone() for p in model.attention.parameters()]
    opt.step()
    for p, b, g in zip(model.attention.parameters(), before, gradients, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * g, rtol=0, atol=1e-15)


class BorrowedWeight(nn.Module):
    """Uses ``inner``'s weight without calling ``inner`` (as nn.MultiheadAttention does)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.inner.weight, self.inner.bias)


def test_a_layer_whose_weight_is_used_without_calling_it_is_named():
    message = r"'inner' did not run in the forward pass.*without calling the module.*leave its parameters out"
    model = BorrowedWeight().to(DOUBLE)
    loss_fn = nn.CrossEntropyLoss()
    x, y = batch(8, seed=0)
    with pytest.raises(ValueError, match=message):
        curvops.KFAC(model, loss_fn, [(x, y)], fisher_type="type-2")
    KFACOptimizer(model, loss_fn)
    with pytest.raises(ValueError, match=message):
        loss_fn(model(x), y)


def test_zeroth_order_loss_is_evaluated_first_at_the_unperturbed_parameters():
    model, x, y = regression()
    opt = ZerothOrderOptimizer(model.parameters(), lr=0.1, epsilon=1e-2)
    with torch.no_grad():
        expected = float(nn.functional.mse_loss(model(x), y))
    returned = opt.step(lambda: nn.functional.mse_loss(model(x), y))
    assert float(returned) == expected
    assert math.isfinite(opt.last_estimates[1])
