"""A stride-1, zero-padded convolution's ``expand`` input factor from its input's autocorrelations
(``curvops.nn.layers.patches.patch_moment``, ``ConvRule.autocorrelation``): the patches' products
for every dimension, kernel, dilation, padding, group count and joint bias; KFAC and EKFAC exact
on one datum and one output position; and on real pipelines the same operators as the patches."""

import copy
import itertools

import pytest
import torch
from helpers import DOUBLE, generator, kron
from test_conv_rules import ConvHead, _output_gradients, assert_one_position_is_the_ggn
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import curvops
from curvops.nn.kfac import kronecker_approximation
from curvops.nn.layers import ConvRule
from curvops.nn.layers import conv as conv_module
from curvops.nn.layers.patches import autocorrelation_applies, im2col, patch_moment

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
IGNORE = -100
WINDOWS = [  # (kernel, dilation, paddings per axis as (before, after)), on inputs 7 x 6 x 5
    ((3, 3, 3), (1, 1, 1), "same"),
    ((2, 4, 1), (1, 1, 1), "same"),  # asymmetric "same": the extra element after
    ((3, 2, 3), (2, 1, 2), "same"),
    ((3, 3, 2), (1, 1, 1), 0),  # "valid": every position a full window
    ((3, 3, 3), (1, 2, 1), 3),  # more padding than the kernel's reach: windows of padding only
    ((2, 3, 3), (1, 1, 1), (2, 0)),  # padded before only
    ((1, 1, 1), (1, 1, 1), 0),  # a pointwise convolution
]


