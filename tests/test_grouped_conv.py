"""Issue 13, item 3: convolutions with ``groups > 1`` (depthwise included) get one Kronecker block
per group in KFAC, EKFAC, TKFAC, TEKFAC and the optimizer.

Ground truth: the dense float64 GGN (``torch.func``) where KFAC is exact (one datum, one output
position, a squared error: the GGN block of a grouped weight is block-diagonal over groups), and,
on many data and positions, the same convolution written as ``g`` separate ``groups=1``
convolutions on channel slices (weights copied), whose operators the groups=1 code builds.
"""

import copy

import pytest
import torch
from helpers import DOUBLE, generator, kron
from model_truth import Truth
from test_kfac import _block_diagonal, _groups
from torch import nn

import curvops
from curvops.linalg import GroupedKronecker, GroupedKroneckerEigen
from curvops.nn.layers import ConvRule
from curvops.optim import KFACOptimizer

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _conv(dims, in_channels, out_channels, groups, **options):
    torch.manual_seed(in_channels + out_channels + groups + dims)
    return CONVS[dims](in_channels, out_channels, groups=groups, **options).double()


class SplitConv(nn.Module):
    """A grouped convolution as ``g`` convolutions with ``groups=1`` on channel slices, its weights
    copied: group ``j`` maps input channels ``j C_in/g ..`` to output channels ``j C_out/g ..``."""

    def __init__(self, conv):
        super().__init__()
        g, self.out_channels = conv.groups, conv.out_channels
        options = {key: getattr(conv, key) for key in ("kernel_size", "stride", "padding", "dilation")}
        sizes = (conv.in_channels // g, conv.out_channels // g)
        options.update(bias=conv.bias is not None, padding_mode=conv.padding_mode)
        self.parts = nn.ModuleList(type(conv)(*sizes, **options) for _ in range(g)).to(conv.weight.dtype)
        with torch.no_grad():
            for part, weight in zip(self.parts, conv.weight.chunk(g), strict=True):
                part.weight.copy_(weight)
            if conv.bias is not None:
                for part, bias in zip(self.parts, conv.bias.chunk(g), strict=True):
                    part.bias.copy_(bias)

    def forward(self, x):
        slices = x.chunk(len(self.parts), dim=1)
        return torch.cat([part(s) for part, s in zip(self.parts, slices, strict=True)], dim=1)

    def flat_params(self):
        """The parameters in the order of the grouped convolution's flat ``[weight, bias]``."""
        biases = [part.bias for part in self.parts if part.bias is not None]
        return [part.weight for part in self.parts] + biases


SINGLE_POSITION = [  # (dims, C_in, C_out, groups, input width, options): one output position
    (1, 4, 6, 2, 3, {"kernel_size": 3}),  # groups=2, input size = kernel size, no padding
    (2, 8, 4, 4, 3, {"kernel_size": 3, "padding": "valid"}),  # groups=4, two input channels each
    (2, 4, 4, 4, 1, {"kernel_size": 3, "padding": "same", "padding_mode": "circular"}),  # depthwise
    (3, 4, 8, 4, 2, {"kernel_size": 3, "padding": 1, "stride": 2, "padding_mode": "replicate"}),  # ×2
    (2, 4, 8, 4, 2, {"kernel_size": 3, "padding": 1, "stride": 2, "padding_mode": "reflect"}),
    (1, 6, 6, 6, 1, {"kernel_size": 2, "padding": "same"}),  # depthwise, zeros after only
    (3, 2, 2, 2, 2, {"kernel_size": 2}),  # Conv3d depthwise, no padding
]


def _single_position(case):
    dims, c_in, c_out, groups, width, options = SINGLE_POSITION[case]
    model = nn.Sequential(_conv(dims, c_in, c_out, groups, **options))
    x = torch.randn(1, c_in, *(width,) * dims, generator=generator(case), dtype=DOUBLE)
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=generator(case + 10), dtype=DOUBLE)
    assert y[0, 0].numel() == 1
    return model, x, y


