"""The fast paths of the statistics pass give what the general ones give (issue 15).

Each fast path is checked against the general computation it replaces, in float64: the closed-form
loss gradients against autodiff through the loss, the default decomposition dtype against the
explicit ones.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvops
from curvops.nn.kfac import kronecker_approximation
from curvops.nn.loss_gradients import summed_loss_gradient
from curvops.nn.losses import LossAdapter

D = torch.float64


def _autodiff(loss_fn, output, target, count):
    adapter = LossAdapter(loss_fn)
    scale = adapter.batch_scale(count)
    return torch.func.grad(lambda o: scale * loss_fn(o, target))(output)


def _cases():
    torch.manual_seed(0)
    f2, f3 = torch.randn(6, 4, dtype=D), torch.randn(6, 4, 5, dtype=D)
    labels2, labels3 = torch.randint(0, 4, (6,)), torch.randint(0, 4, (6, 5))
    labels3[0, :3] = -100
    labels3[2] = -100
    probabilities = torch.softmax(torch.randn(6, 4, 5, dtype=D), 1)
    for reduction in ("mean", "sum"):
        yield nn.CrossEntropyLoss(reduction=reduction), f2, labels2
        yield nn.CrossEntropyLoss(reduction=reduction), f3, labels3
        yield nn.CrossEntropyLoss(reduction=reduction, ignore_index=1), f3, labels3.clamp(min=0)
        yield nn.CrossEntropyLoss(reduction=reduction), f3, probabilities
        yield nn.MSELoss(reduction=reduction), f3, torch.randn_like(f3)
        yield nn.BCEWithLogitsLoss(reduction=reduction), f2, torch.rand_like(f2).round()


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: f"{type(c[0]).__name__}-{c[0].reduction}")
def test_closed_form_gradients_equal_autodiff(case):
    loss_fn, output, target = case
    count = LossAdapter(loss_fn).count(target)
    truth = _autodiff(loss_fn, output, target, count)
    assert torch.allclose(LossAdapter(loss_fn).datum_gradients(output, target, count), truth, atol=1e-14)


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: f"{type(c[0]).__name__}-{c[0].reduction}")
def test_closed_form_gradients_of_draws_equal_autodiff_per_draw(case):
    loss_fn, output, target = case
    count = LossAdapter(loss_fn).count(target)
    draws = torch.stack([target, target.flip(0)]) if target.is_floating_point() else torch.stack([target] * 2)
    if not target.is_floating_point():
        draws[1] = torch.where(target == getattr(loss_fn, "ignore_index", -100), target, (target + 1) % 4)
    got = LossAdapter(loss_fn).datum_gradients(output, draws, count, draws=True)
    for m in range(2):
        assert torch.allclose(got[m], _autodiff(loss_fn, output, draws[m], count), atol=1e-14)


def test_no_closed_form_for_weighted_or_smoothed_losses_and_autodiff_is_used():
    output, target = torch.randn(5, 3, dtype=D), torch.tensor([0, 1, 2, 1, 0])
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=D))
    smoothed = nn.CrossEntropyLoss(label_smoothing=0.1)
    for loss_fn in (weighted, smoothed, nn.BCEWithLogitsLoss(pos_weight=torch.ones(3, dtype=D))):
        y = target if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.rand_like(output).round()
        assert summed_loss_gradient(loss_fn, output, y) is None
        count = LossAdapter(loss_fn).count(y)
        got = LossAdapter(loss_fn).datum_gradients(output, y, count)
        assert torch.allclose(got, _autodiff(loss_fn, output, y, count), atol=1e-14)


def _token_model(dtype):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    x, y = torch.randn(24, 4, 6, dtype=dtype), torch.randint(0, 3, (24, 4))
    y[::5, 1:] = -100

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, inputs):
            return self.net(inputs).transpose(1, 2)

    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=7, shuffle=True)
    return Tokens(), loader


def test_mc_kfac_and_fisher_mc_are_unchanged_by_the_closed_form():
    """The "mc" Kronecker factors and FisherMC from closed-form gradients equal those from autodiff
    through the loss (monkeypatched off), with padding and a shuffled loader of uneven batches."""
    model, loader = _token_model(D)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(3)
    fast_kfac = curvops.KFAC(model, loss_fn, loader, mc_samples=2).to_dense()
    batches = list(loader)  # FisherMC passes once per product: a fixed order
    fast_fisher = curvops.FisherMC(model, loss_fn, batches, mc_samples=2).to_dense()
    import curvops.nn.losses as losses

    original = losses.summed_loss_gradient
    losses.summed_loss_gradient = lambda *args: None
    try:
        torch.manual_seed(3)
        slow_kfac = curvops.KFAC(model, loss_fn, loader, mc_samples=2).to_dense()
        slow_fisher = curvops.FisherMC(model, loss_fn, batches, mc_samples=2).to_dense()
    finally:
        losses.summed_loss_gradient = original
    assert torch.allclose(fast_kfac, slow_kfac, rtol=1e-12, atol=1e-15)
    assert torch.allclose(fast_fisher, slow_fisher, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------ decompositions in the factors' dtype
def _mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def _batches(dtype, count=3):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(9, 6, generator=g).to(dtype), torch.randint(0, 4, (9,), generator=g))
        for _ in range(count)
    ]


@pytest.mark.parametrize("builder", ["kfac", "ekfac", "tkfac", "tekfac"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ekfac_decomposes_in_the_factors_dtype_and_kfac_in_float64_by_default(builder, dtype):
    from curvops.linalg.factor import factors_of

    op = kronecker_approximation(builder, _mlp(dtype), nn.CrossEntropyLoss(), _batches(dtype))
    eigenbasis_only = builder in ("ekfac", "tekfac")
    expected = torch.float32 if eigenbasis_only and dtype != torch.float64 else torch.float64
    factors = factors_of([op])
    if builder in ("kfac", "tkfac"):
        assert factors and {f.decomposition_dtype for f in factors} == {expected}
    explicit = kronecker_approximation(
        builder, _mlp(dtype), nn.CrossEntropyLoss(), _batches(dtype), decomposition_dtype=torch.float64
    )
    assert {f.decomposition_dtype for f in factors_of([explicit])} <= {torch.float64}
    restored = curvops.from_state_dict(op.state_dict())
    assert {f.decomposition_dtype for f in factors_of([restored])} == {f.decomposition_dtype for f in factors}


@pytest.mark.parametrize("builder", ["kfac", "ekfac"])
def test_float32_inverse_and_logdet_match_the_float64_truth(builder):
    """Either default (EKFAC's float32 eigenbasis, KFAC's float64 eigh): within float32's accuracy
    of the dense float64 damped inverse and logdet of the same operator."""
    model, data = _mlp(torch.float32), _batches(torch.float32)
    op = kronecker_approximation(builder, model, nn.CrossEntropyLoss(), data, fisher_type="type-2")
    damped = op.to_dense().double() + 0.01 * torch.eye(op.shape[0], dtype=D)
    inverse = op.inverse(0.01).to_dense().double()
    assert float((inverse - torch.linalg.inv(damped)).norm() / torch.linalg.inv(damped).norm()) < 1e-5
    assert abs(float(op.logdet(0.01)) - float(torch.linalg.slogdet(damped)[1])) < 1e-5 * abs(
        float(torch.linalg.slogdet(damped)[1])
    )


def test_memory_estimate_follows_the_default_decomposition_dtype():
    model = _mlp(torch.float32)
    assert curvops.memory_estimate(model).decomposition_dtype == torch.float64
    assert curvops.memory_estimate(model, "ekfac").decomposition_dtype == torch.float32
    assert curvops.memory_estimate(model.double(), "tekfac").decomposition_dtype == torch.float64


# ------------------------------------------------------------ restored operators share their factors
@pytest.mark.parametrize("through_disk", [False, True])
def test_a_restored_kfac_decomposes_each_factor_once(tmp_path, through_disk):
    from test_decompositions import counted_eigh

    from curvops.linalg.factor import factors_of

    op = curvops.KFAC(_mlp(D), nn.CrossEntropyLoss(), _batches(D), fisher_type="type-2")
    state = op.state_dict()
    if through_disk:
        torch.save(state, tmp_path / "kfac.pt")
        state = torch.load(tmp_path / "kfac.pt", weights_only=True)
    restored = curvops.from_state_dict(state)
    factors = factors_of([restored])
    assert len(factors) == 6 and len({id(f) for f in factors}) == 4  # each bias's G is its weight's
    with counted_eigh() as calls:
        inverse, logdet = restored.inverse(0.1).to_dense(), restored.logdet(0.1)
    assert len(calls) == 4
    assert torch.allclose(inverse, op.inverse(0.1).to_dense(), rtol=1e-12, atol=1e-14)
    assert torch.allclose(logdet, op.logdet(0.1), rtol=1e-12)
    again = curvops.from_state_dict(state)  # a second restore shares nothing with the first
    assert not {id(f) for f in factors_of([again])} & {id(f) for f in factors}


# ------------------------------------------------------------ EKFAC's corrections, either rotation order
def _conv_model(groups):
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, groups=groups), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 3)
    ).double()


@pytest.mark.parametrize("groups", [1, 2])
def test_ekfac_per_example_corrections_equal_the_gramian_ones_for_convolutions(groups):
    """Per example, ``Q_in`` acts on the summed per-datum gradients when ``n_out < S`` (here 6 or 3
    outputs against 25 positions): the same eigenvalues as the Gramian strategy, which rotates the
    inputs first, and the diagonal of the exact GGN block in the eigenbasis."""
    model = _conv_model(groups)
    x, y = torch.randn(10, 4, 5, 5, dtype=D), torch.randint(0, 3, (10,))
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    loss_fn = nn.CrossEntropyLoss()
    options = {"fisher_type": "type-2", "params": [model[0].weight]}
    per_example = curvops.EKFAC(model, loss_fn, data, correction="per-example", **options)
    gramian = curvops.EKFAC(model, loss_fn, data, correction="gramian", **options)
    assert torch.allclose(per_example.to_dense(), gramian.to_dense(), rtol=1e-10, atol=1e-13)
    if groups == 1:
        kfac = curvops.KFAC(model, loss_fn, data, **options).to_dense()
        ggn = curvops.GGN(model, loss_fn, data, params=[model[0].weight]).to_dense()
        _, q = torch.linalg.eigh(kfac)
        residual = (q.T @ (ggn - per_example.to_dense()) @ q).diagonal()
        assert float(residual.abs().max()) < 1e-10 * float(ggn.abs().max())


# ------------------------------------------------------------ one forward pass per GGN product
def _reference_ggn_product(model, loss_fn, data, v):
    """``G v`` by ``torch.func`` alone, batch by batch: ``J^T H J v`` with the mean's weights."""
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [params[n].shape for n in names]
    pieces = dict(zip(names, v.split([s.numel() for s in shapes]), strict=True))
    tangent = {n: pieces[n].reshape(params[n].shape) for n in names}
    total, counts = 0.0, sum(float((y != -100).sum()) for _, y in data)
    detached = {n: p.detach() for n, p in params.items()}
    for x, y in data:

        def forward(p, x=x):
            return torch.func.functional_call(model, p, (x,))

        output, jv = torch.func.jvp(forward, (detached,), (tangent,))
        count = float((y != -100).sum())

        def scaled_loss(o, y=y, count=count):
            return loss_fn(o, y) * count

        hessian_v = torch.func.jvp(torch.func.grad(scaled_loss), (output.detach(),), (jv,))[1]
        _, pullback = torch.func.vjp(forward, detached)
        (jt,) = pullback(hessian_v)
        total = total + torch.cat([jt[n].flatten() for n in names])
    return total / counts