def _paddings(kernel, dilation, padding, dims):
    reach = [d * (k - 1) for k, d in zip(kernel[:dims], dilation[:dims], strict=True)]
    if padding == "same":
        return [(r // 2, r - r // 2) for r in reach]
    return [padding if isinstance(padding, tuple) else (padding, padding)] * dims


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("case", range(len(WINDOWS)))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_the_moment_is_the_patches_products(dims, case, groups, joint):
    """Against ``Σ a a^T`` of the unfolded patches, float64: per group, and with a joint bias's
    trailing weight that is zero for a masked datum (its inputs zeroed alike)."""
    kernel, dilation, padding = WINDOWS[case]
    kernel, dilation = kernel[:dims], dilation[:dims]
    paddings = _paddings(kernel, dilation, padding, dims)
    x = torch.randn(3, 4, *(7, 6, 5)[:dims], generator=generator(case), dtype=DOUBLE)
    ones = torch.tensor([1.0, 0.0, 1.0], dtype=DOUBLE) if joint else None
    if joint:
        x = x * ones.reshape(-1, *[1] * (dims + 1))
    padded = F.pad(x, [width for pair in reversed(paddings) for width in pair])
    patches = im2col(padded, kernel, (1,) * dims, dilation).unflatten(-1, (groups, -1))
    if joint:
        patches = torch.cat([patches, ones.reshape(-1, 1, 1, 1).expand(*patches.shape[:-1], 1)], -1)
    expected = torch.einsum("nsgi,nsgj->gij", patches, patches)
    moment = patch_moment(x, kernel, dilation, paddings, groups, ones)
    torch.testing.assert_close(moment, expected if groups > 1 else expected[0], rtol=1e-12, atol=1e-12)


def test_it_is_chosen_where_cheaper():
    """Large images against the kernel take the autocorrelations, small ones the patches."""
    same = [(1, 1), (1, 1)]
    assert autocorrelation_applies((8, 16, 16, 16), (3, 3), (1, 1), same)
    assert not autocorrelation_applies((8, 16, 4, 4), (3, 3), (1, 1), same)
    assert not autocorrelation_applies((8, 16, 2), (5,), (1,), [(0, 0)])  # no output position


@pytest.fixture
def autocorrelated(monkeypatch):
    """Every convolution it applies to takes the autocorrelations, and each use is counted."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return patch_moment(*args, **kwargs)

    monkeypatch.setattr(ConvRule, "autocorrelation", True)
    monkeypatch.setattr(conv_module, "patch_moment", counted)
    return calls


SINGLE_POSITION = [  # (input width, module options): stride 1, one output position
    (1, {"kernel_size": 3, "padding": "same"}),
    (1, {"kernel_size": 2, "padding": "same"}),  # asymmetric: padded after only
    (3, {"kernel_size": 3, "padding": "valid"}),
    (2, {"kernel_size": 2, "padding": 1, "dilation": 3}),  # the dilated kernel's corners only
]


@pytest.mark.parametrize("build", ["kfac", "ekfac"])
@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("case", range(len(SINGLE_POSITION)))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_one_datum_one_position_is_the_ggn(autocorrelated, dims, case, bias, build):
    width, options = SINGLE_POSITION[case]
    torch.manual_seed(case)
    options = {key: value if isinstance(value, str) else (value,) * dims for key, value in options.items()}
    model = nn.Sequential(CONVS[dims](2, 3, **options).double())
    x = torch.randn(1, 2, *(width,) * dims, generator=generator(0), dtype=DOUBLE)
    assert_one_position_is_the_ggn(model, x, bias, build)
    assert autocorrelated


@pytest.mark.parametrize("options", [{"kernel_size": 3, "padding": 1}, {"kernel_size": 2, "padding": "same"}])
def test_many_positions_expand_is_g_kron_a(autocorrelated, options):
    """``G ⊗ A`` from the patches (which reproduce the forward) and autograd's output gradients."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, **options).double()
    x = torch.randn(3, 2, 6, 5, generator=generator(0), dtype=DOUBLE)
    model = ConvHead(conv, conv(x)[0, 0].numel()).double()
    y = torch.randn(3, 2, generator=generator(1), dtype=DOUBLE)
    patches = ConvRule().features(conv, x)
    inputs = patches.reshape(-1, patches.shape[-1])
    outputs = _output_gradients(model, x).permute(0, 1, 3, 2).reshape(-1, conv.out_channels)
    a = inputs.T @ inputs / inputs.shape[0]
    g = outputs.T @ outputs / y.numel()
    kfac = curvops.KFAC(model, nn.MSELoss(), [(x, y)], params=[conv.weight], fisher_type="type-2")
    torch.testing.assert_close(kfac.to_dense(), kron(g, a))
    assert autocorrelated


class Pipeline(nn.Module):
    """A same-padded conv applied twice (shared), a dilated grouped conv, a pointwise conv with
    per-pixel logits ``[N, 4, H, W]`` or, pooled, a head ``[N, 4]``."""

    def __init__(self, pixelwise=False):
        super().__init__()
        self.pixelwise = pixelwise
        self.shared = nn.Conv2d(3, 3, 3, padding=1)
        self.grouped = nn.Conv2d(3, 6, 3, padding=2, dilation=2, groups=3)
        self.pointwise = nn.Conv2d(6, 4, 1)
        self.head = None if pixelwise else nn.Linear(4, 4)

    def forward(self, x):
        x = torch.tanh(self.grouped(torch.tanh(self.shared(torch.tanh(self.shared(x))))))
        logits = self.pointwise(x)
        return logits if self.pixelwise else self.head(logits.mean(dim=(2, 3)))


def _loader(pixelwise, dtype=DOUBLE):
    """A shuffled loader of uneven batches (5, 5, 3): padding labels, one datum of only padding."""
    g = generator(2)
    x = torch.randn(13, 3, 6, 7, generator=g, dtype=DOUBLE).to(dtype)
    if pixelwise:
        y = torch.randint(0, 4, (13, 6, 7), generator=g)
        y[1, :3] = IGNORE
    else:
        y = torch.randint(0, 4, (13,), generator=g)
        y[:3] = IGNORE
    y[4] = IGNORE
    return DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, generator=generator(3))


BUILDERS = {
    "kfac type-2": lambda *a, **o: curvops.KFAC(*a, fisher_type="type-2", **o),
    "kfac mc": lambda *a, **o: curvops.KFAC(*a, fisher_type="mc", seed=4, **o),
    "ekfac empirical": lambda *a, **o: curvops.EKFAC(*a, fisher_type="empirical", **o),
}


@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("pixelwise", [False, True])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_real_pipeline_gets_the_patches_operator(monkeypatch, name, pixelwise, bias):
    """Shuffled uneven batches, ``ignore_index`` and class weights (not for ``"mc"``, which refuses
    them), a shared and a grouped dilated conv, train mode: the operator of the patches, and the
    model untouched. Per-pixel targets mask positions within a datum: that batch's layers keep
    the patches (and agree)."""
    torch.manual_seed(5)
    model = Pipeline(pixelwise).double().train()
    before = copy.deepcopy(model.state_dict())
    weight = None if "mc" in name else torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=DOUBLE)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE, weight=weight)
    build = BUILDERS[name]
    monkeypatch.setattr(ConvRule, "autocorrelation", False)
    patches = build(model, loss_fn, _loader(pixelwise), bias=bias).to_dense()
    calls = []
    monkeypatch.setattr(ConvRule, "autocorrelation", True)
    monkeypatch.setattr(conv_module, "patch_moment", lambda *a, **o: calls.append(1) or patch_moment(*a, **o))
    autocorrelated = build(model, loss_fn, _loader(pixelwise), bias=bias)
    torch.testing.assert_close(autocorrelated.to_dense(), patches, rtol=1e-10, atol=1e-13)
    # 3 batches, 4 calls of convolutions each; in datum 1's batch the grouped and pointwise convs,
    # whose positions are the targets', keep the patches (the shared conv's 2 calls mask whole data)
    assert len(calls) == (10 if pixelwise else 12)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_a_bf16_model_gets_the_float32_statistics_of_the_patches(monkeypatch):
    torch.manual_seed(5)
    model = Pipeline().to(torch.bfloat16)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    blocks = []
    for choice in (False, True):
        monkeypatch.setattr(ConvRule, "autocorrelation", choice)
        op = curvops.KFAC(model, loss_fn, _loader(False, torch.bfloat16), fisher_type="type-2")
        assert op.dtype == torch.bfloat16
        blocks.append([block.op.to_dense() for block in op.blocks])  # the float32 blocks in each Cast
    for patches, autocorrelated in zip(*blocks, strict=True):
        assert autocorrelated.dtype == torch.float32
        torch.testing.assert_close(autocorrelated, patches, rtol=1e-4, atol=1e-6)


