"""Shared weights: a module called several times in one forward pass is weight sharing over its
calls (KFAC expand/reduce by their definition, EKFAC's corrections and TKFAC's δ exact), in the
builders and in KFACOptimizer; a parameter tied between two modules."""

import copy

import pytest
import torch
from helpers import DOUBLE, assert_resumes_bit_for_bit, train_steps
from torch import nn
from torch.func import hessian, jacrev

import curvops
from curvops.nn.kfac import kronecker_approximation
from curvops.nn.tied import nearest_kronecker
from curvops.optim import KFACOptimizer

SIZE = 3


class Twice(nn.Module):
    """``f(x) = W tanh(W x)``: one Linear, two calls."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.Linear(SIZE, SIZE, bias=False)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


def one_datum(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, SIZE, generator=g, dtype=DOUBLE), torch.randn(1, SIZE, generator=g, dtype=DOUBLE)


def truth(model: Twice, x, y):
    """Written from torch.func alone: the inputs ``a_u`` of both calls, the output gradients
    ``g_uc = J_u^T s_c`` (``J_u = ∂f/∂y_u``, ``Λ = ∇²_f loss = Σ_c s_c s_c^T``) and the true GGN
    block ``J_W^T Λ J_W`` of the weight."""
    w = model.layer.weight.detach()

    def network(weight, d1, d2):  # d_u: a perturbation of call u's output
        first = x[0] @ weight.T + d1
        return torch.tanh(first) @ weight.T + d2, first

    zero = torch.zeros(SIZE, dtype=DOUBLE)
    output = network(w, zero, zero)[0]
    lam = hessian(lambda f: nn.functional.mse_loss(f, y[0]))(output)
    eigenvalues, vectors = torch.linalg.eigh(lam)
    columns = vectors * eigenvalues.clamp(min=0).sqrt()  # [C, K]: Λ = S S^T
    j1, j2 = jacrev(lambda d1, d2: network(w, d1, d2)[0], argnums=(0, 1))(zero, zero)
    inputs = [x[0], torch.tanh(network(w, zero, zero)[1])]
    gradients = [j1.T @ columns, j2.T @ columns]  # [n_out, K] per call
    j_w = jacrev(lambda weight: network(weight, zero, zero)[0])(w).reshape(SIZE, -1)
    return inputs, gradients, j_w.T @ lam @ j_w


def test_expand_and_reduce_of_a_module_called_twice_are_their_definitions():
    model = Twice().double()
    x, y = one_datum()
    inputs, gradients, _ = truth(model, x, y)
    a = torch.stack(inputs)  # [U, n_in]: the calls' positions
    expand_g = sum(g @ g.T for g in gradients)
    expand_a = a.T @ a / len(inputs)
    mean_a, summed_g = a.mean(0), sum(gradients)
    reduce_g, reduce_a = summed_g @ summed_g.T, torch.outer(mean_a, mean_a)
    for approx, (g, a_factor) in {"expand": (expand_g, expand_a), "reduce": (reduce_g, reduce_a)}.items():
        kfac = curvops.KFAC(model, nn.MSELoss(), [(x, y)], fisher_type="type-2", kfac_approx=approx)
        assert kfac.labels == ("layer.weight",)
        torch.testing.assert_close(kfac.to_dense(), torch.kron(g, a_factor))


def test_ekfac_corrections_and_tkfac_trace_are_those_of_the_true_block():
    model = Twice().double()
    x, y = one_datum()
    _, _, block = truth(model, x, y)
    data = [(x, y)]
    g, a = curvops.KFAC(model, nn.MSELoss(), data, fisher_type="type-2").block("layer.weight").factors
    basis = torch.kron(torch.linalg.eigh(g)[1], torch.linalg.eigh(a)[1])
    corrected = basis @ torch.diag(torch.diagonal(basis.T @ block @ basis)) @ basis.T
    ekfac = curvops.EKFAC(model, nn.MSELoss(), data, fisher_type="type-2")
    torch.testing.assert_close(ekfac.to_dense(), corrected)
    for correction in ("per-example", "gramian"):
        other = curvops.EKFAC(model, nn.MSELoss(), data, fisher_type="type-2", correction=correction)
        torch.testing.assert_close(other.to_dense(), corrected)
    for approx in ("expand", "reduce"):
        tkfac = curvops.TKFAC(model, nn.MSELoss(), data, fisher_type="type-2", kfac_approx=approx)
        torch.testing.assert_close(tkfac.trace(), block.trace())


def test_a_sequential_that_repeats_a_module_and_a_shared_linear_over_two_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(SIZE, SIZE)
    repeated = nn.Sequential(lin, nn.Tanh(), lin).double()
    x, y = one_datum()
    tkfac = curvops.TKFAC(repeated, nn.MSELoss(), [(x, y)], fisher_type="type-2")
    assert tkfac.labels == ("0.weight", "0.bias")
    exact = curvops.GGN(repeated, nn.MSELoss(), [(x, y)]).to_dense()
    torch.testing.assert_close(tkfac.block("0.weight").trace(), exact[:9, :9].trace())
    torch.testing.assert_close(tkfac.block("0.bias").trace(), exact[9:, 9:].trace())

    class Siamese(nn.Module):  # one Linear on two inputs, whose outputs are added
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(SIZE, 2, bias=False)

        def forward(self, pair):
            return self.shared(pair[:, 0]) + self.shared(pair[:, 1])

    model = Siamese().double()
    pair = torch.randn(1, 2, SIZE, dtype=DOUBLE)
    target = torch.randn(1, 2, dtype=DOUBLE)
    reduce = curvops.KFAC(model, nn.MSELoss(), [(pair, target)], fisher_type="type-2", kfac_approx="reduce")
    # f = W (a_1 + a_2), g_1 = g_2 = s: reduce's (2s)(2s)^T ⊗ (a_1 + a_2)(a_1 + a_2)^T / 4 is exact
    exact = curvops.GGN(model, nn.MSELoss(), [(pair, target)]).to_dense()
    torch.testing.assert_close(reduce.to_dense(), exact)


def test_calls_on_different_batch_sizes_are_refused_naming_the_module():
    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(SIZE, SIZE)

        def forward(self, x):
            return self.layer(x) + self.layer(x[:2]).sum(0)

    data = [(torch.randn(4, SIZE, dtype=DOUBLE), torch.randn(4, SIZE, dtype=DOUBLE))]
    with pytest.raises(ValueError, match=r"'layer' ran 2 times .* sizes \[4, 2\]"):
        curvops.KFAC(Halves().double(), nn.MSELoss(), data, fisher_type="type-2")


def shared_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    hidden = nn.Linear(6, 6)
    layers = [nn.Linear(4, 6), nn.Tanh(), hidden, nn.Tanh(), hidden, nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers).double()


def batches(count: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 4, generator=g, dtype=DOUBLE), torch.randint(0, 3, (16,), generator=g))
        for _ in range(count)
    ]


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "tkfac", "tekfac"])
def test_optimizer_with_a_shared_module_equals_the_builder_trains_and_resumes(curvature):
    loss_fn = nn.CrossEntropyLoss()
    model, data = shared_mlp(), batches(8)
    builder = kronecker_approximation(
        curvature, copy.deepcopy(model), loss_fn, data[:1], fisher_type="type-2"
    )
    options = {"curvature": curvature, "fisher_type": "type-2", "lr": 0.1, "damping": 0.1, "T_inv": 2}
    opt = KFACOptimizer(model, loss_fn, ema_decay=0.0, **options)
    train_steps(model, opt, loss_fn, data[:1])
    torch.testing.assert_close(opt.curvature_operator().to_dense(), builder.to_dense(), rtol=1e-9, atol=1e-12)

    model = shared_mlp()
    opt = KFACOptimizer(model, loss_fn, **options)
    losses = train_steps(model, opt, loss_fn, data[:4] * 5)
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4])
    twin = shared_mlp(seed=5)
    assert_resumes_bit_for_bit(
        model, opt, twin, lambda m: KFACOptimizer(m, loss_fn, **options), loss_fn, data[4:]
    )


# ----------------------------------------------------------- a weight tied between two layers
VOCAB, WIDTH = 5, 3


class TiedLM(nn.Module):
    """Token embedding ``E [V, d]`` → tanh(Linear) → head ``Linear(d, V)`` whose weight is ``E``."""

    def __init__(self, tie: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.head.weight = self.emb.weight if tie else nn.Parameter(self.emb.weight.detach().clone())

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.emb(tokens)))).flatten(0, 1)


def token_batches(count: int = 1, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, VOCAB, (4, 3), generator=g), torch.randint(0, VOCAB, (12,), generator=g))
        for _ in range(count)
    ]


def rearranged(matrix, rows: int, cols: int):
    """Van Loan–Pitsianis: ``R[(i, j), (k, l)] = M[i·c + k, j·c + l]``, so ``R(B ⊗ C) = vec B vec C^T``."""
    return matrix.reshape(rows, cols, rows, cols).permute(0, 2, 1, 3).reshape(rows * rows, cols * cols)


def dense_nearest_kronecker(matrix, rows: int, cols: int):
    u, s, vh = torch.linalg.svd(rearranged(matrix, rows, cols))
    return s[0] * torch.kron(u[:, 0].reshape(rows, rows), vh[0].reshape(cols, cols))


def psd(size: int, seed: int):
    b = torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=DOUBLE)
    return b @ b.T


def test_nearest_kronecker_is_the_top_singular_pair_closer_than_any_other_kronecker_and_psd():
    g = torch.Generator().manual_seed(3)
    diagonal = torch.rand(VOCAB, generator=g, dtype=DOUBLE)
    terms = [(diagonal, psd(WIDTH, 1)), (psd(VOCAB, 2), psd(WIDTH, 3))]
    total = torch.kron(torch.diag(diagonal), terms[0][1]) + torch.kron(*terms[1])
    b, c = nearest_kronecker(terms)
    nearest = torch.kron(b, c)
    torch.testing.assert_close(nearest, dense_nearest_kronecker(total, VOCAB, WIDTH))
    assert torch.linalg.eigvalsh(b).min() > -1e-12 and torch.linalg.eigvalsh(c).min() > -1e-12
    error = torch.linalg.matrix_norm(total - nearest)
    for x, y in terms:
        assert error < torch.linalg.matrix_norm(total - torch.kron(torch.diag(x) if x.ndim == 1 else x, y))
    for seed in range(20):
        other_b = b + 0.1 * psd(VOCAB, 10 + seed) / VOCAB
        other_c = c * (1 + 0.1 * torch.randn((), generator=g, dtype=DOUBLE))
        assert error < torch.linalg.matrix_norm(total - torch.kron(other_b, other_c))
        random = torch.kron(psd(VOCAB, 40 + seed), psd(WIDTH, 80 + seed))
        scale = (random * total).sum() / random.square().sum()  # the best multiple of a random Kronecker
        assert error < torch.linalg.matrix_norm(total - scale * random)


def test_a_tied_embedding_and_head_get_the_nearest_kronecker_to_the_sum_of_their_blocks():
    data, loss_fn = token_batches(), nn.CrossEntropyLoss()
    tied = curvops.KFAC(TiedLM().double(), loss_fn, data, fisher_type="type-2")
    assert tied.labels == ("emb.weight", "mix.weight", "mix.bias", "head.bias")
    untied = curvops.KFAC(TiedLM(tie=False).double(), loss_fn, data, fisher_type="type-2")
    total = untied.block("emb.weight").to_dense() + untied.block("head.weight").to_dense()
    block = tied.block("emb.weight")
    torch.testing.assert_close(block.to_dense(), dense_nearest_kronecker(total, VOCAB, WIDTH))
    torch.testing.assert_close(tied.block("head.bias").to_dense(), untied.block("head.bias").to_dense())
    dense = tied.to_dense()
    eye = torch.eye(dense.shape[0], dtype=DOUBLE)
    torch.testing.assert_close(tied.inverse(damping=0.1).to_dense(), torch.linalg.inv(dense + 0.1 * eye))
    torch.testing.assert_close(tied.logdet(damping=0.1), torch.linalg.slogdet(dense + 0.1 * eye)[1])


def test_ekfac_and_tkfac_refuse_a_tied_weight_naming_it_and_the_way_out():
    model, data = TiedLM().double(), token_batches()
    for builder in (curvops.EKFAC, curvops.TKFAC):
        with pytest.raises(ValueError, match=r"tied as 'emb.weight' and 'head.weight'.*Use KFAC, untie"):
            builder(model, nn.CrossEntropyLoss(), data, fisher_type="type-2")
    with pytest.raises(ValueError, match=r"tied as 'emb.weight' and 'head.weight'.*EKFAC"):
        KFACOptimizer(model, nn.CrossEntropyLoss(), curvature="ekfac")
    params = [p for name, p in model.named_parameters() if name != "emb.weight"]
    assert curvops.EKFAC(model, nn.CrossEntropyLoss(), data, params=params).labels == (
        "mix.weight",
        "mix.bias",
        "head.bias",
    )


def test_optimizer_with_a_tied_weight_equals_the_builder_trains_and_resumes():
    loss_fn = nn.CrossEntropyLoss()
    data = token_batches(4)
    model = TiedLM().double()
    builder = curvops.KFAC(copy.deepcopy(model), loss_fn, data[:1], fisher_type="type-2")
    options = {"fisher_type": "type-2", "lr": 0.1, "damping": 0.1, "T_inv": 1}
    opt = KFACOptimizer(model, loss_fn, ema_decay=0.0, **options)
    train_steps(model, opt, loss_fn, data[:1])
    torch.testing.assert_close(opt.curvature_operator().to_dense(), builder.to_dense(), rtol=1e-9, atol=1e-12)
    model = TiedLM().double()
    opt = KFACOptimizer(model, loss_fn, **options)
    losses = train_steps(model, opt, loss_fn, data * 5)
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4])
    assert model.head.weight is model.emb.weight
    twin = TiedLM(seed=3).double()
    assert_resumes_bit_for_bit(
        model, opt, twin, lambda m: KFACOptimizer(m, loss_fn, **options), loss_fn, data
    )


class TwoSequences(nn.Module):
    """One embedding on two token sequences; their vectors added, then a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, 2)

    def forward(self, tokens):
        pooled = self.emb(tokens[:, 0]).mean(1) + self.emb(tokens[:, 1, :2]).mean(1)  # 3 and 2 positions
        return self.head(torch.tanh(pooled))


