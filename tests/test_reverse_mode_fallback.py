"""Models with an operation that has no forward-mode derivative (``nn.MultiheadAttention``'s fused
kernel in eval mode): ``J V`` falls back to reverse over reverse, checked against a dense
float64 truth from ``torch.func.jacrev``."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvops
from curvops.nn.layers import OPAQUE_MODULES


class Attention(nn.Module):
    """Self-attention over 3 tokens, mean-pooled, then a linear read-out to 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attention(x, x, x)[0].mean(1))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Attention().double().eval()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    return model, x, y


def _dense_jacobian(model, x):
    params = {name: p.detach() for name, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    return torch.cat([jac[name].reshape(x.shape[0] * 3, -1) for name in params], dim=1)  # [N·C, D]


def test_the_fused_attention_kernel_has_no_forward_mode_derivative(setup):
    """The premise: forward mode fails on this model, so the fallback is what is tested."""
    model, x, _ = setup
    params = {name: p.detach() for name, p in model.named_parameters()}
    tangents = {name: torch.ones_like(p) for name, p in params.items()}
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangents,))


def test_ggn_of_eval_mode_attention_matches_dense_truth(setup):
    model, x, y = setup
    loss_fn = nn.CrossEntropyLoss()
    jac = _dense_jacobian(model, x)
    with torch.no_grad():
        output = model(x)
    curvature = hessian(lambda o: loss_fn(o, y))(output).reshape(output.numel(), output.numel())
    truth = jac.T @ curvature @ jac
    ggn = curvops.GGN(model, loss_fn, [(x[:2], y[:2]), (x[2:], y[2:])])
    torch.testing.assert_close(ggn.to_dense(), truth, rtol=1e-10, atol=1e-12)


def test_jacobian_of_eval_mode_attention_matches_dense_truth(setup):
    model, x, _ = setup
    jac = curvops.Jacobian(model, [(x, None)])
    vectors = torch.randn(jac.shape[1], 2, dtype=torch.float64)
    torch.testing.assert_close(jac @ vectors, _dense_jacobian(model, x) @ vectors, rtol=1e-10, atol=1e-12)


def test_kfac_gives_attention_an_exact_dense_block(setup, monkeypatch):
    """An attention taken as a module without a rule (its projections have Kronecker blocks since
    issue 13): the exact dense block through the reverse-mode fallback."""
    monkeypatch.setitem(OPAQUE_MODULES, nn.MultiheadAttention, "treated as opaque by this test")
    model, x, y = setup
    loss_fn = nn.CrossEntropyLoss()
    kfac = curvops.KFAC(model, loss_fn, [(x, y)], fisher_type="type-2", unsupported="dense")
    ggn = curvops.GGN(model, loss_fn, [(x, y)]).to_dense()
    size = sum(p.numel() for p in model.attention.parameters())
    torch.testing.assert_close(kfac.block("attention").to_dense(), ggn[:size, :size], rtol=1e-10, atol=1e-12)