def test_images_large_against_the_kernel_take_it_by_default(monkeypatch):
    """With ``autocorrelation=None`` a 3x3 conv on 16 x 16 images takes it, on 3 x 3 not."""
    shapes = []
    monkeypatch.setattr(
        conv_module, "patch_moment", lambda *a, **o: shapes.append(a[0].shape) or patch_moment(*a, **o)
    )
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1, stride=4), nn.Tanh(),
        nn.Conv2d(2, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 2),
    ).double()  # fmt: skip
    x, y = torch.randn(4, 2, 16, 16, dtype=DOUBLE), torch.randint(0, 2, (4,))
    dense = {}
    for choice in (None, False):
        monkeypatch.setattr(ConvRule, "autocorrelation", choice)
        dense[choice] = curvops.KFAC(model, nn.CrossEntropyLoss(), [(x, y)], fisher_type="type-2").to_dense()
    assert shapes == [torch.Size([4, 2, 16, 16])]  # not the strided conv, not the 3 x 3 maps
    torch.testing.assert_close(dense[None], dense[False])


@pytest.mark.parametrize(
    ("approx", "builder"), list(itertools.product(["reduce", "expand"], ["tkfac", "kfac"]))
)
def test_reduce_and_tkfac_keep_the_patches(autocorrelated, approx, builder):
    """``reduce`` averages the patches and TKFAC needs them per datum: neither takes the shortcut."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 25, 2)).double()
    data = [(torch.randn(3, 2, 5, 5, dtype=DOUBLE), torch.randint(0, 2, (3,)))]
    kronecker_approximation(builder, model, nn.CrossEntropyLoss(), data, kfac_approx=approx)
    assert bool(autocorrelated) == (approx == "expand" and builder == "kfac")


@pytest.mark.parametrize("dtype", [torch.float32, DOUBLE])
def test_on_every_device_it_is_the_patches_operator(monkeypatch, device, dtype):
    """The same operator on the CPU and the GPU, in float32 and float64."""
    torch.manual_seed(5)
    model = Pipeline().to(device, dtype)
    data = [(x.to(device, dtype), y.to(device)) for x, y in _loader(False)]
    dense = []
    for choice in (False, True):
        monkeypatch.setattr(ConvRule, "autocorrelation", choice)
        dense.append(curvops.KFAC(model, nn.CrossEntropyLoss(ignore_index=IGNORE), data).to_dense())
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-13}
    assert dense[1].device.type == device.type
    torch.testing.assert_close(dense[1], dense[0], **tolerance)
