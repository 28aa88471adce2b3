"""Sequence losses (issue 13, item 4): padding targets out of the Kronecker factors, weighted and
smoothed losses for type-2, and the type-2 factor of any loss convex in the outputs.

Ground truth: the GGN ``J^T ∇²L J`` from ``torch.func`` in float64 (one batch), ``curvops.GGN``
where several batches need the loss's own normalisation, and the same data with the padded
positions removed (a twin) where KFAC is not exact.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import DataLoader, TensorDataset

import curvops
from curvops.nn.approximations import TEKFAC_APPROXIMATION
from curvops.nn.kronecker_pass import KroneckerPass
from curvops.nn.layers import find_layers
from curvops.nn.losses import LossAdapter, loss_hessian_factor
from curvops.nn.model import ModelData
from curvops.nn.options import KroneckerOptions
from curvops.optim import KFACOptimizer

DOUBLE = torch.float64
IGNORE = -100
BUILDERS = {
    "KFAC": curvops.KFAC,
    "EKFAC": curvops.EKFAC,
    "TKFAC": curvops.TKFAC,
    "TEKFAC": lambda *a, **k: curvops.TKFAC(*a, eigenvalue_correction=True, **k),
}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DOUBLE)


def dense_ggn(model, loss_fn, x, y):
    """``J^T ∇²_f L J`` of one batch's loss ``L = loss_fn(model(x), y)``, by ``torch.func``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def output(t):
        parts = t.split([math.prod(s) for s in shapes])
        values = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, values, (x,))

    out = output(theta).detach()
    lam = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    jac = jacrev(lambda t: output(t).reshape(-1))(theta)
    return jac.T @ lam @ jac


def dense(op):
    return op.to_dense()


