"""Convolutions of every dimension (1-, 2-, 3-D) and padding mode: the unfolded patches give the
module's forward, and KFAC / EKFAC / TKFAC / the optimizer agree with the dense GGN (float64)."""

import copy

import pytest
import torch
from helpers import DOUBLE, generator, kron
from model_truth import Truth
from test_kfac import _block_diagonal, _groups
from torch import nn
from torch.func import jacrev

import curvops
from curvops.nn.layers import ConvRule
from curvops.optim import KFACOptimizer

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MODES = ["zeros", "reflect", "replicate", "circular"]


def _per_axis(values, dims):
    """The first ``dims`` entries of a per-axis tuple, or an int as it is."""
    return values[:dims] if isinstance(values, tuple) else values


FORWARD_CASES = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "padding": 2, "stride": 2, "dilation": 2},
    {"kernel_size": (3, 2, 3), "padding": (2, 1, 0), "stride": (1, 2, 1), "dilation": (2, 1, 1)},
    {"kernel_size": 3, "padding": "same"},
    {"kernel_size": 4, "padding": "same"},  # asymmetric: 1 before, 2 after
    {"kernel_size": (2, 3, 4), "padding": "same", "dilation": (3, 1, 1)},  # asymmetric on axes 1, 3
    {"kernel_size": 3, "padding": "valid", "stride": 2},
]


def _conv(dims, in_channels=2, out_channels=3, **kwargs):
    options = {key: _per_axis(value, dims) for key, value in kwargs.items()}
    return CONVS[dims](in_channels, out_channels, **options).double()


def _positions_last(maps):
    """``[N, C, *spatial]`` as ``[N, S, C]``."""
    return maps.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("case", range(len(FORWARD_CASES)))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_patches_reproduce_the_forward(dims, mode, case):
    torch.manual_seed(case)
    conv = _conv(dims, padding_mode=mode, **FORWARD_CASES[case])
    x = torch.randn(2, 2, *(5, 6, 4)[:dims], generator=generator(0), dtype=DOUBLE)
    patches = ConvRule().features(conv, x)
    linear = patches @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias
    with torch.no_grad():
        torch.testing.assert_close(linear, _positions_last(conv(x)))


SINGLE_POSITION = [  # (input width, module options): one output position
    (2, {"kernel_size": 3, "padding": 1, "stride": 2}),  # sees padded values on both sides
    (1, {"kernel_size": 3, "padding": "same"}),
    (1, {"kernel_size": 2, "padding": "same"}),  # asymmetric: padded after only
    (3, {"kernel_size": 3, "padding": "valid"}),
]


@pytest.mark.parametrize("build", ["kfac", "ekfac"])
@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize(
    ("mode", "case"),
    [(mode, case) for mode in MODES for case, (width, _) in enumerate(SINGLE_POSITION)
     if mode != "reflect" or width > 1],  # reflect padding needs an input wider than the padding
)  # fmt: skip
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_one_datum_one_position_is_the_ggn(dims, mode, case, bias, build):
    width, options = SINGLE_POSITION[case]
    torch.manual_seed(case)
    model = nn.Sequential(_conv(dims, padding_mode=mode, **options))  # a named layer: "0"
    x = torch.randn(1, 2, *(width,) * dims, generator=generator(0), dtype=DOUBLE)
    assert_one_position_is_the_ggn(model, x, bias, build)


def assert_one_position_is_the_ggn(model, x, bias, build):
    """KFAC or EKFAC of a one-convolution ``model`` on one datum ``x`` with one output position:
    the dense GGN's block diagonal (float64, MSE)."""
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=generator(1), dtype=DOUBLE)
    assert y[0, 0].numel() == 1
    builder = curvops.KFAC if build == "kfac" else curvops.EKFAC
    op = builder(model, nn.MSELoss(), [(x, y)], fisher_type="type-2", bias=bias)
    expected = _block_diagonal(Truth(model, nn.MSELoss(), x, y).ggn(), _groups(model, joint=bias == "joint"))
    torch.testing.assert_close(op.to_dense(), expected)


class ConvHead(nn.Module):
    """A convolution with many output positions, then tanh and a linear head (KFAC is not exact)."""

    def __init__(self, conv, positions):
        super().__init__()
        self.conv, self.head = conv, nn.Linear(conv.out_channels * positions, 2)

    def rest(self, maps):
        return self.head(torch.tanh(maps).flatten(1))

    def forward(self, x):
        return self.rest(self.conv(x))


