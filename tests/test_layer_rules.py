"""Layer rules, statistics values and the optimizer's damping, against dense float64 truth."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvops
from curvops.nn.fisher import FISHER_TYPES, fisher_type
from curvops.nn.kronecker_pass import batch_statistics
from curvops.nn.layers import (
    DenseInputRule,
    KroneckerLayer,
    LayerRule,
    LinearRule,
    find_layers,
    layer_rule,
    register_layer_rule,
)
from curvops.nn.options import KroneckerOptions
from curvops.nn.statistics import Corrections, LayerStatistics


@pytest.fixture(autouse=True)
def _float64():
    """Every tensor of these tests in float64 (the default dtype restored after each)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


class Affine(nn.Module):
    """A linear layer written by hand: ``y = x W^T + b``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))
        self.bias = nn.Parameter(0.1 * torch.randn(n_out))

    def forward(self, x):
        return x @ self.weight.T + self.bias


class InputMajor(nn.Module):
    """A layer that stores its weight ``[n_in, n_out]`` and scales its input: ``y = (2x) W + b``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / math.sqrt(n_in))
        self.bias = nn.Parameter(0.1 * torch.randn(n_out))

    def forward(self, x):
        return (2 * x) @ self.weight + self.bias


class InputMajorRule(DenseInputRule):
    """The rule of :class:`InputMajor`: inputs ``a = 2x``, weight stored transposed."""

    transposed = True

    def features(self, module, inputs):
        return 2 * inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])


register_layer_rule(Affine, LinearRule())
register_layer_rule(InputMajor, InputMajorRule())


def _dense_ggn(model, x, y, params):
    """``Σ_n J_n^T ∇²ℓ_n J_n`` of a summed MSE loss, by torch.func."""
    names = [n for n, p in model.named_parameters() if any(p is q for q in params)]
    values = dict(model.named_parameters())

    def output(*flat):
        return torch.func.functional_call(model, {**values, **dict(zip(names, flat, strict=True))}, (x,))

    jac = torch.func.jacrev(output, argnums=tuple(range(len(params))))(*params)
    rows = torch.cat([j.reshape(y.numel(), -1) for j in jac], dim=1)
    return 2 * rows.T @ rows


@pytest.mark.parametrize("layer_type", [Affine, InputMajor])
@pytest.mark.parametrize("name", ["kfac", "ekfac", "tkfac", "tekfac"])
def test_a_registered_rule_is_exact_on_one_datum_of_a_linear_model(layer_type, name):
    """One datum, MSE, no nonlinearity: every Kronecker approximation equals the GGN's layer blocks."""
    torch.manual_seed(0)
    model = nn.Sequential(layer_type(3, 4), layer_type(4, 2))
    x, y = torch.randn(1, 3), torch.randn(1, 2)
    params = list(model.parameters())
    op = curvops.nn.kfac.kronecker_approximation(
        name, model, nn.MSELoss(reduction="sum"), [(x, y)], fisher_type="type-2", bias="joint"
    )
    truth = _dense_ggn(model, x, y, params)
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in model]
    blocks = torch.block_diag(*[torch.ones(n, n) for n in sizes]).bool()
    torch.testing.assert_close(op.to_dense(), truth * blocks, rtol=1e-10, atol=1e-12)
    assert truth[~blocks].abs().max() > 1e-3  # the layers' cross terms are left out, not zero


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_registered_rule_matches_the_same_model_written_with_linear(dtype):
    """A shuffled loader of uneven batches with padding labels, in float64 and bf16 (there against
    the same model on one batch: ``x @ W.T + b`` rounds differently from ``nn.Linear`` in bf16)."""
    torch.manual_seed(1)
    ours = nn.Sequential(Affine(3, 5), nn.Tanh(), Affine(5, 2)).to(dtype)
    torchs = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)
    torchs.load_state_dict(ours.state_dict())
    x, y = torch.randn(13, 3).to(dtype), torch.randint(0, 2, (13,))
    y[::4] = -100  # padding: no loss terms
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=5,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    for build in (curvops.KFAC, curvops.EKFAC, curvops.TKFAC):
        a = build(ours, loss_fn, loader, fisher_type="type-2")
        b = build(torchs if dtype == torch.float64 else ours, loss_fn, [(x, y)], fisher_type="type-2")
        assert a.labels == b.labels and a.dtype == dtype
        if dtype == torch.bfloat16:  # float32 statistics of the bf16 model, compared before the cast
            a, b = (curvops.BlockDiagonal([block.op for block in op.blocks]) for op in (a, b))
        tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-7}
        torch.testing.assert_close(a.to_dense().double(), b.to_dense().double(), **tolerance)


