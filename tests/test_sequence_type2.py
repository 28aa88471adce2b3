"""``fisher_type="type-2"`` with a cross-entropy over positions: the loss-Hessian columns factor
each datum's Hessian exactly (one column per class and position), so every per-datum sum —
TKFAC's trace, EKFAC's eigenvalues, the norm blocks, the GGN diagonal — is the GGN's, checked
against ``torch.func`` in float64."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvops
from curvops.nn import losses
from curvops.nn.kfac import kronecker_approximation
from curvops.nn.losses import LossAdapter, loss_hessian_factor

DOUBLE = torch.float64
LOSS = nn.CrossEntropyLoss()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DOUBLE)


class Tagger(nn.Module):
    """Tokens ``[N, S, d]`` through a Linear, a LayerNorm and a head: logits ``[N, C, S]``; with
    ``mixing``, a causal running mean over the tokens after the first Linear."""

    def __init__(self, mixing=False, d=3, hidden=4, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.norm, self.head = (
            nn.Linear(d, hidden),
            nn.LayerNorm(hidden),
            nn.Linear(hidden, classes),
        )
        self.mixing = mixing
        self.double()

    def forward(self, x):
        h = torch.tanh(self.first(x))
        if self.mixing:
            h = h.cumsum(dim=1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype).unsqueeze(-1)
        return self.head(self.norm(h)).movedim(-1, 1)


def dense_ggn(model, x, y, params):
    """``Σ J^T ∇²_f L J`` over ``params`` (names), by ``torch.func``."""
    shapes = [dict(model.named_parameters())[n].shape for n in params]
    theta = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in params])

    def output(t):
        parts = t.split([math.prod(s) for s in shapes])
        values = {n: p.reshape(s) for n, p, s in zip(params, parts, shapes, strict=True)}
        return functional_call(model, values, (x,)).reshape(-1)

    out = output(theta).detach()
    shape = model(x).shape
    lam = hessian(lambda o: LOSS(o.reshape(shape), y))(out)
    jac = jacrev(output)(theta)
    return jac.T @ lam @ jac


def data(n=2, s=4, seed=1):
    return randn(n, s, 3, seed=seed), torch.randint(
        0, 3, (n, s), generator=torch.Generator().manual_seed(seed)
    )


def test_the_columns_factor_each_datums_whole_hessian():
    """Σ_k s_k s_k^T over a datum's positions is its Hessian: block-diagonal over positions."""
    output, y = randn(2, 3, 4, seed=2), torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
    adapter = LossAdapter(LOSS)
    scale = adapter.batch_scale(adapter.count(y))
    full = hessian(lambda o: scale * LOSS(o, y))(output).reshape(2, 12, 2, 12)
    s = loss_hessian_factor(adapter, output, y)
    assert s.shape == (12, 2, 3, 4)
    products = torch.einsum("kni,knj->nij", s.flatten(2), s.flatten(2))
    for n in range(2):
        torch.testing.assert_close(products[n], full[n, :, n])


@pytest.mark.parametrize("mixing", [False, True])
def test_tkfac_trace_is_the_ggn_trace(mixing):
    model, (x, y) = Tagger(mixing), data()
    params = ["first.weight", "first.bias"]
    truth = dense_ggn(model, x, y, params)
    tkfac = curvops.TKFAC(
        model, LOSS, [(x, y)], params=[model.first.weight, model.first.bias], fisher_type="type-2"
    )
    torch.testing.assert_close(tkfac.block("first.weight").trace(), truth[:12, :12].trace())
    torch.testing.assert_close(tkfac.block("first.bias").trace(), truth[12:, 12:].trace())


@pytest.mark.parametrize("name", ["ekfac", "tekfac"])
def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_its_eigenbasis(name):
    model, (x, y) = Tagger(mixing=True), data()
    op = kronecker_approximation(
        name, model, LOSS, [(x, y)], params=[model.first.weight], fisher_type="type-2"
    )
    block = op.block("first.weight")
    basis = torch.kron(*block.eigenvectors)
    truth = dense_ggn(model, x, y, ["first.weight"])
    torch.testing.assert_close(
        torch.diag(basis.T @ block.to_dense() @ basis), torch.diag(basis.T @ truth @ basis)
    )


@pytest.mark.parametrize("mixing", [False, True])
def test_the_norm_block_is_the_ggn_block(mixing):
    model, (x, y) = Tagger(mixing), data()
    norm = [model.norm.weight, model.norm.bias]
    kfac = curvops.KFAC(model, LOSS, [(x, y)], params=norm, fisher_type="type-2", bias="joint")
    torch.testing.assert_close(kfac.to_dense(), dense_ggn(model, x, y, ["norm.weight", "norm.bias"]))


def test_one_token_per_sequence_of_a_token_wise_model_is_exact():
    """Without mixing and with one position, KFAC equals the GGN; with several positions its G is
    the sum of their own Hessians (no products between positions)."""
    model, (x, y) = Tagger(), data(n=1, s=1)
    kfac = curvops.KFAC(model, LOSS, [(x, y)], params=[model.head.weight], fisher_type="type-2")
    torch.testing.assert_close(kfac.to_dense(), dense_ggn(model, x, y, ["head.weight"]))


def test_the_laplace_diagonal_takes_outputs_over_positions():
    """(Laplace's curvature is that of the summed loss: the mean's times the loss terms.)"""
    model, (x, y) = Tagger(mixing=True), data()
    laplace = curvops.Laplace(model, LOSS, [(x, y)], curvature="diagonal", prior_precision=1.0)
    names = [n for n, _ in model.named_parameters()]
    truth = torch.diag(dense_ggn(model, x, y, names)) * y.numel()
    torch.testing.assert_close(laplace.curvature.diagonal(), truth)


def test_too_many_columns_are_refused_naming_the_fix(monkeypatch):
    monkeypatch.setattr(losses, "MAX_FACTOR_NUMBERS", 100)
    model, (x, y) = Tagger(), data()
    with pytest.raises(
        ValueError, match=r"Batch 0: fisher_type='type-2' with a cross-entropy over 4 positions.*'mc'"
    ):
        curvops.KFAC(model, LOSS, [(x, y)], params=[model.head.weight], fisher_type="type-2")