@pytest.mark.parametrize("build", ["kfac", "ekfac"])
@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("case", range(len(SINGLE_POSITION)))
def test_one_datum_one_position_is_the_ggn(case, bias, build):
    model, x, y = _single_position(case)
    builder = curvops.KFAC if build == "kfac" else curvops.EKFAC
    op = builder(model, nn.MSELoss(), [(x, y)], fisher_type="type-2", bias=bias)
    expected = _block_diagonal(Truth(model, nn.MSELoss(), x, y).ggn(), _groups(model, joint=bias == "joint"))
    torch.testing.assert_close(op.to_dense(), expected)
    weight = op.block("0" if bias == "joint" else "0.weight")
    inner = weight.op if isinstance(weight, curvops.Permuted) else weight
    kind = GroupedKronecker if build == "kfac" else GroupedKroneckerEigen
    assert type(inner) is kind  # one block per group, batched
    assert (inner.groups if build == "kfac" else inner.spectrum.shape[0]) == model[0].groups


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", [0, 3, 5])
def test_tkfac_delta_is_the_true_block_trace_of_every_group(case, kfac_approx):
    dims, c_in, c_out, groups, _, options = SINGLE_POSITION[case]
    conv = _conv(dims, c_in, c_out, groups, **{**options, "padding": 1})  # many positions
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(1))
    x = torch.randn(3, c_in, *(3,) * dims, generator=generator(0), dtype=DOUBLE)
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=generator(1), dtype=DOUBLE)
    tkfac = curvops.TKFAC(model, nn.MSELoss(), [(x[:2], y[:2]), (x[2:], y[2:])], fisher_type="type-2",
                          kfac_approx=kfac_approx)  # fmt: skip
    ggn = Truth(model, nn.MSELoss(), x, y).ggn().diagonal()
    weight_truth = ggn[: conv.weight.numel()].reshape(groups, -1).sum(1)
    bias_truth = ggn[conv.weight.numel() :].reshape(groups, -1).sum(1)
    for block, truth in [(tkfac.block("0.weight"), weight_truth), (tkfac.block("0.bias"), bias_truth)]:
        torch.testing.assert_close(block.to_dense().diagonal().reshape(groups, -1).sum(1), truth)
    phi = tkfac.block("0.weight").factors[1]  # Φ_j, normalised per group
    torch.testing.assert_close(phi.diagonal(dim1=1, dim2=2).sum(1), torch.ones(groups, dtype=DOUBLE))


TWINS = [  # (dims, C_in, C_out, groups, options) with many positions
    (1, 4, 4, 4, {"kernel_size": 3, "padding": "same", "padding_mode": "reflect"}),  # depthwise
    (2, 4, 8, 2, {"kernel_size": 2, "padding": 1, "padding_mode": "circular"}),
    (2, 3, 6, 3, {"kernel_size": 3, "padding": 1}),  # depthwise ×2 (stride 2 would leave A singular)
    (3, 4, 4, 2, {"kernel_size": 2, "padding": "same", "padding_mode": "replicate"}),
]


class Net(nn.Module):
    """A convolution, tanh, and a linear head to 3 classes."""

    def __init__(self, conv, positions):
        super().__init__()
        self.conv, self.head = conv, nn.Linear(conv.out_channels * positions, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def _twins(case):
    """The grouped net, its split twin (same head), the twin's parameters in the grouped net's
    flat order, and data of several batches."""
    dims, c_in, c_out, groups, options = TWINS[case]
    conv = _conv(dims, c_in, c_out, groups, **options)
    x = torch.randn(24, c_in, *(4, 3, 3)[:dims], generator=generator(case), dtype=DOUBLE)
    with torch.no_grad():
        positions = conv(x)[0, 0].numel()
    model = Net(conv, positions).double()
    twin = Net(SplitConv(conv), positions).double()
    twin.head.load_state_dict(model.head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
    y = torch.randint(0, 3, (24,), generator=generator(case + 1))
    params = [*twin.conv.flat_params(), *twin.head.parameters()]
    return model, twin, params, [(x[:16], y[:16]), (x[16:], y[16:])]  # A full rank also for "reduce"


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("name", ["kfac", "ekfac", "tkfac", "tekfac"])
@pytest.mark.parametrize("case", range(len(TWINS)))
def test_many_data_and_positions_match_the_split_convolutions(case, name, bias, kfac_approx):
    model, twin, params, data = _twins(case)
    options = {"fisher_type": "type-2", "bias": bias, "kfac_approx": kfac_approx}
    grouped = curvops.nn.kfac.kronecker_approximation(name, model, nn.CrossEntropyLoss(), data, **options)
    split = curvops.nn.kfac.kronecker_approximation(
        name, twin, nn.CrossEntropyLoss(), data, params=params, **options
    )
    torch.testing.assert_close(grouped.to_dense(), split.to_dense())
    torch.testing.assert_close(grouped.logdet(1e-3), split.logdet(1e-3))
    v = torch.randn(grouped.shape[0], generator=generator(5), dtype=DOUBLE)
    torch.testing.assert_close(grouped.inverse(1e-3) @ v, split.inverse(1e-3) @ v)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "forward-only"])