@pytest.mark.parametrize("kind", ["mlp", "conv", "tokens"])
def test_ggn_products_equal_the_two_pass_reference(kind):
    torch.manual_seed(4)
    if kind == "conv":
        model = _conv_model(1)
        x, y = torch.randn(11, 4, 5, 5, dtype=D), torch.randint(0, 3, (11,))
    elif kind == "tokens":
        model, loader = _token_model(D)
        batches = list(loader)
    else:
        model = _mlp(D)
        x, y = torch.randn(11, 6, dtype=D), torch.randint(0, 4, (11,))
    if kind != "tokens":
        batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    loss_fn = nn.CrossEntropyLoss()
    ggn = curvops.GGN(model, loss_fn, batches)
    v = torch.randn(ggn.shape[0], dtype=D)
    truth = _reference_ggn_product(model, loss_fn, batches, v)
    assert torch.allclose(ggn @ v, truth, rtol=1e-10, atol=1e-13)
    two = torch.stack([v, 2 * v], dim=1)  # several columns: the vmap path
    assert torch.allclose(ggn @ two, torch.stack([truth, 2 * truth], dim=1), rtol=1e-10, atol=1e-13)
    before = [p.detach().clone() for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class _Branches(nn.Module):
    """The raw input into three first layers: a Linear called with its bias by keyword, a
    bias-free Linear, and a strided grouped Conv1d with reflect padding; then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4, bias=False)
        self.conv = nn.Conv1d(2, 4, 3, stride=2, groups=2, padding=1, padding_mode="reflect")
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        a = nn.functional.linear(x, self.a.weight, bias=self.a.bias)
        c = self.conv(x.reshape(-1, 2, 3)).mean(-1)
        return self.head(torch.tanh(torch.cat([a, self.b(x), c], -1)))


@pytest.mark.parametrize("frozen", [False, True])
def test_first_layers_of_the_one_forward_product_take_the_input_as_constant(frozen):
    """The single-pass product computes a first layer's tangent from its weight's and bias's
    alone: equal to ``torch.func``'s reference, and, with a frozen first weight (its bias
    trained), to the several-column path."""
    torch.manual_seed(8)
    model = _Branches().double()
    x, y = torch.randn(9, 6, dtype=D), torch.randint(0, 3, (9,))
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    params = [p for name, p in model.named_parameters() if not (frozen and name == "a.weight")]
    ggn = curvops.GGN(model, nn.CrossEntropyLoss(), batches, params=params)
    v = torch.randn(ggn.shape[0], dtype=D)
    single, columns = ggn @ v, ggn @ torch.stack([v, -v], dim=1)
    assert torch.allclose(columns, torch.stack([single, -single], dim=1), rtol=1e-10, atol=1e-13)
    if not frozen:
        truth = _reference_ggn_product(model, nn.CrossEntropyLoss(), batches, v)
        assert torch.allclose(single, truth, rtol=1e-10, atol=1e-13)


def test_a_model_without_forward_mode_derivatives_falls_back():
    """``nn.MultiheadAttention`` in eval mode takes a fused kernel without forward-mode derivatives:
    the product falls back to reverse over reverse and still equals the dense GGN's."""
    torch.manual_seed(5)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0]).transpose(1, 2)

    model = Attention().double().eval()
    data = [(torch.randn(3, 5, 4, dtype=D), torch.randint(0, 3, (3, 5)))]
    ggn = curvops.GGN(model, nn.CrossEntropyLoss(), data)
    dense = ggn.to_dense()
    v = torch.randn(ggn.shape[0], dtype=D)
    assert torch.allclose(ggn @ v, dense @ v, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------ finiteness from one reduction
def test_non_finite_entries_are_found_and_an_overflowing_sum_is_not_an_error():
    from curvops.linalg.checks import all_finite

    big = torch.full((1000,), 3e38)
    assert all_finite(big) and not all_finite(torch.cat([big, torch.tensor([float("inf")])]))
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))  # inf - inf: nan
    model = _mlp(torch.float32)
    x = torch.randn(9, 6)
    x[4, 2] = float("nan")
    with pytest.raises(ValueError, match="Batch 1: X contains NaN or inf"):
        curvops.KFAC(
            model,
            nn.CrossEntropyLoss(),
            [(torch.randn(9, 6), torch.zeros(9).long()), (x, torch.zeros(9).long())],
        )
    huge = torch.full((9, 6), 3e38)  # finite inputs whose sum overflows pass the check
    curvops.KFAC(nn.Sequential(nn.Linear(6, 2)), nn.MSELoss(), [(huge * 0 + 1, torch.zeros(9, 2))])
    from curvops.nn.batches import checked_batch

    checked_batch((huge, torch.zeros(9)), 0, torch.device("cpu"), torch.float32)


