"""KFACOptimizer: reduces to SGD, lands on least squares, follows its periods and averages,
matches the operator builders, resumes bit for bit, and refuses bad input."""

import copy
import math

import pytest
import torch
from helpers import DOUBLE, assert_resumes_bit_for_bit, train_steps
from torch import nn

import curvops
from curvops.errors import StateDictError
from curvops.optim import KFACOptimizer

CURVATURES = ["kfac", "ekfac", "tkfac"]


def mlp(seed: int = 0, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias)).to(DOUBLE)


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3)).to(
        DOUBLE
    )


def batches(count: int, seed: int = 0, size: int = 16, shape=(4,)) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, *shape, generator=g, dtype=DOUBLE), torch.randint(0, 3, (size,), generator=g))
        for _ in range(count)
    ]


def test_identity_curvature_is_sgd_with_momentum():
    # A single linear layer on inputs with E[x x^T] = I, and G = I (forward-only): F = I exactly.
    size = 5
    torch.manual_seed(0)
    model = nn.Linear(size, 3).to(DOUBLE)
    reference = copy.deepcopy(model)
    x = math.sqrt(size) * torch.eye(size, dtype=DOUBLE)
    y = torch.randn(size, 3, dtype=DOUBLE)
    loss_fn = nn.MSELoss()
    opt = KFACOptimizer(model, loss_fn, lr=0.1, momentum=0.9, weight_decay=0.01, damping=0.0,
                        fisher_type="forward-only", T_inv=1)  # fmt: skip
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(6):
        train_steps(model, opt, loss_fn, [(x, y)])
        train_steps(reference, sgd, loss_fn, [(x, y)])
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_one_newton_step_solves_linear_least_squares(curvature):
    torch.manual_seed(1)
    model = nn.Linear(4, 2).to(DOUBLE)
    x = torch.randn(40, 4, dtype=DOUBLE)
    y = torch.randn(40, 2, dtype=DOUBLE)
    loss_fn = nn.MSELoss()
    opt = KFACOptimizer(model, loss_fn, curvature=curvature, lr=1.0, momentum=0.0, damping=1e-20,
                        fisher_type="type-2", bias="joint")  # fmt: skip
    train_steps(model, opt, loss_fn, [(x, y)])
    design = torch.cat([x, torch.ones(40, 1, dtype=DOUBLE)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    torch.testing.assert_close(model.weight.detach(), solution[:4].T, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(model.bias.detach(), solution[4], rtol=1e-7, atol=1e-8)


BUILDERS = {
    "kfac": curvops.KFAC,
    "ekfac": curvops.EKFAC,
    "tkfac": curvops.TKFAC,
}


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize(("make", "shape", "bias"), [(mlp, (4,), "separate"), (mlp, (4,), "joint"),
                                                     (cnn, (1, 5, 5), "separate")])  # fmt: skip
def test_first_batch_curvature_equals_the_builder(curvature, make, shape, bias):
    model = make()
    data = batches(1, shape=shape)
    loss_fn = nn.CrossEntropyLoss()
    expected = BUILDERS[curvature](copy.deepcopy(model), loss_fn, data, fisher_type="type-2", bias=bias)
    opt = KFACOptimizer(model, loss_fn, curvature=curvature, fisher_type="type-2", bias=bias, ema_decay=0.0)
    train_steps(model, opt, loss_fn, data)
    torch.testing.assert_close(
        opt.curvature_operator().to_dense(), expected.to_dense(), rtol=1e-9, atol=1e-12
    )


def kfac_factors(model, loss_fn, batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    op = curvops.KFAC(copy.deepcopy(model), loss_fn, [batch], fisher_type="type-2")
    return [op.block(f"{i}.weight").factors for i in (0, 2)]


def test_running_averages_and_periods():
    model = mlp()
    loss_fn = nn.CrossEntropyLoss()
    data = batches(9)
    decay = 0.7
    opt = KFACOptimizer(model, loss_fn, fisher_type="type-2", ema_decay=decay, T_stats=2, T_inv=4, lr=0.05)
    expected = None
    preconditioners = []
    for step, batch in enumerate(data):
        if step % 2 == 0:
            fresh = kfac_factors(model, loss_fn, batch)
            expected = fresh if expected is None else [
                tuple(decay * old + (1 - decay) * new for old, new in zip(e, f, strict=True))
                for e, f in zip(expected, fresh, strict=True)
            ]  # fmt: skip
        train_steps(model, opt, loss_fn, [batch])
        preconditioners.append(opt.preconditioner)
        for layer, (g, a) in zip(opt.layers, expected, strict=True):
            torch.testing.assert_close(layer.output_factor, g, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(layer.input_factor, a, rtol=1e-10, atol=1e-12)
    rebuilt = [i for i in range(1, len(data)) if preconditioners[i] is not preconditioners[i - 1]]
    assert rebuilt == [4, 8]


def test_ekfac_scales_follow_every_statistics_step():
    model = mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = KFACOptimizer(model, loss_fn, curvature="ekfac", fisher_type="type-2", T_stats=1, T_inv=3)
    preconditioners, bases = [], []
    for batch in batches(4):
        train_steps(model, opt, loss_fn, [batch])
        preconditioners.append(opt.preconditioner)
        bases.append(opt.bases["0"][0])
    assert len({id(p) for p in preconditioners}) == 4  # s is averaged at every statistics step
    assert bases[0] is bases[1] is bases[2] and bases[3] is not bases[2]  # new basis at step 3


@pytest.mark.parametrize("curvature", CURVATURES)
def test_state_dict_round_trip_resumes_bit_for_bit(curvature):
    loss_fn = nn.CrossEntropyLoss()
    data = batches(8)
    options = {"curvature": curvature, "T_inv": 2, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    model = mlp()
    opt = KFACOptimizer(model, loss_fn, **options)
    train_steps(model, opt, loss_fn, data[:3])
    twin = mlp(seed=5)
    assert_resumes_bit_for_bit(
        model, opt, twin, lambda m: KFACOptimizer(m, loss_fn, **options), loss_fn, data[3:]
    )


def test_state_dict_mismatch_raises():
    loss_fn = nn.CrossEntropyLoss()
    model = mlp()
    opt = KFACOptimizer(model, loss_fn)
    train_steps(model, opt, loss_fn, batches(1))
    with pytest.raises(StateDictError, match="EKFAC"):
        KFACOptimizer(mlp(), loss_fn, curvature="ekfac").load_state_dict(opt.state_dict())
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 3)).to(DOUBLE)
    with pytest.raises(StateDictError, match="layers"):
        KFACOptimizer(other, loss_fn).load_state_dict(opt.state_dict())
    with pytest.raises(StateDictError, match="curvature"):
        KFACOptimizer(mlp(), loss_fn).load_state_dict(torch.optim.SGD(mlp().parameters(), lr=1).state_dict())


@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical"])
def test_statistics_leave_grad_the_true_label_gradient(fisher_type):
    loss_fn = nn.CrossEntropyLoss()
    model, reference = mlp(), mlp()
    KFACOptimizer(model, loss_fn, fisher_type=fisher_type, mc_samples=3)
    x, y = batches(1)[0]
    loss_fn(model(x), y).backward()
    nn.CrossEntropyLoss()(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_unsupported_layers_take_a_first_order_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 3)).to(DOUBLE)
    loss_fn = nn.CrossEntropyLoss()
    opt = KFACOptimizer(model, loss_fn, lr=0.1, momentum=0.0)
    norm = model[1]
    before = [p.detach().clone() for p in norm.parameters()]
    x, y = batches(1)[0]
    loss_fn(model(x), y).backward()
    grads = [p.grad.clone() for p in norm.parameters()]
    opt.step()
    for p, b, g in zip(norm.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)
    assert [id(p) for p in opt.curvature_params] == [
        id(p) for p in (*model[0].parameters(), *model[2].parameters())
    ]


def test_kl_clipping_scales_the_step():
    loss_fn = nn.CrossEntropyLoss()
    batch = batches(1)[0]
    updates = {}
    for clip in (None, 1e-6):
        model = mlp()
        before = [p.detach().clone() for p in model.parameters()]
        opt = KFACOptimizer(model, loss_fn, lr=0.5, momentum=0.0, kl_clip=clip, fisher_type="type-2")
        train_steps(model, opt, loss_fn, [batch])
        grads = [p.grad for p in model.parameters()]
        updates[clip] = [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]
    # unclipped update = -lr p, so lr^2 Σ p·d = -lr Σ update·d
    quadratic = -0.5 * sum(float((u * g).sum()) for u, g in zip(updates[None], grads, strict=True))
    nu = math.sqrt(1e-6 / quadratic)
    assert nu < 1
    for clipped, unclipped in zip(updates[1e-6], updates[None], strict=True):
        torch.testing.assert_close(clipped, nu * unclipped, rtol=1e-9, atol=1e-14)


def test_schedules_are_callables_of_the_step():
    model = mlp()
    loss_fn = nn.CrossEntropyLoss()
    seen = []

    def damping(step):
        seen.append(step)
        return 0.1 / (1 + step)

    opt = KFACOptimizer(model, loss_fn, lr=lambda step: 0.1 * 0.5**step, damping=damping, T_inv=2)
    lrs = []
    for batch in batches(4):
        train_steps(model, opt, loss_fn, [batch])
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.1, 0.05, 0.025, 0.0125]
    assert opt.param_groups[0]["damping"] == pytest.approx(0.1 / 4)
    assert seen[-4:] == [0, 1, 2, 3]


def test_singular_factors_with_zero_damping_raise():
    model = nn.Linear(4, 3).to(DOUBLE)
    loss_fn = nn.CrossEntropyLoss()
    opt = KFACOptimizer(model, loss_fn, damping=0.0, fisher_type="type-2")
    x = torch.zeros(8, 4, dtype=DOUBLE)  # A = 0
    loss_fn(model(x), torch.zeros(8, dtype=torch.long)).backward()
    with pytest.raises(curvops.SingularOperatorError):
        opt.step()


def test_nonfinite_loss_or_gradient_skips_the_step():
    model = mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = KFACOptimizer(model, loss_fn, T_inv=1)
    train_steps(model, opt, loss_fn, batches(2))
    params = [p.detach().clone() for p in model.parameters()]
    factors = [(la.input_factor.clone(), la.output_factor.clone()) for la in opt.layers]
    x, y = batches(1, seed=3)[0]
    x[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        train_steps(model, opt, loss_fn, [(x, y)])
    x[0, 0] = 0.0
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p.detach(), q)
    for la, (a, g) in zip(opt.layers, factors, strict=True):
        assert torch.equal(la.input_factor, a) and torch.equal(la.output_factor, g)
    assert opt.steps == 2


def test_missing_loss_call_raises():
    model = mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = KFACOptimizer(model, loss_fn)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="loss_fn"):
        opt.step()


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, "lr"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"damping": -1e-3}, ValueError, "damping"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"ema_decay": 1.5}, ValueError, "ema_decay"),
        ({"T_stats": 0}, ValueError, "T_stats"),
        ({"T_inv": 2.5}, ValueError, "T_inv"),
        ({"T_stats": 2, "T_inv": 3}, ValueError, "multiple"),
        ({"kl_clip": 0.0}, ValueError, "kl_clip"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"mc_samples": 0}, ValueError, "mc_samples"),
        ({"curvature": "shampoo"}, ValueError, "curvature"),
        ({"fisher_type": "exact"}, ValueError, "fisher_type"),
        ({"curvature": "ekfac", "fisher_type": "forward-only"}, ValueError, "forward-only"),
    ],
)
def test_invalid_hyperparameters_raise_at_construction(options, error, match):
    with pytest.raises(error, match=match):
        KFACOptimizer(mlp(), nn.CrossEntropyLoss(), **options)