def test_other_fisher_types_match_the_split_convolutions(fisher_type):
    model, twin, params, data = _twins(2)
    grouped = curvops.KFAC(model, nn.CrossEntropyLoss(), data, fisher_type=fisher_type, mc_samples=2)
    options = {"fisher_type": fisher_type, "mc_samples": 2}
    split = curvops.KFAC(twin, nn.CrossEntropyLoss(), data, params=params, **options)
    torch.testing.assert_close(grouped.to_dense(), split.to_dense())
    if fisher_type == "forward-only":  # G = I in every group
        output_factors = grouped.block("conv.weight").factors[0]
        torch.testing.assert_close(output_factors, torch.eye(2, dtype=DOUBLE).expand(3, 2, 2))


def test_the_operator_round_trips_through_its_state_dict():
    model, _, _, data = _twins(0)
    op = curvops.EKFAC(model, nn.CrossEntropyLoss(), data, fisher_type="type-2")
    loaded = curvops.from_state_dict(op.state_dict())
    torch.testing.assert_close(loaded.to_dense(), op.to_dense())


def _optimizer(model, curvature, factored):
    loss_fn = nn.CrossEntropyLoss()
    opt = KFACOptimizer(model, loss_fn, curvature=curvature, factored=factored, fisher_type="type-2",
                        lr=0.1, damping=1e-2, T_inv=2)  # fmt: skip
    return opt, loss_fn


def _train(model, opt, loss_fn, steps, data):
    for step in range(steps):
        x, y = data[step % len(data)]
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


def _grouped_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _twin_params(twin):
    return torch.cat([p.detach().flatten() for p in [*twin.conv.flat_params(), *twin.head.parameters()]])


@pytest.mark.parametrize(
    ("curvature", "factored"),
    [("kfac", False), ("kfac", True), ("ekfac", False), ("tkfac", False), ("tkfac", True), ("tekfac", False)],
)
def test_the_optimizer_trains_a_depthwise_convolution_as_its_split_twin(curvature, factored):
    model, twin, _, data = _twins(0)  # depthwise
    initial = _grouped_params(model)
    opt, loss_fn = _optimizer(model, curvature, factored)
    _train(model, opt, loss_fn, 5, data)
    _train(twin, *_optimizer(twin, curvature, factored), 5, data)
    assert not torch.allclose(_grouped_params(model), initial)
    torch.testing.assert_close(_grouped_params(model), _twin_params(twin))
    state = copy.deepcopy(opt.state_dict())  # resume: the same steps as without the round trip
    resumed_model = copy.deepcopy(model)
    resumed, resumed_loss = _optimizer(resumed_model, curvature, factored)
    resumed.load_state_dict(state)
    _train(model, opt, loss_fn, 3, data)
    _train(resumed_model, resumed, resumed_loss, 3, data)
    torch.testing.assert_close(_grouped_params(resumed_model), _grouped_params(model), rtol=0, atol=0)