class TokenWise(nn.Module):
    """A token-wise MLP on ``[N, S, d]``: logits ``[N, C, S]`` or, ``flat``, ``[N·S, C]``."""

    def __init__(self, d=3, hidden=4, classes=3, flat=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.first, self.second, self.flat = nn.Linear(d, hidden), nn.Linear(hidden, classes), flat
        self.double()

    def forward(self, x):
        y = self.second(torch.tanh(self.first(x)))
        return y.flatten(0, -2) if self.flat else y.movedim(-1, 1)


def targets_for(model, y):
    return y.flatten() if model.flat else y


def block_mask(model):
    """Where the blocks of the parameters (one each) lie."""
    sizes = torch.tensor([p.numel() for p in model.parameters()])
    owner = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    return owner[:, None] == owner[None, :]


# ----------------------------------------------------------------- (a) padding out of the factors


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("flat", [False, True], ids=["[N, C, S]", "[N*S, C]"])
def test_one_valid_token_among_padding_gives_the_exact_ggn_blocks(flat, kfac_approx):
    """One datum, one valid token, three padded ones: every block of a token-wise MLP is exact."""
    model = TokenWise(flat=flat)
    x, y = randn(1, 4, 3, seed=1), torch.tensor([[IGNORE, 2, IGNORE, IGNORE]])
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    data = [(x, targets_for(model, y))]
    truth = dense_ggn(model, loss_fn, *data[0])
    kfac = dense(curvops.KFAC(model, loss_fn, data, fisher_type="type-2", kfac_approx=kfac_approx))
    mask = block_mask(model)
    torch.testing.assert_close(kfac, truth * mask, rtol=1e-10, atol=1e-12)
    joint = curvops.KFAC(model, loss_fn, data, fisher_type="type-2", kfac_approx=kfac_approx, bias="joint")
    first = sum(p.numel() for p in model.first.parameters())
    for block in (slice(0, first), slice(first, None)):  # weight and bias of a layer in one G ⊗ A
        torch.testing.assert_close(dense(joint)[block, block], truth[block, block], rtol=1e-10, atol=1e-12)


def padded_sequences(lengths, total=5, seed=0):
    """Batches ``[N, total, 3]`` whose datum ``n`` has ``lengths[n]`` tokens, then padding (garbage
    inputs, ignored targets)."""
    x = randn(len(lengths), total, 3, seed=seed)
    y = torch.randint(0, 3, (len(lengths), total), generator=torch.Generator().manual_seed(seed))
    for n, length in enumerate(lengths):
        y[n, length:] = IGNORE
    return x, y


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_padded_positions_enter_no_factor_trace_or_correction(name, kfac_approx, fisher_type):
    """The same operator as the twin data with the padded positions removed (batches of equal
    lengths, different between batches)."""
    model, loss_fn = TokenWise(), nn.CrossEntropyLoss(ignore_index=IGNORE)
    (x1, y1), (x2, y2) = padded_sequences([3, 3], seed=1), padded_sequences([4, 4, 4], seed=2)
    padded = [(x1, y1), (x2, y2)]
    twin = [(x1[:, :3], y1[:, :3]), (x2[:, :4], y2[:, :4])]
    options = {"fisher_type": fisher_type, "kfac_approx": kfac_approx}
    expected = dense(BUILDERS[name](model, loss_fn, twin, **options))
    torch.testing.assert_close(dense(BUILDERS[name](model, loss_fn, padded, **options)), expected)


def kronecker_pass(model, loss_fn, data, name, kfac_approx):
    options = KroneckerOptions.checked(name, "type-2", kfac_approx)
    model_data = ModelData(model, data)
    layers, _ = find_layers(model, model_data.params, options.bias, options.kfac_approx)
    return KroneckerPass(model_data, options.loss(loss_fn), layers, options)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_tkfac_terms_and_ekfac_corrections_exclude_padding(kfac_approx):
    """δ, Φ, Ψ (TKFAC) and EKFAC's eigenvalues in one basis: those of the twin."""
    model, loss_fn = TokenWise(), nn.CrossEntropyLoss(ignore_index=IGNORE)
    x, y = padded_sequences([2, 2, 2], seed=3)
    padded = kronecker_pass(model, loss_fn, [(x, y)], "tekfac", kfac_approx)
    twin = kronecker_pass(model, loss_fn, [(x[:, :2], y[:, :2])], "tekfac", kfac_approx)
    statistics = twin.statistics()
    for a, b in zip(padded.statistics(), statistics, strict=True):
        assert b.trace is not None and b.trace_input_factor is not None
        for key, value in b.tensors().items():
            torch.testing.assert_close(a.tensors()[key], value, msg=f"{b.layer.name}: {key}")
    bases = [TEKFAC_APPROXIMATION.eigenbasis(s)[0] for s in statistics]
    for a, b in zip(padded.corrections(bases), twin.corrections(bases), strict=True):
        torch.testing.assert_close(a.weight, b.weight)
        torch.testing.assert_close(a.bias, b.bias)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_shuffled_uneven_padded_loader_gives_the_one_batch_operator(name, kfac_approx):
    """13 sequences with padding anywhere (one datum all padding), batches of 4, 4, 4, 1, shuffled."""
    model, loss_fn = TokenWise(), nn.CrossEntropyLoss(ignore_index=IGNORE)
    x = randn(13, 5, 3, seed=4)
    y = torch.randint(0, 3, (13, 5), generator=torch.Generator().manual_seed(4))
    y[torch.rand(13, 5, generator=torch.Generator().manual_seed(5)) < 0.4] = IGNORE
    y[6] = IGNORE
    loader = DataLoader(
        TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    options = {"fisher_type": "type-2", "kfac_approx": kfac_approx}
    one_batch = dense(BUILDERS[name](model, loss_fn, [(x, y)], **options))
    torch.testing.assert_close(dense(BUILDERS[name](model, loss_fn, loader, **options)), one_batch)


def test_scattered_padding_in_expand_kfac_is_the_valid_tokens_alone():
    """KFAC-expand sums over positions: padded anywhere equals the valid tokens as data of their own."""
    model, loss_fn = TokenWise(flat=True), nn.CrossEntropyLoss(ignore_index=IGNORE)
    x = randn(4, 6, 3, seed=6)
    y = torch.randint(0, 3, (4, 6), generator=torch.Generator().manual_seed(6))
    y[torch.rand(4, 6, generator=torch.Generator().manual_seed(7)) < 0.5] = IGNORE
    valid = y != IGNORE
    tokens = [(x[valid].unsqueeze(1), y[valid])]
    expected = dense(curvops.KFAC(model, loss_fn, tokens, fisher_type="type-2"))
    got = dense(curvops.KFAC(model, loss_fn, [(x, y.flatten())], fisher_type="type-2"))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_batch_of_only_ignored_targets_adds_nothing(name):
    model, loss_fn = TokenWise(), nn.CrossEntropyLoss(ignore_index=IGNORE)
    x, y = padded_sequences([3, 5, 2], seed=8)
    padding = (randn(2, 5, 3, seed=9), torch.full((2, 5), IGNORE))
    expected = dense(BUILDERS[name](model, loss_fn, [(x, y)], fisher_type="type-2"))
    got = dense(BUILDERS[name](model, loss_fn, [padding, (x, y), padding], fisher_type="type-2"))
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="no loss terms"):
        BUILDERS[name](model, loss_fn, [padding], fisher_type="type-2")


class Tagger(nn.Module):
    """Embedding (``padding_idx=0``) and a token-wise head: logits ``[N, C, S]``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(10)
        self.embedding, self.head = nn.Embedding(7, 4, padding_idx=0), nn.Linear(4, 3)
        self.double()

    def forward(self, tokens):
        return self.head(torch.tanh(self.embedding(tokens))).movedim(-1, 1)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_an_embedding_with_padding_tokens_equals_its_unpadded_twin(name):
    model, loss_fn = Tagger(), nn.CrossEntropyLoss(ignore_index=IGNORE)
    generator = torch.Generator().manual_seed(11)
    tokens = [torch.randint(1, 7, (n, 6), generator=generator) for n in (3, 2)]
    labels = [torch.randint(0, 3, (n, 6), generator=generator) for n in (3, 2)]
    twin = [(tokens[0][:, :4], labels[0][:, :4]), (tokens[1][:, :5], labels[1][:, :5])]
    padded = []
    for (t, y), length in zip(zip(tokens, labels, strict=True), (4, 5), strict=True):
        t, y = t.clone(), y.clone()
        t[:, length:], y[:, length:] = 0, IGNORE
        padded.append((t, y))
    expected = dense(BUILDERS[name](model, loss_fn, twin, fisher_type="type-2"))
    torch.testing.assert_close(dense(BUILDERS[name](model, loss_fn, padded, fisher_type="type-2")), expected)


class PooledConv(nn.Module):
    """A convolution before pooling (positions that do not line up with the targets ``[N]``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(12)
        self.conv, self.head = nn.Conv1d(2, 3, 3), nn.Linear(3, 2)
        self.double()

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean(dim=-1))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_datum_without_loss_terms_leaves_layers_that_do_not_line_up(name):
    model, loss_fn = PooledConv(), nn.CrossEntropyLoss(ignore_index=IGNORE)
    x = randn(10, 2, 6, seed=13)  # 7 data with loss terms: full-rank factors (unique eigenbases)
    y = torch.tensor([1, IGNORE, 0, IGNORE, 1, 0, 0, 1, IGNORE, 1])
    keep = y != IGNORE
    for kfac_approx in ("expand", "reduce"):
        options = {"fisher_type": "type-2", "kfac_approx": kfac_approx}
        expected = dense(BUILDERS[name](model, loss_fn, [(x[keep], y[keep])], **options))
        torch.testing.assert_close(dense(BUILDERS[name](model, loss_fn, [(x, y)], **options)), expected)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "tkfac"])