def test_the_optimizer_preconditions_a_registered_layer():
    torch.manual_seed(2)
    model = nn.Sequential(InputMajor(3, 4), nn.Tanh(), nn.Linear(4, 2))
    loss_fn = nn.MSELoss()
    opt = curvops.optim.KFACOptimizer(model, loss_fn, fisher_type="type-2", damping=0.1, T_inv=1)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    truth = curvops.KFAC(model, loss_fn, [(x, y)], params=opt.curvature_params, fisher_type="type-2")
    loss_fn(model(x), y).backward()
    opt.step()
    assert opt.curvature_params[0] is model[0].weight
    torch.testing.assert_close(opt.curvature_operator().to_dense(), truth.to_dense(), rtol=1e-10, atol=1e-12)


def test_rules_are_found_by_class_and_registration_is_checked():
    class MyLinear(nn.Linear):
        pass

    assert isinstance(layer_rule(MyLinear(2, 2)), LinearRule)
    assert layer_rule(nn.PReLU(2)) is None
    with pytest.raises(TypeError, match=r"subclass of nn\.Module"):
        register_layer_rule(int, LinearRule())
    with pytest.raises(TypeError, match="LayerRule"):
        register_layer_rule(Affine, "linear")
    with pytest.raises(TypeError, match="abstract"):
        LayerRule()


def _layer(module: nn.Module) -> KroneckerLayer:
    (layer,), _ = find_layers(module, list(module.parameters()), "separate", "expand")
    return layer


def test_statistics_add_normalise_and_average_as_values():
    """Two batches' sums add to the whole data's factors: ``A = mean a aᵀ``, ``G = Σ g gᵀ / Z``."""
    torch.manual_seed(3)
    layer = _layer(nn.Linear(3, 2))
    x, g = torch.randn(10, 3), torch.randn(1, 10, 1, 2)
    options = KroneckerOptions.checked("tkfac", "type-2")
    parts = [
        batch_statistics(layer, x[s], g[:, s], options, torch.float64) for s in (slice(0, 4), slice(4, 10))
    ]
    total = (parts[0] + parts[1]).normalised(scale=10.0)
    gradients = torch.einsum("no,ni->noi", g[0, :, 0], x)
    torch.testing.assert_close(total.input_factor, x.T @ x / 10)
    torch.testing.assert_close(total.output_factor, g[0, :, 0].T @ g[0, :, 0] / 10)
    torch.testing.assert_close(total.trace, gradients.square().sum() / 10)
    torch.testing.assert_close(total.trace_input_factor.trace(), torch.tensor(1.0))
    assert parts[0].input_factor.data_ptr() != total.input_factor.data_ptr()  # values, not stores
    average = total.average(parts[0].normalised(4.0), decay=0.25)
    torch.testing.assert_close(
        average.output_factor, 0.25 * total.output_factor + 0.75 * parts[0].normalised(4.0).output_factor
    )
    assert LayerStatistics(layer).average(total, 0.5) is total
    with pytest.raises(ValueError, match="different layers"):
        total + LayerStatistics(_layer(nn.Linear(3, 2)))
    degenerate = LayerStatistics(layer, input_factor=torch.eye(3), trace=torch.tensor(0.0), input_count=1.0)
    with pytest.raises(ValueError, match=r"δ = 0\.0"):
        degenerate.normalised(1.0)
    halves = Corrections(torch.ones(2), None) + Corrections(torch.ones(2), None)
    torch.testing.assert_close((halves / 4).weight, torch.full((2,), 0.5))


def test_fisher_types_and_options_are_defined_once():
    assert set(FISHER_TYPES) == {"type-2", "mc", "empirical", "forward-only"}
    assert fisher_type("type-2").exact is curvops.GGN and fisher_type("mc").exact is curvops.FisherMC
    assert fisher_type("empirical").exact is curvops.EmpiricalFisher
    with pytest.raises(ValueError, match="Unknown fisher_type 'type2'"):
        fisher_type("type2")
    with pytest.raises(ValueError, match="TKFAC needs output gradients"):
        KroneckerOptions.checked("tkfac", "forward-only")
    with pytest.raises(ValueError, match="Unknown curvature 'tekfac'"):
        KroneckerOptions.checked("tekfac", "mc", allowed=("kfac",), what="curvature")


# ------------------------------------------------------------------ the optimizer's damping


def _one_step(curvature: str, factored: bool, damping: float):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    loss_fn = nn.CrossEntropyLoss()
    opt = curvops.optim.KFACOptimizer(
        model, loss_fn, curvature=curvature, fisher_type="type-2", damping=damping, T_inv=1, factored=factored
    )
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    loss_fn(model(x), y).backward()
    opt.step()
    return opt