MULTI_POSITION = [
    (1, "reflect", {"kernel_size": 3, "padding": 2, "dilation": 2}),
    (1, "zeros", {"kernel_size": 4, "padding": "same"}),
    (2, "circular", {"kernel_size": (2, 3), "padding": "same"}),
    (2, "replicate", {"kernel_size": 3, "padding": (1, 2), "stride": (2, 1)}),
    (3, "zeros", {"kernel_size": 2, "padding": "same"}),
    (3, "reflect", {"kernel_size": (3, 2, 2), "padding": 1, "stride": (2, 1, 1)}),
    (3, "circular", {"kernel_size": 2, "padding": 1, "dilation": (1, 2, 1)}),
]


def _multi_position_case(index):
    dims, mode, options = MULTI_POSITION[index]
    torch.manual_seed(index)
    conv = _conv(dims, padding_mode=mode, **options)
    x = torch.randn(3, 2, *(4, 5, 3)[:dims], generator=generator(0), dtype=DOUBLE)
    with torch.no_grad():
        positions = conv(x)[0, 0].numel()
    model = ConvHead(conv, positions).double()
    y = torch.randn(3, 2, generator=generator(1), dtype=DOUBLE)
    return model, x, y


def _output_gradients(model, x):
    """``[N, S, C_out, O]``: ``√2 ∂f_no / ∂y_ns``, the MSE's type-2 columns backpropagated to the
    convolution outputs ``y`` (``Σ (f - y)²`` has Hessian ``2 I``), by autograd per datum."""
    maps = model.conv(x).detach()
    rows = [jacrev(lambda m: model.rest(m[None])[0])(maps[n]) for n in range(len(x))]  # [O, C, *spatial]
    return torch.stack([2**0.5 * _positions_last(row).permute(1, 2, 0) for row in rows])


@pytest.mark.parametrize("case", range(len(MULTI_POSITION)))
def test_many_positions_expand_is_g_kron_a_and_tkfac_keeps_the_trace(case):
    model, x, y = _multi_position_case(case)
    loss_fn, conv = nn.MSELoss(), model.conv
    patches = ConvRule().features(conv, x)  # reproduces the forward (test above)
    gradients = _output_gradients(model, x)
    data, positions = patches.shape[:2]
    inputs = patches.reshape(-1, patches.shape[-1])
    outputs = gradients.permute(0, 1, 3, 2).reshape(-1, conv.out_channels)
    a = inputs.T @ inputs / (data * positions)
    g = outputs.T @ outputs / y.numel()  # Z: the mean over all N · O elements
    kfac = curvops.KFAC(model, loss_fn, [(x, y)], params=[conv.weight], fisher_type="type-2")
    torch.testing.assert_close(kfac.to_dense(), kron(g, a))

    conv_params = list(conv.parameters())
    size = sum(p.numel() for p in conv_params)
    tkfac = curvops.TKFAC(model, loss_fn, [(x[:2], y[:2]), (x[2:], y[2:])], params=conv_params,
                          fisher_type="type-2")  # fmt: skip
    ggn = Truth(model, loss_fn, x, y).ggn()[:size, :size]
    torch.testing.assert_close(tkfac.to_dense().trace(), ggn.trace())


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_optimizer_steps_on_conv3d_and_matches_the_builder(curvature):
    torch.manual_seed(0)
    conv = nn.Conv3d(1, 2, 2, padding=1, padding_mode="replicate")
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4**3, 3)).double()
    g = generator(0)
    data = [(torch.randn(8, 1, 3, 3, 3, generator=g, dtype=DOUBLE), torch.randint(0, 3, (8,), generator=g))]
    loss_fn = nn.CrossEntropyLoss()
    builder = curvops.KFAC if curvature == "kfac" else curvops.EKFAC
    expected = builder(copy.deepcopy(model), loss_fn, data, fisher_type="type-2")
    opt = KFACOptimizer(model, loss_fn, curvature=curvature, fisher_type="type-2", ema_decay=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    x, target = data[0]
    opt.zero_grad()
    loss_fn(model(x), target).backward()
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    actual = opt.curvature_operator().to_dense()
    torch.testing.assert_close(actual, expected.to_dense(), rtol=1e-9, atol=1e-12)