def test_the_optimizer_statistics_exclude_padding(curvature):
    """One step on padded batches (two micro-batches) gives the twin's running statistics."""
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    (x1, y1), (x2, y2) = padded_sequences([2, 2], seed=14), padded_sequences([4, 4, 4], seed=15)
    runs = {}
    for kind, batches in {
        "padded": [(x1, y1), (x2, y2)],
        "twin": [(x1[:, :2], y1[:, :2]), (x2[:, :4], y2[:, :4])],
    }.items():
        model = TokenWise()
        opt = KFACOptimizer(model, loss_fn, curvature=curvature, fisher_type="type-2", T_inv=1)
        terms = sum(int((y != IGNORE).sum()) for _, y in batches)
        for x, y in batches:
            (loss_fn(model(x), y) * int((y != IGNORE).sum()) / terms).backward()
        opt.step()
        runs[kind] = opt
    torch.testing.assert_close(
        dense(runs["padded"].curvature_operator()), dense(runs["twin"].curvature_operator())
    )
    for a, b in zip(runs["padded"].layers, runs["twin"].layers, strict=True):
        for key, value in b.tensors().items():
            torch.testing.assert_close(a.tensors()[key], value, msg=key)


# ------------------------------------------------- (b) label smoothing and class weights, type-2


CLASS_WEIGHT = torch.tensor([0.5, 2.0, 1.5], dtype=DOUBLE)
CROSS_ENTROPIES = {
    "smoothing": lambda: nn.CrossEntropyLoss(label_smoothing=0.2),
    "weight": lambda: nn.CrossEntropyLoss(weight=CLASS_WEIGHT),
    "both": lambda: nn.CrossEntropyLoss(weight=CLASS_WEIGHT, label_smoothing=0.3, ignore_index=IGNORE),
    "sum": lambda: nn.CrossEntropyLoss(weight=CLASS_WEIGHT, label_smoothing=0.3, reduction="sum"),
}


