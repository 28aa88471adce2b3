"""Last-layer Laplace from features (``params="last_layer"``): the posterior of ``params=[W, b]``
on the whole network, without passes through the body but one; clear errors where the last
module is no ``nn.Linear`` producing the output."""

import pytest
import torch
from test_laplace import DOUBLE, batches, train
from test_laplace_tuning import LOSSES, _data
from torch import nn

from curvops.laplace import Laplace


def _deep(outputs):
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, outputs)).to(
        DOUBLE
    )


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "full", "diagonal"])
@pytest.mark.parametrize("kind", ["classification", "regression", "binary"])
def test_last_layer_is_the_posterior_of_its_parameters(kind, curvature):
    x, y = _data(kind)
    model = train(_deep(3 if kind == "classification" else 2), LOSSES[kind](reduction="sum"), x, y)
    head = model[4]
    options = {"curvature": curvature, "prior_precision": 0.7}
    if kind == "regression":
        options["sigma_noise"] = 0.3
    last = Laplace(model, LOSSES[kind](), batches(x, y), params="last_layer", **options)
    explicit = Laplace(model, LOSSES[kind](), batches(x, y), params=[head.weight, head.bias], **options)
    assert last.param_names == ["4.weight", "4.bias"] == explicit.param_names
    torch.testing.assert_close(last.mean, explicit.mean)
    torch.testing.assert_close(last.loss, explicit.loss)
    torch.testing.assert_close(last.posterior_precision.to_dense(), explicit.posterior_precision.to_dense())
    torch.testing.assert_close(last.log_marginal_likelihood(), explicit.log_marginal_likelihood())
    x_test = torch.randn(4, 4, generator=torch.Generator().manual_seed(8), dtype=DOUBLE)
    mine, theirs = last.predictive(x_test), explicit.predictive(x_test)
    for a, b in zip(
        mine if isinstance(mine, tuple) else [mine],
        theirs if isinstance(theirs, tuple) else [theirs],
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_the_body_runs_forward_once_per_batch_and_never_backward(monkeypatch):
    x, y = _data("classification")
    model = train(_deep(3), nn.CrossEntropyLoss(reduction="sum"), x, y)
    calls = {"forward": 0, "backward": 0}
    body = model[0]
    body.register_forward_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    body.register_full_backward_hook(lambda *a: calls.__setitem__("backward", calls["backward"] + 1))
    Laplace(model, nn.CrossEntropyLoss(), batches(x, y), params="last_layer", curvature="kfac")
    assert calls == {"forward": 2, "backward": 0}  # one per batch


def test_models_without_a_linear_last_layer_are_refused():
    x, y = _data("classification")
    conv_last = nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 3, 4), nn.Flatten()).to(DOUBLE)
    with pytest.raises(ValueError, match=r"nn.Linear last layer.*'1' \(Conv1d\)"):
        Laplace(conv_last, nn.CrossEntropyLoss(), (x, y), params="last_layer")

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)

        def forward(self, z):
            return 2 * self.head(z)

    with pytest.raises(ValueError, match="is not the model's output"):
        Laplace(Scaled().to(DOUBLE), nn.CrossEntropyLoss(), (x, y), params="last_layer")
    with pytest.raises(ValueError, match="params must be parameters or 'last_layer'"):
        Laplace(_deep(3), nn.CrossEntropyLoss(), (x, y), params="last")


def test_a_saved_last_layer_posterior_restores_on_its_parameters():
    x, y = _data("classification")
    model = train(_deep(3), nn.CrossEntropyLoss(reduction="sum"), x, y)
    la = Laplace(model, nn.CrossEntropyLoss(), batches(x, y), params="last_layer")
    restored = Laplace.from_state_dict(model, nn.CrossEntropyLoss(), la.state_dict())
    assert restored.param_names == ["4.weight", "4.bias"]
    torch.testing.assert_close(restored.predictive(x[:3]), la.predictive(x[:3]))


class _SharedBody(nn.Module):
    """A body whose linear layer runs twice (shared), then the head."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


@pytest.mark.filterwarnings("ignore:The parameters are not at a minimum")  # an untrained model
def test_a_real_pipeline_gives_the_one_batch_last_layer_posterior():
    """A shuffled loader of uneven batches with ignore_index labels, a shared body layer, train
    mode without randomness: the posterior of one batch in eval mode; the model untouched."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(6)
    model = _SharedBody().to(DOUBLE)
    x, y = _data("classification", n=23)
    y[:4] = -100
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(
        TensorDataset(x, y), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    shuffled = Laplace(model.train(), loss_fn, loader, params="last_layer", curvature="kfac")
    reference = Laplace(model.eval(), loss_fn, [(x, y)], params="last_layer", curvature="kfac")
    assert shuffled.num_terms == reference.num_terms == 19
    torch.testing.assert_close(shuffled.log_marginal_likelihood(), reference.log_marginal_likelihood())
    torch.testing.assert_close(shuffled.predictive(x[:3]), reference.predictive(x[:3]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not shuffled.predictive(x[:3]).requires_grad