def test_a_group_without_curvature_names_the_group():
    conv = nn.Conv1d(4, 4, 1, groups=2, bias=False).double()
    x = torch.randn(3, 4, 2, dtype=DOUBLE)
    x[:, 2:] = 0.0  # group 1 sees only zeros: its block's trace δ_1 is 0
    data = [(x, torch.randn(3, 4, 2, dtype=DOUBLE))]
    with pytest.raises(ValueError, match=r"'' has δ = 0.0 in group 1 .*TKFAC needs δ > 0"):
        curvops.TKFAC(conv, nn.MSELoss(), data, fisher_type="type-2")
    kfac = curvops.KFAC(conv, nn.MSELoss(), data, fisher_type="type-2")
    with pytest.raises(curvops.SingularOperatorError, match="factor 1 of group 1 has trace 0"):
        kfac.inverse(1e-3, factored=True)


def test_an_ungrouped_state_dict_is_refused_by_a_grouped_optimizer():
    model, _, _, data = _twins(1)
    opt, loss_fn = _optimizer(model, "ekfac", False)
    _train(model, opt, loss_fn, 1, data)
    plain = copy.deepcopy(model)
    plain.conv = nn.Conv2d(4, 8, 2, padding=1, padding_mode="circular").double()  # groups=1
    other, other_loss = _optimizer(plain, "ekfac", False)
    _train(plain, other, other_loss, 1, data)
    key = r"\['statistics'\]\['conv'\]\['input_factor'\] is a tensor of shape \[16, 16\]; .* \[2, 8, 8\]"
    with pytest.raises(curvops.StateDictError, match=key):
        opt.load_state_dict(other.state_dict())


def test_rule_shapes_and_coverage():
    depthwise = nn.Conv2d(3, 6, 3, groups=3)
    x = torch.randn(2, 3, 4, 4)
    features = ConvRule().features(depthwise, x)
    assert features.shape == (2, 4, 3, 9) and ConvRule().sizes(depthwise) == (2, 9)
    weights = depthwise.weight.reshape(3, 2, 9)  # [g, C_out/g, C_in/g · k]
    outputs = torch.einsum("nsgi,goi->nsgo", features, weights).flatten(2) + depthwise.bias
    torch.testing.assert_close(outputs, depthwise(x).flatten(2).transpose(1, 2))
    report = curvops.nn.coverage(nn.Sequential(depthwise))
    assert [(row.block, row.groups) for row in report] == [("kronecker", 3)] * 2
    assert "kronecker ×3" in report.table()


def _grouped_factors(groups=3, sizes=(2, 3), seed=0):
    """Random PSD factors ``[g, n_i, n_i]`` (one of them singular in group 0)."""
    factors = []
    for i, n in enumerate(sizes):
        b = torch.randn(groups, n, n, generator=generator(seed + i), dtype=DOUBLE)
        factors.append(b @ b.mT + 0.1 * torch.eye(n, dtype=DOUBLE))
    return factors


def _dense_groups(factors):
    """The block-diagonal of every group's Kronecker product, by explicit indexing."""
    return torch.block_diag(*(kron(*(f[j] for f in factors)) for j in range(len(factors[0]))))


def test_grouped_kronecker_is_the_block_diagonal_of_the_groups_kronecker_products():
    factors = _grouped_factors()
    op, dense = GroupedKronecker(*factors), _dense_groups(factors)
    eye = torch.eye(len(dense), dtype=DOUBLE)
    v = torch.randn(len(dense), 2, generator=generator(9), dtype=DOUBLE)
    torch.testing.assert_close(op.to_dense(), dense)
    torch.testing.assert_close(op @ v, dense @ v)
    torch.testing.assert_close(op.diagonal(), dense.diagonal())
    torch.testing.assert_close(op.trace(), dense.trace())
    torch.testing.assert_close(op.logdet(0.1), torch.linalg.slogdet(dense + 0.1 * eye)[1])
    torch.testing.assert_close(op.inverse(0.1).to_dense(), torch.linalg.inv(dense + 0.1 * eye))
    root = op.power(0.5).to_dense()
    torch.testing.assert_close(root @ root, dense)
    torch.testing.assert_close(op.eigenvalues(), torch.linalg.eigvalsh(dense))
    torch.testing.assert_close(op.eigen().to_dense(), dense)
    loaded = curvops.from_state_dict(op.state_dict())
    assert type(loaded) is GroupedKronecker and torch.equal(loaded.to_dense(), op.to_dense())