def _block_inverse(opt, weight_inverse, bias_inverse):
    """The dense preconditioner from per-layer weight and bias inverses, in parameter order."""
    blocks = []
    for s in opt.layers:
        blocks += [weight_inverse(s), bias_inverse(s)]
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "tkfac", "tekfac"])
def test_unfactored_damping_is_exact_for_every_curvature(curvature):
    damping = 0.3
    opt = _one_step(curvature, False, damping)
    dense = opt.curvature_operator().to_dense()
    expected = torch.linalg.inv(dense + damping * torch.eye(dense.shape[0]))
    torch.testing.assert_close(opt.preconditioner.to_dense(), expected, rtol=1e-9, atol=1e-11)


def test_factored_kfac_is_pi_damped():
    damping = 0.3
    opt = _one_step("kfac", True, damping)
    root = math.sqrt(damping)

    def weight(s):
        g, a = s.output_factor, s.input_factor
        pi = math.sqrt((g.trace() / len(g)) / (a.trace() / len(a)))
        output = torch.linalg.inv(g + pi * root * torch.eye(len(g)))
        return torch.kron(output, torch.linalg.inv(a + root / pi * torch.eye(len(a))))

    def bias(s):
        return torch.linalg.inv(s.output_factor + damping * torch.eye(len(s.output_factor)))

    expected = _block_inverse(opt, weight, bias)
    torch.testing.assert_close(opt.preconditioner.to_dense(), expected, rtol=1e-9, atol=1e-11)
    exact = _one_step("kfac", False, damping).preconditioner.to_dense()
    assert (exact - expected).norm() > 1e-2 * expected.norm()  # the damping matters here


def test_factored_tkfac_is_gao_et_al():
    """``(√δ Ψ + √λ I)^-1 ⊗ (√δ Φ + √λ I)^-1``, and ``(G tr(bias)/tr G + λI)^-1`` for a bias."""
    damping = 0.3
    opt = _one_step("tkfac", True, damping)
    root = math.sqrt(damping)

    def weight(s):
        psi, phi, delta = s.trace_output_factor, s.trace_input_factor, s.trace.sqrt()
        return torch.kron(
            torch.linalg.inv(delta * psi + root * torch.eye(len(psi))),
            torch.linalg.inv(delta * phi + root * torch.eye(len(phi))),
        )

    def bias(s):
        g = s.output_factor * s.bias_trace / s.output_factor.trace()
        return torch.linalg.inv(g + damping * torch.eye(len(g)))

    expected = _block_inverse(opt, weight, bias)
    torch.testing.assert_close(opt.preconditioner.to_dense(), expected, rtol=1e-9, atol=1e-11)
    exact = _one_step("tkfac", False, damping).preconditioner.to_dense()
    assert (exact - expected).norm() > 1e-2 * expected.norm()


@pytest.mark.parametrize("curvature", ["ekfac", "tekfac"])
def test_factored_corrected_curvatures_are_refused(curvature):
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=f"{curvature.upper()} has no factored damping"):
        curvops.optim.KFACOptimizer(model, nn.MSELoss(), curvature=curvature, factored=True)


@pytest.mark.parametrize("curvature", ["ekfac", "tekfac"])
def test_corrected_optimizer_curvature_is_the_builders_after_one_step(curvature):
    """With ``ema_decay=0`` the running state is the step's: EKFAC's / TEKFAC's operator of the batch."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    loss_fn = nn.CrossEntropyLoss()
    opt = curvops.optim.KFACOptimizer(
        model, loss_fn, curvature=curvature, fisher_type="type-2", ema_decay=0.0, T_inv=1, damping=0.2
    )
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    truth = curvops.nn.kfac.kronecker_approximation(curvature, model, loss_fn, [(x, y)], fisher_type="type-2")
    loss_fn(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(opt.curvature_operator().to_dense(), truth.to_dense(), rtol=1e-9, atol=1e-11)
    dense = truth.to_dense()
    expected = torch.linalg.inv(dense + 0.2 * torch.eye(len(dense)))
    torch.testing.assert_close(opt.preconditioner.to_dense(), expected, rtol=1e-9, atol=1e-11)
    restored = curvops.optim.KFACOptimizer(model, loss_fn, curvature=curvature, fisher_type="type-2")
    restored.load_state_dict(opt.state_dict())
    torch.testing.assert_close(restored.curvature_operator().to_dense(), opt.curvature_operator().to_dense())