def test_a_users_asymmetric_factor_is_still_refused():
    with pytest.raises(ValueError, match="not symmetric"):
        curvops.Kronecker(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.eye(2))
    with pytest.raises(ValueError, match="NaN or inf"):
        curvops.Kronecker(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), torch.eye(2))


# ------------------------------------------------------------ convolution statistics in chunks of data
class _TwiceConv(nn.Module):
    """A conv applied twice (its calls' positions joined), a grouped conv, then a classifier per pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(3, 3, 3, padding=1)
        self.grouped = nn.Conv2d(3, 6, 3, padding=1, groups=3)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.grouped(torch.tanh(self.shared(torch.tanh(self.shared(x)))))))


@pytest.mark.parametrize("builder", ["kfac", "tkfac", "ekfac"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", ["separate", "joint"])
def test_convolution_statistics_in_chunks_of_data_equal_one_chunk(monkeypatch, builder, kfac_approx, bias):
    """ConvRule.feature_chunk sums the patches of a few data at a time: the same factors, TKFAC
    traces and EKFAC corrections as the whole batch at once, with per-pixel targets some of which
    are ignore_index (and a datum of only padding), a shared conv and a grouped conv."""
    from curvops.nn.layers.conv import ConvRule

    if builder == "ekfac" and kfac_approx == "reduce":
        pytest.skip("reduce's A has rank <= 7 < 27 here: EKFAC's basis of its null space is arbitrary")
    torch.manual_seed(6)
    model = _TwiceConv().double()
    x, y = torch.randn(7, 3, 5, 5, dtype=D), torch.randint(0, 4, (7, 5, 5))
    y[1, :2] = -100
    y[4] = -100
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    options = {"fisher_type": "type-2", "kfac_approx": kfac_approx, "bias": bias}
    whole = kronecker_approximation(builder, model, nn.CrossEntropyLoss(), data, **options).to_dense()
    monkeypatch.setattr(ConvRule, "feature_chunk", 60)  # 1 datum's patches a chunk
    chunked = kronecker_approximation(builder, model, nn.CrossEntropyLoss(), data, **options).to_dense()
    assert torch.allclose(chunked, whole, rtol=1e-11, atol=1e-14)
    if builder == "kfac" and kfac_approx == "expand" and bias == "separate":
        monkeypatch.setattr(ConvRule, "feature_chunk", None)
        assert torch.allclose(
            kronecker_approximation(builder, model, nn.CrossEntropyLoss(), data, **options).to_dense(), whole
        )