def linear_model(n_in=3, n_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_out)).double()


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("targets", ["classes", "probabilities"])
@pytest.mark.parametrize("loss", list(CROSS_ENTROPIES))
def test_weighted_and_smoothed_cross_entropy_on_one_datum_is_exact(loss, targets, fisher_type):
    model, loss_fn = linear_model(), CROSS_ENTROPIES[loss]()
    x = randn(1, 3, seed=16)
    y = torch.tensor([1]) if targets == "classes" else torch.softmax(randn(1, 3, seed=17), dim=1)
    kfac = curvops.KFAC(model, loss_fn, [(x, y)], fisher_type=fisher_type, bias="joint")
    if fisher_type == "type-2":
        truth = dense_ggn(model, loss_fn, x, y)
    else:
        adapter = LossAdapter(loss_fn)  # (1/Z) ∇ℓ ∇ℓ^T of the datum's loss ℓ = s L
        scale = adapter.batch_scale(adapter.count(y))
        gradient = jacrev(lambda p: loss_fn(functional_call(model, p, (x,)), y))(
            dict(model.named_parameters())
        )
        flat = torch.cat([gradient[n].reshape(-1) for n, _ in model.named_parameters()])
        truth = scale * torch.outer(flat, flat)
        torch.testing.assert_close(dense(curvops.EmpiricalFisher(model, loss_fn, [(x, y)])), truth)
    torch.testing.assert_close(dense(kfac), truth, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", list(CROSS_ENTROPIES))
def test_the_weighted_mean_normalises_over_uneven_batches(loss):
    """Constant inputs make KFAC exact over many data: ``A = 1``, ``G`` the mean loss Hessian."""
    model, loss_fn = nn.Sequential(nn.Linear(1, 3, bias=False)).double(), CROSS_ENTROPIES[loss]()
    y = torch.randint(0, 3, (11,), generator=torch.Generator().manual_seed(18))
    if loss == "both":
        y[::4] = IGNORE
    x = torch.ones(11, 1, dtype=DOUBLE)
    batches = [*zip(x.split(4), y.split(4), strict=True), (x[:0], y[:0])]
    truth = dense_ggn(model, loss_fn, x, y)
    torch.testing.assert_close(dense(curvops.GGN(model, loss_fn, batches)), truth)
    torch.testing.assert_close(dense(curvops.KFAC(model, loss_fn, batches, fisher_type="type-2")), truth)


def hessian_blocks(loss_fn, output, y, positions=1):
    """Each datum's (and position's) block of ``∇²_f (s · L)`` (``s`` the batch's loss terms for
    a mean), ``[N·S, D, D]`` for outputs ``[N, D, S]`` (``S = positions``, ``[N, D]`` if 1)."""
    adapter = LossAdapter(loss_fn)
    scale = adapter.batch_scale(adapter.count(y))
    full = hessian(lambda o: scale * loss_fn(o, y))(output)
    n = output.shape[0]
    full = full.reshape(n, -1, positions, n, output[0].numel() // positions, positions)
    return torch.stack([full[i, :, t, i, :, t] for i in range(n) for t in range(positions)])


def factor_products(loss_fn, output, y, positions=1):
    """``Σ_k S_k S_k^T`` per datum (and position, as :func:`hessian_blocks`)."""
    s = loss_hessian_factor(LossAdapter(loss_fn), output, y)
    s = s.reshape(s.shape[0], output.shape[0], -1, positions)
    return torch.einsum("kndt,knet->ntde", s, s).flatten(0, 1)


FACTOR_CASES = {
    "ce classes [N, C, S], weight, smoothing, ignore": (
        lambda: nn.CrossEntropyLoss(weight=CLASS_WEIGHT, label_smoothing=0.2, ignore_index=IGNORE),
        lambda: torch.tensor([[0, IGNORE], [2, 1], [IGNORE, IGNORE]]),
        (3, 3, 2),
    ),
    "ce probabilities [N, C, S], smoothing": (
        lambda: nn.CrossEntropyLoss(label_smoothing=0.2),
        lambda: torch.softmax(randn(2, 3, 2, seed=35), dim=1),
        (2, 3, 2),
    ),
    "ce probabilities (not normalised), weight, smoothing": (
        lambda: nn.CrossEntropyLoss(weight=CLASS_WEIGHT, label_smoothing=0.1),
        lambda: torch.rand(4, 3, generator=torch.Generator().manual_seed(19), dtype=DOUBLE),
        (4, 3),
    ),
    "bce weight and pos_weight": (
        lambda: nn.BCEWithLogitsLoss(weight=randn(2, 3, seed=20).abs(), pos_weight=randn(3, seed=21).abs()),
        lambda: torch.rand(2, 3, generator=torch.Generator().manual_seed(22), dtype=DOUBLE),
        (2, 3),
    ),
    "huber": (lambda: nn.HuberLoss(delta=0.7), lambda: randn(4, 2, seed=23), (4, 2)),
    "poisson nll": (lambda: nn.PoissonNLLLoss(), lambda: randn(3, 2, seed=24).abs(), (3, 2)),
    "coupled smooth loss": (
        lambda: lambda o, t: ((o - t).square().sum(dim=-1) + 1).square().mean(),
        lambda: randn(3, 2, 2, seed=25),
        (3, 2, 2),
    ),
}


@pytest.mark.parametrize("case", list(FACTOR_CASES))
def test_the_factor_outer_product_is_the_loss_hessian_in_the_outputs(case):
    make_loss, make_targets, shape = FACTOR_CASES[case]
    loss_fn, y, output = make_loss(), make_targets(), randn(*shape, seed=26)
    positions = shape[2] if case.startswith("ce") and len(shape) == 3 else 1  # CE: per position
    truth = hessian_blocks(loss_fn, output, y, positions)
    torch.testing.assert_close(factor_products(loss_fn, output, y, positions), truth)


@pytest.mark.parametrize("weights", ["weight", "pos_weight", "both"])
def test_weighted_binary_cross_entropy_on_one_datum_is_exact(weights):
    options = {
        "weight": {"weight": randn(3, seed=27).abs()},
        "pos_weight": {"pos_weight": randn(3, seed=28).abs() + 0.5},
        "both": {"weight": randn(3, seed=27).abs(), "pos_weight": randn(3, seed=28).abs() + 0.5},
    }[weights]
    model, loss_fn = linear_model(), nn.BCEWithLogitsLoss(**options)
    x, y = randn(1, 3, seed=29), torch.tensor([[1.0, 0.0, 0.3]], dtype=DOUBLE)
    kfac = curvops.KFAC(model, loss_fn, [(x, y)], fisher_type="type-2", bias="joint")
    torch.testing.assert_close(dense(kfac), dense_ggn(model, loss_fn, x, y), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ (c) any loss convex in f


GENERIC_LOSSES = {
    "huber": lambda: nn.HuberLoss(delta=0.5),
    "smooth l1 (sum)": lambda: nn.SmoothL1Loss(reduction="sum"),
    "poisson nll": lambda: nn.PoissonNLLLoss(),
    "coupled callable": lambda: lambda o, t: ((o - t).square().sum(dim=-1) + 1).square().mean(),
}


@pytest.mark.parametrize("name", list(GENERIC_LOSSES))
def test_a_generic_loss_for_type2_on_one_datum_is_the_exact_ggn(name):
    model, loss_fn = linear_model(n_out=2), GENERIC_LOSSES[name]()
    x, y = randn(1, 3, seed=30), randn(1, 2, seed=31).abs()
    kfac = curvops.KFAC(model, loss_fn, [(x, y)], fisher_type="type-2", bias="joint")
    truth = dense_ggn(model, loss_fn, x, y)
    assert truth.abs().max() > 1e-3
    torch.testing.assert_close(dense(kfac), truth, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dense(curvops.GGN(model, loss_fn, [(x, y)])), truth)


@pytest.mark.parametrize("name", ["huber", "poisson nll"])
def test_a_generic_loss_normalises_as_it_averages_over_uneven_batches(name):
    """Constant inputs, 2 outputs per datum: the mean is over every element, as torch's is."""
    model, loss_fn = nn.Sequential(nn.Linear(1, 2, bias=False)).double(), GENERIC_LOSSES[name]()
    x, y = torch.ones(9, 1, dtype=DOUBLE), randn(9, 2, seed=32).abs()
    batches = list(zip(x.split(4), y.split(4), strict=True))
    truth = dense_ggn(model, loss_fn, x, y)  # the mean over all the data as one batch
    torch.testing.assert_close(dense(curvops.GGN(model, loss_fn, batches)), truth)
    torch.testing.assert_close(dense(curvops.KFAC(model, loss_fn, batches, fisher_type="type-2")), truth)


COUNTED = {
    "L1Loss": (nn.L1Loss(), randn(4, 3), randn(4, 3, seed=1)),
    "HuberLoss": (nn.HuberLoss(), randn(4, 3), randn(4, 3, seed=1)),
    "SmoothL1Loss": (nn.SmoothL1Loss(), randn(4, 3), randn(4, 3, seed=1)),
    "PoissonNLLLoss": (nn.PoissonNLLLoss(), randn(4, 3), randn(4, 3, seed=1).abs()),
    "BCELoss": (nn.BCELoss(), torch.rand(4, 3, dtype=DOUBLE), torch.rand(4, 3, dtype=DOUBLE)),
    "SoftMarginLoss": (nn.SoftMarginLoss(), randn(4, 3), randn(4, 3, seed=1).sign()),
    "KLDivLoss": (nn.KLDivLoss(), randn(4, 3), torch.rand(4, 3, dtype=DOUBLE)),
    "NLLLoss": (
        nn.NLLLoss(weight=CLASS_WEIGHT, ignore_index=IGNORE),
        torch.log_softmax(randn(4, 3, 2), 1),
        torch.tensor([[0, 1], [IGNORE, 2], [1, 1], [2, IGNORE]]),
    ),
    "CrossEntropyLoss probabilities": (
        nn.CrossEntropyLoss(weight=CLASS_WEIGHT, label_smoothing=0.2),
        randn(4, 3, 2),
        torch.softmax(randn(4, 3, 2, seed=2), 1),
    ),
    "CrossEntropyLoss smoothed": (
        nn.CrossEntropyLoss(weight=CLASS_WEIGHT, label_smoothing=0.2, ignore_index=IGNORE),
        randn(4, 3),
        torch.tensor([0, IGNORE, 2, 1]),
    ),
}


@pytest.mark.parametrize(
    "loss_fn", [nn.HuberLoss(delta=0.3), nn.SmoothL1Loss(beta=0.4), nn.SmoothL1Loss(beta=0.0)]
)
def test_written_out_residual_losses_have_torchs_values(loss_fn):
    output, target = randn(5, 3), randn(5, 3, seed=1)
    torch.testing.assert_close(LossAdapter(loss_fn)(output, target), loss_fn(output, target))


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # KLDivLoss's own warning
@pytest.mark.parametrize("name", list(COUNTED))
def test_the_count_is_what_the_mean_divides_the_sum_by(name):
    loss_fn, output, target = COUNTED[name]
    summed = copy.copy(loss_fn)
    summed.reduction = "sum"
    ratio = summed(output, target) / loss_fn(output, target)
    assert LossAdapter(loss_fn).count(target) == pytest.approx(float(ratio), rel=1e-12)


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: nn.CrossEntropyLoss(weight=CLASS_WEIGHT, label_smoothing=0.2, ignore_index=IGNORE),
        lambda: nn.HuberLoss(delta=0.5),
    ],
    ids=["weighted smoothed cross-entropy", "huber"],
)
def test_the_optimizer_takes_weighted_smoothed_and_generic_losses_for_type2(make_loss):
    model, loss_fn = TokenWise(), make_loss()
    x, y = padded_sequences([5, 3, 4], seed=36)
    if isinstance(loss_fn, nn.HuberLoss):
        y = randn(3, 3, 5, seed=37)
    opt = KFACOptimizer(model, loss_fn, fisher_type="type-2", T_inv=1)
    expected = dense(
        curvops.KFAC(model, loss_fn, [(x, y)], params=opt.curvature_params, fisher_type="type-2")
    )
    loss_fn(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(dense(opt.curvature_operator()), expected)


# ----------------------------------------------------------------------------------- errors


def test_mc_keeps_refusing_weighted_and_smoothed_losses():
    model, data = linear_model(), [(randn(4, 3), torch.tensor([0, 1, 2, 1]))]
    for loss_fn, message in [
        (nn.CrossEntropyLoss(label_smoothing=0.1), "label smoothing is not a likelihood"),
        (nn.CrossEntropyLoss(weight=CLASS_WEIGHT), "weighted loss"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3, dtype=DOUBLE)), "weighted loss"),
    ]:
        targets = data[0][1] if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.ones(4, 3, dtype=DOUBLE)
        with pytest.raises(ValueError, match=message):
            curvops.KFAC(model, loss_fn, [(data[0][0], targets)], fisher_type="mc")
        with pytest.raises(ValueError, match=message):
            KFACOptimizer(model, loss_fn, fisher_type="mc")


