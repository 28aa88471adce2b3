"""KFAC against the block-diagonal of the exact GGN / empirical Fisher where theory says it is exact."""

import math

import pytest
import torch
from helpers import DOUBLE, dense_inverse, dense_logdet, generator
from model_truth import Truth
from torch import nn

import curvops


def _block_diagonal(matrix, groups):
    """Keep only the entries whose row and column fall in the same group of flat indices."""
    label = torch.full((matrix.shape[0],), -1)
    for i, group in enumerate(groups):
        label[group] = i
    assert bool((label >= 0).all())
    return matrix * (label[:, None] == label[None, :])


def _groups(model, joint=False):
    """Flat index groups: one per parameter, or weight and bias together per layer if joint."""
    groups, start, by_module = [], 0, {}
    for name, p in model.named_parameters():
        indices = torch.arange(start, start + p.numel())
        start += p.numel()
        module = name.rsplit(".", 1)[0]
        if joint and module in by_module:
            groups[by_module[module]] = torch.cat([groups[by_module[module]], indices])
        else:
            by_module[module] = len(groups)
            groups.append(indices)
    return groups


def _batches(x, y, sizes):
    return list(zip(x.split(sizes), y.split(sizes), strict=True))


def _deep_linear(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 3, bias=bias), nn.Linear(3, 3, bias=bias), nn.Linear(3, 2, bias=bias)
    ).double()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", ["separate", "joint"])
def test_exact_on_deep_linear_networks_with_mse(reduction, bias):
    model = _deep_linear()
    x = torch.randn(9, 4, generator=generator(0), dtype=DOUBLE)
    y = torch.randn(9, 2, generator=generator(1), dtype=DOUBLE)
    loss_fn = nn.MSELoss(reduction=reduction)
    kfac = curvops.KFAC(model, loss_fn, _batches(x, y, [4, 2, 3]), fisher_type="type-2", bias=bias)
    expected = _block_diagonal(Truth(model, loss_fn, x, y).ggn(), _groups(model, joint=bias == "joint"))
    torch.testing.assert_close(kfac.to_dense(), expected)
    v = torch.randn(kfac.shape[0], 3, generator=generator(2), dtype=DOUBLE)
    torch.testing.assert_close(kfac @ v, expected @ v)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize(
    "loss_fn", [nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss(), nn.MSELoss(reduction="sum")]
)
def test_exact_with_one_datum(loss_fn):
    model = _mlp()
    x = torch.randn(1, 4, generator=generator(0), dtype=DOUBLE)
    y = torch.tensor([2]) if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.rand(1, 3, dtype=DOUBLE)
    truth = Truth(model, loss_fn, x, y)
    for bias in ("separate", "joint"):
        groups = _groups(model, joint=bias == "joint")
        kfac = curvops.KFAC(model, loss_fn, [(x, y)], fisher_type="type-2", bias=bias)
        torch.testing.assert_close(kfac.to_dense(), _block_diagonal(truth.ggn(), groups))
        empirical = curvops.KFAC(model, loss_fn, [(x, y)], fisher_type="empirical", bias=bias)
        torch.testing.assert_close(empirical.to_dense(), _block_diagonal(truth.empirical_fisher(), groups))


class Tokens(nn.Module):
    """Linear layers on [N, S, F] inputs: 'expand' keeps positions apart, 'reduce' pools them."""

    def __init__(self, pool):
        super().__init__()
        self.first, self.second, self.pool = nn.Linear(4, 3), nn.Linear(3, 2), pool

    def forward(self, x):
        hidden = self.first(x)
        return self.second(hidden.mean(dim=1) if self.pool else hidden)


class ConvNet(nn.Module):
    def __init__(self, pool, one_d=False):
        super().__init__()
        conv = nn.Conv1d if one_d else nn.Conv2d
        self.conv = conv(2, 3, 3, stride=2, padding=1, dilation=1)
        self.pool, self.linear = pool, nn.Linear(3, 2)

    def forward(self, x):
        maps = self.conv(x)
        if self.pool:
            return self.linear(maps.flatten(2).mean(dim=2))
        return maps


@pytest.mark.parametrize("one_d", [False, True])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_convolutions_are_exact_in_their_setting(approx, one_d):
    torch.manual_seed(0)
    model = ConvNet(pool=approx == "reduce", one_d=one_d).double()
    shape = (5, 2, 7) if one_d else (5, 2, 5, 6)
    x = torch.randn(shape, generator=generator(0), dtype=DOUBLE)
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=generator(1), dtype=DOUBLE)
    loss_fn = nn.MSELoss()
    params = list(model.conv.parameters()) + (list(model.linear.parameters()) if approx == "reduce" else [])
    kfac = curvops.KFAC(model, loss_fn, _batches(x, y, [3, 2]), params=params, fisher_type="type-2",
                        kfac_approx=approx, bias="joint")  # fmt: skip
    truth = Truth(model, loss_fn, x, y).ggn()
    size = sum(p.numel() for p in params)
    conv_size = sum(p.numel() for p in model.conv.parameters())
    groups = [torch.arange(conv_size)] + ([torch.arange(conv_size, size)] if approx == "reduce" else [])
    expected = _block_diagonal(truth[:size, :size], groups)
    torch.testing.assert_close(kfac.to_dense(), expected)