def test_invalid_setups_raise():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        KFACOptimizer(mlp(), nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="Kronecker rule"):
        KFACOptimizer(nn.Sequential(nn.PReLU(4)), nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="param-group"):
        KFACOptimizer(mlp(), nn.CrossEntropyLoss(), params=[{"params": mlp().parameters()}])
    with pytest.raises(ValueError, match="negative log-likelihood"):
        KFACOptimizer(mlp(), nn.L1Loss())
    model = mlp()
    opt = KFACOptimizer(model, nn.CrossEntropyLoss())
    with pytest.raises(RuntimeError, match="No curvature statistics"):
        opt.curvature_operator()


@pytest.mark.parametrize("curvature", CURVATURES)
def test_training_reduces_the_loss(curvature, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(64, 4, device=device)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = KFACOptimizer(model, loss_fn, curvature=curvature, lr=0.1, damping=0.03, T_inv=5)
    losses = train_steps(model, opt, loss_fn, [(x, y)] * 40)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("curvature", CURVATURES)
def test_damping_below_float32_rounding_of_large_factors_still_inverts(curvature):
    # sqrt(λ) = 0.01 is far below eps · n · max eigenvalue of these factors in float32
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    loss_fn = nn.CrossEntropyLoss()
    opt = KFACOptimizer(model, loss_fn, curvature=curvature, damping=1e-4, lr=1e-3)
    x, y = 1e3 * torch.randn(64, 32), torch.randint(0, 3, (64,))
    train_steps(model, opt, loss_fn, [(x, y)] * 2)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("curvature", CURVATURES)
def test_embedding_curvature_equals_the_builder(curvature):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 3)).to(DOUBLE)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 7, (16, 3), generator=g), torch.randint(0, 3, (16,), generator=g))]
    loss_fn = nn.CrossEntropyLoss()
    expected = BUILDERS[curvature](copy.deepcopy(model), loss_fn, data, fisher_type="type-2")
    opt = KFACOptimizer(model, loss_fn, curvature=curvature, fisher_type="type-2", ema_decay=0.0)
    train_steps(model, opt, loss_fn, data)
    actual = opt.curvature_operator().to_dense()
    torch.testing.assert_close(actual, expected.to_dense(), rtol=1e-9, atol=1e-12)
