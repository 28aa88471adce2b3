"""Real pipelines through the layer kinds of issue 13 (attention, norms, grouped convolutions,
shared modules): a shuffled loader of uneven batches with padding labels gives the one-batch
operator, train mode without randomness gives the eval-mode one, a bf16 model gets float32
statistics, and no builder changes the model or returns a tensor with an autograd graph."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_models import TinyGPT, TinyResNet

IGNORE = -100
BUILDERS = {
    "kfac": lambda *a, **o: curvops.KFAC(*a, fisher_type="type-2", **o),
    "ekfac": lambda *a, **o: curvops.EKFAC(*a, fisher_type="empirical", **o),
    "tkfac": lambda *a, **o: curvops.TKFAC(*a, fisher_type="type-2", **o),
}


class Depthwise(nn.Module):
    """A depthwise and a pointwise convolution, pooling and a head: ``[N, 4, 5, 5] -> [N, 3]``."""

    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect")
        self.pointwise = nn.Conv2d(4, 3, 1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.pointwise(torch.tanh(self.depthwise(x)))).mean(dim=(2, 3)))


def shared_module() -> nn.Module:
    layer = nn.Linear(3, 3)
    return nn.Sequential(layer, nn.Tanh(), layer, nn.Tanh(), nn.Linear(3, 3))


def setup(kind: str, n: int = 12):
    """A float64 model, its inputs and labels (the first rows' labels are padding)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "gpt":
        model = TinyGPT(vocabulary=5, width=4, layers=1, heads=2, tokens=3)
        x, y = torch.randint(0, 5, (n, 3), generator=g), torch.randint(0, 5, (n, 3), generator=g)
        y[:4, 1:] = IGNORE
    elif kind == "depthwise":
        model = Depthwise()
        x, y = torch.randn(n, 4, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
        y[:4] = IGNORE
    elif kind == "resnet":
        model = TinyResNet(channels_in=1, channels=2, classes=3).eval()
        x, y = torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
        y[:4] = IGNORE
    else:
        model = shared_module()
        x, y = torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)
        y[:4] = IGNORE
    return model.double(), x.double() if x.is_floating_point() else x, y


def loss_fn():
    return nn.CrossEntropyLoss(ignore_index=IGNORE)


def probe(op, seed=3):
    v = torch.randn(op.shape[1], generator=torch.Generator().manual_seed(seed), dtype=op.dtype)
    return op @ v


KINDS = ["gpt", "depthwise", "resnet", "shared"]


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("kind", KINDS)
def test_a_shuffled_uneven_padded_loader_gives_the_one_batch_operator(kind, name):
    model, x, y = setup(kind)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    one_batch = BUILDERS[name](model, loss_fn(), [(x, y)])
    torch.testing.assert_close(probe(BUILDERS[name](model, loss_fn(), loader)), probe(one_batch))


@pytest.mark.parametrize("kind", ["gpt", "depthwise", "shared"])
def test_train_mode_without_randomness_gives_the_eval_mode_operator(kind):
    model, x, y = setup(kind)
    evaluated = curvops.EKFAC(model.eval(), loss_fn(), [(x, y)], fisher_type="empirical")
    trained = curvops.EKFAC(model.train(), loss_fn(), [(x, y)], fisher_type="empirical")
    torch.testing.assert_close(probe(trained), probe(evaluated))


@pytest.mark.parametrize("kind", KINDS)
def test_a_bf16_model_gets_float32_statistics_near_the_float32_operator(kind):
    model, x, y = setup(kind)
    model32, model16 = copy.deepcopy(model).float(), copy.deepcopy(model).bfloat16()
    x32, x16 = (x.float(), x.bfloat16()) if x.is_floating_point() else (x, x)
    reference = curvops.KFAC(model32, loss_fn(), [(x32, y)], fisher_type="type-2")
    op = curvops.KFAC(model16, loss_fn(), [(x16, y)], fisher_type="type-2")
    assert op.dtype == torch.bfloat16
    assert {type(block).__name__ for block in op.blocks} == {"Cast"}
    error = torch.linalg.norm(op.to_dense().float() - reference.to_dense())
    assert error / torch.linalg.norm(reference.to_dense()) < 0.05


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("kind", KINDS)
def test_no_builder_changes_the_model_or_returns_a_graph(kind, name):
    model, x, y = setup(kind)
    objects = [id(p) for p in model.parameters()]
    values = copy.deepcopy(model.state_dict())
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    forward = {id(m): m.forward for m in model.modules()}
    output = model(x).detach()
    op = BUILDERS[name](model, loss_fn(), [(x, y)])
    product = probe(op)
    assert not product.requires_grad and product.grad_fn is None
    assert [id(p) for p in model.parameters()] == objects
    for key, value in model.state_dict().items():
        assert torch.equal(value, values[key]), key
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert all(m.forward == forward[id(m)] for m in model.modules())
    torch.testing.assert_close(model(x), output, rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