@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
def test_mc_converges_to_type_2(loss_name):
    model = _mlp()
    x = torch.randn(12, 4, generator=generator(0), dtype=DOUBLE)
    loss_fn = {"ce": nn.CrossEntropyLoss(), "mse": nn.MSELoss(), "bce": nn.BCEWithLogitsLoss()}[loss_name]
    y = torch.randint(0, 3, (12,)) if loss_name == "ce" else torch.rand(12, 3, dtype=DOUBLE)
    data = _batches(x, y, [5, 7])
    exact = curvops.KFAC(model, loss_fn, data, fisher_type="type-2").to_dense()

    def error(samples):
        mc = curvops.KFAC(model, loss_fn, data, fisher_type="mc", mc_samples=samples, seed=1).to_dense()
        return ((mc - exact).norm() / exact.norm()).item()

    few, many = error(4), error(4000)
    assert many < few / 5 and many < 0.05


def test_forward_only_has_identity_output_factors():
    model = _mlp()
    x = torch.randn(5, 4, generator=generator(0), dtype=DOUBLE)
    kfac = curvops.KFAC(
        model, nn.L1Loss(), [(x, torch.zeros(5, 3, dtype=DOUBLE))], fisher_type="forward-only"
    )
    first = kfac.blocks[0]
    torch.testing.assert_close(first.factors[0], torch.eye(5, dtype=DOUBLE))
    torch.testing.assert_close(first.factors[1], x.T @ x / 5)


def test_damped_inverse_logdet_and_singular_factor():
    model = _mlp()
    x = torch.randn(7, 4, generator=generator(0), dtype=DOUBLE)
    y = torch.randint(0, 3, (7,))
    kfac = curvops.KFAC(model, nn.CrossEntropyLoss(), [(x, y)], fisher_type="type-2")
    dense = kfac.to_dense()
    torch.testing.assert_close(kfac.inverse(1e-2).to_dense(), dense_inverse(dense, 1e-2))
    torch.testing.assert_close(kfac.logdet(1e-2), dense_logdet(dense, 1e-2))
    torch.testing.assert_close(kfac.det(1.0), torch.linalg.det(dense + torch.eye(len(dense), dtype=DOUBLE)))
    with pytest.warns(curvops.SingularOperatorWarning):
        value = kfac.logdet()
    assert value == -math.inf and not torch.isnan(value)
    factored = kfac.inverse(1e-2, factored=True)
    assert not torch.allclose(factored.to_dense(), dense_inverse(dense, 1e-2))


def test_state_dict_round_trip_and_size_mismatch(tmp_path):
    model = _mlp()
    x = torch.randn(7, 4, generator=generator(0), dtype=DOUBLE)
    data = [(x, torch.randint(0, 3, (7,)))]
    kfac = curvops.KFAC(model, nn.CrossEntropyLoss(), data, bias="joint")
    torch.save(kfac.state_dict(), tmp_path / "kfac.pt")
    state = torch.load(tmp_path / "kfac.pt", weights_only=True)
    v = torch.randn(kfac.shape[0], 2, dtype=DOUBLE)
    torch.testing.assert_close(curvops.from_state_dict(state) @ v, kfac @ v)
    again = curvops.KFAC(model, nn.CrossEntropyLoss(), data, bias="joint", seed=5)
    again.load_state_dict(state)
    torch.testing.assert_close(again @ v, kfac @ v)
    wider = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    other = curvops.KFAC(wider, nn.CrossEntropyLoss(), data, bias="joint")
    with pytest.raises(curvops.StateDictError, match=r"children\['0'\].*shape"):
        other.load_state_dict(state)


def test_parameter_subsets():
    model = _mlp()
    x = torch.randn(6, 4, generator=generator(0), dtype=DOUBLE)
    y = torch.randint(0, 3, (6,))
    params = [model[2].bias, model[0].weight]
    kfac = curvops.KFAC(model, nn.CrossEntropyLoss(), [(x, y)], params=params, fisher_type="type-2")
    full = curvops.KFAC(model, nn.CrossEntropyLoss(), [(x, y)], fisher_type="type-2").to_dense()
    index = torch.cat([torch.arange(40, 43), torch.arange(0, 20)])
    torch.testing.assert_close(kfac.to_dense(), full[index][:, index])


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.norm, self.out = nn.Linear(4, 3), nn.PReLU(3), nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.norm(self.linear(x)))