def gaussian_nll(output, target):
    """A heteroscedastic Gaussian negative log-likelihood: mean and log-variance per datum."""
    return nn.functional.gaussian_nll_loss(output[:, :1], target, output[:, 1:].exp())


def test_a_loss_not_convex_in_the_outputs_is_refused_for_type2():
    model = linear_model(n_out=2)
    x, y = randn(3, 3, seed=33), randn(3, 1, seed=34) * 0.01  # small residuals: negative curvature
    with pytest.raises(ValueError, match=r"Batch 0: .* datum \d .* not convex in the outputs.*curvops\.GGN"):
        curvops.KFAC(model, gaussian_nll, [(x, y)], fisher_type="type-2")
    assert torch.isfinite(dense(curvops.GGN(model, gaussian_nll, [(x, y)]))).all()  # the exact one exists


def test_a_loss_that_couples_the_data_is_refused_for_type2():
    model, x, y = linear_model(n_out=2), randn(4, 3, seed=38), randn(4, 2, seed=39)

    def coupled(output, target):  # the squared error of the batch's summed outputs
        return (output - target).sum(dim=0).square().sum()

    with pytest.raises(ValueError, match=r"Batch 0: the loss couples the data .*curvops\.GGN"):
        curvops.KFAC(model, coupled, [(x, y)], fisher_type="type-2")


def test_a_generic_loss_with_too_large_rows_is_refused_naming_the_size():
    model = nn.Sequential(nn.Linear(2, 1100)).double()
    x, y = randn(2, 2), randn(2, 1100)
    with pytest.raises(ValueError, match=r"row of 1100 numbers .*at most 1024"):
        curvops.KFAC(model, nn.HuberLoss(), [(x, y)], fisher_type="type-2")


def test_negative_class_weights_are_refused_for_type2():
    model, x, y = linear_model(), randn(3, 3), torch.tensor([1, 0, 2])
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, -1.0, 1.0], dtype=DOUBLE))
    with pytest.raises(ValueError, match="negative curvature"):
        curvops.KFAC(model, loss_fn, [(x, y)], fisher_type="type-2")


def test_likelihood_types_still_refuse_other_losses():
    model, data = linear_model(n_out=2), [(randn(2, 3), randn(2, 2))]
    for fisher_type in ("mc", "empirical"):
        with pytest.raises(ValueError, match="negative log-likelihood"):
            curvops.KFAC(model, nn.HuberLoss(), data, fisher_type=fisher_type)
