"""ModelData's per-batch check (``check_deterministic``) on batches whose inputs are trees.

The per-batch check uses the pass check's fingerprint (:class:`curvops.nn.passes.Fingerprint`):
every tensor of ``X`` and ``y``, however nested, so a shuffled loader of dict inputs is
reported as changed *data*. The operator of a fixed loader is checked against a dense
float64 GGN from ``torch.func``.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvops

DOUBLE = torch.float64
ROWS, BATCH = 12, 4


class TwoInputs(nn.Module):
    """``f({"a": a, "b": b}) = A a + B b``: a model whose inputs are a dict."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.a(x["a"]) + self.b(x["b"])


class DictLoader:
    """Re-iterable ``({"a": a, "b": b}, y)`` batches, the rows permuted anew per pass if ``shuffle``."""

    def __init__(self, a, b, y, shuffle):
        self.a, self.b, self.y, self.shuffle = a, b, y, shuffle
        self.generator = torch.Generator().manual_seed(0)

    def __iter__(self):
        order = torch.randperm(ROWS, generator=self.generator) if self.shuffle else torch.arange(ROWS)
        for rows in order.split(BATCH):
            yield {"a": self.a[rows], "b": self.b[rows]}, self.y[rows]


def _problem(shuffle):
    torch.manual_seed(0)
    model = TwoInputs().double()
    a, b = torch.randn(ROWS, 3, dtype=DOUBLE), torch.randn(ROWS, 2, dtype=DOUBLE)
    y = torch.ones(ROWS, dtype=torch.long)  # the same label everywhere: only X tells passes apart
    return model, DictLoader(a, b, y, shuffle), (a, b, y)


def _dense_ggn(model, a, b, y):
    """``J^T ∇²_f L J`` of the mean cross-entropy over all rows, by torch.func in float64."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def outputs(flat):
        values = dict(zip(names, flat.split([s.numel() for s in shapes]), strict=True))
        values = {name: v.reshape(s) for (name, v), s in zip(values.items(), shapes, strict=True)}
        return functional_call(model, values, ({"a": a, "b": b},)).reshape(-1)

    jac = jacrev(outputs)(theta)
    loss_hessian = hessian(lambda f: nn.functional.cross_entropy(f.reshape(ROWS, -1), y))(outputs(theta))
    return jac.T @ loss_hessian @ jac


def test_shuffled_dict_inputs_are_reported_as_changed_data():
    model, loader, _ = _problem(shuffle=True)
    op = curvops.GGN(model, nn.CrossEntropyLoss(), loader, check_deterministic=True)
    v = torch.ones(op.shape[0], dtype=DOUBLE)
    with pytest.raises(curvops.NonDeterministicDataError, match=r"Batch 0: the data changed between passes"):
        for _ in range(3):
            op @ v


def test_without_the_per_batch_check_a_shuffled_loader_gives_the_same_ggn():
    model, loader, (a, b, y) = _problem(shuffle=True)
    op = curvops.GGN(model, nn.CrossEntropyLoss(), loader)
    for _ in range(2):  # order-free totals agree on every pass
        torch.testing.assert_close(op.to_dense(), _dense_ggn(model, a, b, y))


def test_fixed_dict_loader_passes_the_per_batch_check():
    model, loader, (a, b, y) = _problem(shuffle=False)
    op = curvops.GGN(model, nn.CrossEntropyLoss(), loader, check_deterministic=True)
    torch.testing.assert_close(op.to_dense(), _dense_ggn(model, a, b, y))
    torch.testing.assert_close(op.to_dense(), _dense_ggn(model, a, b, y))