class ConvTwice(nn.Module):
    """One convolution applied twice (same shape in and out)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, images):
        return self.conv(torch.tanh(self.conv(images))).flatten(1)


@pytest.mark.parametrize(
    ("model", "x", "name"),
    [
        (TwoSequences, lambda g: torch.randint(0, VOCAB, (3, 2, 3), generator=g), "emb.weight"),
        (ConvTwice, lambda g: torch.randn(3, 2, 3, 3, generator=g, dtype=DOUBLE), "conv.weight"),
    ],
)
def test_embeddings_and_convolutions_called_twice_keep_ekfac_and_tkfac_exact_properties(model, x, name):
    model = model().double()
    g = torch.Generator().manual_seed(0)
    inputs = x(g)
    output = model(inputs)
    data = [(inputs, torch.randn(output.shape, generator=g, dtype=DOUBLE))]
    exact = curvops.GGN(model, nn.MSELoss(), data).to_dense()
    size = dict(model.named_parameters())[name].numel()
    block = exact[:size, :size]  # the shared weight is the first parameter
    kfac = curvops.KFAC(model, nn.MSELoss(), data, fisher_type="type-2").block(name)
    bases = [
        torch.diag(torch.ones(len(f), dtype=DOUBLE)) if f.ndim == 1 else torch.linalg.eigh(f)[1]
        for f in kfac.factors
    ]
    basis = torch.kron(*[b.contiguous() for b in bases])
    corrected = basis @ torch.diag(torch.diagonal(basis.T @ block @ basis)) @ basis.T
    ekfac = curvops.EKFAC(model, nn.MSELoss(), data, fisher_type="type-2").block(name)
    torch.testing.assert_close(ekfac.to_dense(), corrected)
    tkfac = curvops.TKFAC(model, nn.MSELoss(), data, fisher_type="type-2").block(name)
    torch.testing.assert_close(tkfac.trace(), block.trace())