def test_unsupported_layers_error_or_get_an_exact_block():
    torch.manual_seed(0)
    model = Normed().double()
    x = torch.randn(6, 4, generator=generator(0), dtype=DOUBLE)
    y = torch.randint(0, 2, (6,))
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"'norm' \(PReLU\).*unsupported='dense'"):
        curvops.KFAC(model, loss_fn, [(x, y)], fisher_type="type-2")
    norm_params = list(model.norm.parameters())
    exact = curvops.GGN(model, loss_fn, [(x, y)], params=norm_params).to_dense()
    dense = curvops.KFAC(model, loss_fn, [(x, y)], fisher_type="type-2", unsupported="dense").to_dense()
    torch.testing.assert_close(dense[15:18, 15:18], exact)
    diagonal = curvops.KFAC(model, loss_fn, [(x, y)], fisher_type="type-2", unsupported="diagonal").to_dense()
    torch.testing.assert_close(diagonal[15:18, 15:18], torch.diag(exact.diagonal()))
    only_norm = curvops.KFAC(
        model, loss_fn, [(x, y)], params=norm_params, fisher_type="type-2", unsupported="dense"
    )
    assert only_norm.labels == ("norm",)
    torch.testing.assert_close(only_norm.to_dense(), exact)


def test_weight_tying_is_refused():
    data = [(torch.randn(4, 3, dtype=DOUBLE), torch.randn(4, 3, dtype=DOUBLE))]
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).double()
    tied[1].bias = tied[0].bias  # a tie of weights is KFAC's nearest Kronecker block (test_shared_weights)
    with pytest.raises(ValueError, match=r"'0.bias' and '1.bias' \(weight tying\)"):
        curvops.KFAC(tied, nn.MSELoss(), data)


def test_bad_options():
    model = _mlp()
    data = [(torch.randn(3, 4, dtype=DOUBLE), torch.randint(0, 3, (3,)))]
    for kwargs, message in [
        ({"fisher_type": "type-3"}, "Unknown fisher_type"),
        ({"kfac_approx": "squeeze"}, "Unknown kfac_approx"),
        ({"bias": "folded"}, "Unknown bias"),
        ({"unsupported": "ignore"}, "Unknown unsupported"),
        ({"mc_samples": 0}, "mc_samples"),
    ]:
        with pytest.raises(ValueError, match=message):
            curvops.KFAC(model, nn.CrossEntropyLoss(), data, **kwargs)
    with pytest.raises(ValueError, match="negative log-likelihood"):
        curvops.KFAC(model, nn.L1Loss(), data)
    embedding = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 3)).double()
    with pytest.raises(ValueError, match="kfac_approx='expand'"):
        curvops.KFAC(embedding, nn.CrossEntropyLoss(), [(torch.tensor([[1, 2]]), torch.tensor([0]))],
                     kfac_approx="reduce")  # fmt: skip


@pytest.mark.parametrize("padding", ["same", "valid", 2])
def test_convolution_padding_variants(padding):
    torch.manual_seed(0)
    model = nn.Conv2d(2, 3, 3, padding=padding, dilation=2 if padding == 2 else 1).double()
    x = torch.randn(4, 2, 6, 6, generator=generator(0), dtype=DOUBLE)
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=generator(1), dtype=DOUBLE)
    kfac = curvops.KFAC(model, nn.MSELoss(), [(x, y)], fisher_type="type-2")
    expected = _block_diagonal(Truth(model, nn.MSELoss(), x, y).ggn(), _groups(model))
    torch.testing.assert_close(kfac.to_dense(), expected)


def test_blocks_are_labelled_by_parameter_or_layer_and_laid_out_like_params():
    model = _mlp()
    x = torch.randn(6, 4, generator=generator(0), dtype=DOUBLE)
    data = [(x, torch.randint(0, 3, (6,)))]
    separate = curvops.KFAC(model, nn.CrossEntropyLoss(), data, fisher_type="type-2")
    assert separate.labels == ("0.weight", "0.bias", "2.weight", "2.bias")
    joint = curvops.KFAC(model, nn.CrossEntropyLoss(), data, fisher_type="type-2", bias="joint")
    assert isinstance(joint, curvops.BlockDiagonal) and joint.labels == ("0", "2")
    assert isinstance(joint.block("0"), curvops.Permuted)
    g, a = joint.block("0").op.factors
    torch.testing.assert_close(g, separate.block("0.bias").matrix)
    torch.testing.assert_close(a[:4, :4], separate.block("0.weight").factors[1])
    shuffled = [model[0].weight, model[2].weight, model[0].bias, model[2].bias]
    scattered = curvops.KFAC(
        model, nn.CrossEntropyLoss(), data, params=shuffled, fisher_type="type-2", bias="joint"
    )
    assert isinstance(scattered, curvops.Permuted)
    index = torch.cat([torch.arange(0, 20), torch.arange(25, 40), torch.arange(20, 25), torch.arange(40, 43)])
    torch.testing.assert_close(scattered.to_dense(), joint.to_dense()[index][:, index])