def test_grouped_factored_inverse_damps_every_group_by_its_own_pi():
    g, a = _grouped_factors()
    op, damping = GroupedKronecker(g, a), 0.2
    blocks = []
    for j in range(3):  # Martens & Grosse: π² = (tr G / n_G) / (tr A / n_A), per group
        pi = ((g[j].trace() / 2) / (a[j].trace() / 3)).sqrt()
        damped_g = g[j] + pi * damping**0.5 * torch.eye(2, dtype=DOUBLE)
        damped_a = a[j] + damping**0.5 / pi * torch.eye(3, dtype=DOUBLE)
        blocks.append(kron(torch.linalg.inv(damped_g), torch.linalg.inv(damped_a)))
    torch.testing.assert_close(op.inverse(damping, factored=True).to_dense(), torch.block_diag(*blocks))
    traces = op.pi_dampings(damping, balance="trace")  # TKFAC's: each factor's trace
    scale = (g.diagonal(dim1=1, dim2=2).sum(1) / a.diagonal(dim1=1, dim2=2).sum(1)).sqrt()
    torch.testing.assert_close(traces, damping**0.5 * torch.stack([scale, 1 / scale], dim=1))


def test_grouped_kronecker_eigen_is_the_block_diagonal_of_its_groups():
    factors = _grouped_factors(groups=2)
    q = [torch.linalg.eigh(f)[1] for f in factors]
    s = torch.rand(2, 2, 3, generator=generator(3), dtype=DOUBLE) + 0.1
    op = GroupedKroneckerEigen(q, s)
    blocks = []
    for j in range(2):
        basis = kron(q[0][j], q[1][j])
        blocks.append(basis @ torch.diag(s[j].flatten()) @ basis.T)
    dense, eye = torch.block_diag(*blocks), torch.eye(12, dtype=DOUBLE)
    v = torch.randn(12, generator=generator(4), dtype=DOUBLE)
    torch.testing.assert_close(op.to_dense(), dense)
    torch.testing.assert_close(op @ v, dense @ v)
    torch.testing.assert_close(op.diagonal(), dense.diagonal())
    torch.testing.assert_close(op.logdet(0.5), torch.linalg.slogdet(dense + 0.5 * eye)[1])
    torch.testing.assert_close(op.inverse(0.5).to_dense(), torch.linalg.inv(dense + 0.5 * eye))
    loaded = curvops.from_state_dict(op.state_dict())
    assert type(loaded) is GroupedKroneckerEigen and torch.equal(loaded.to_dense(), op.to_dense())


def test_grouped_operators_refuse_bad_factors():
    g, a = _grouped_factors()
    with pytest.raises(ValueError, match=r"factor 0 must be a \[g, n, n\] tensor .* got \[2, 2\]"):
        GroupedKronecker(g[0], a)
    with pytest.raises(ValueError, match=r"one number of groups, got \[2, 3\]"):
        GroupedKronecker(g[:2], a)
    with pytest.raises(ValueError, match="factor 1 is not symmetric"):
        GroupedKronecker(g, a + torch.triu(torch.ones(3, 3, dtype=DOUBLE), 1))
    with pytest.raises(ValueError, match="eigenvectors 0 is not orthonormal"):
        GroupedKroneckerEigen([g], torch.ones(3, 2, dtype=DOUBLE))
    with pytest.raises(ValueError, match=r"eigenvalues must have shape \[3, 2\]"):
        GroupedKroneckerEigen([torch.eye(2, dtype=DOUBLE).expand(3, 2, 2)], torch.ones(3, 3, dtype=DOUBLE))
    with pytest.raises(ValueError, match=r"\[groups, factors\] = \[3, 2\] dampings"):
        GroupedKronecker(g, a).factor_inverse(torch.ones(3))
