"""A fitted Laplace saved (``state_dict``, ``torch.load(weights_only=True)``) and restored without
the data, in this process and in a fresh one: the same evidence, samples and predictives."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from test_laplace import DOUBLE, batches, network, train
from test_laplace_tuning import LOSSES, _data
from torch import nn

from curvops.laplace import Laplace


def _fitted(kind, curvature="kfac", **options):
    x, y = _data(kind)
    outputs = 3 if kind == "classification" else 2
    model = train(network(outputs=outputs), LOSSES[kind](reduction="sum"), x, y)
    return Laplace(model, LOSSES[kind](), batches(x, y), curvature=curvature, **options), model, x


def _same(restored, la, x):
    torch.testing.assert_close(restored.log_marginal_likelihood(), la.log_marginal_likelihood())
    torch.testing.assert_close(restored.posterior_precision.to_dense(), la.posterior_precision.to_dense())
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(restored.sample(3, generator()), la.sample(3, generator()))
    if la.likelihood == "regression":
        for mine, theirs in zip(restored.predictive(x), la.predictive(x), strict=True):
            torch.testing.assert_close(mine, theirs)
    else:
        torch.testing.assert_close(restored.predictive(x), la.predictive(x))


@pytest.mark.parametrize(
    ("kind", "curvature", "per_parameter"),
    [("classification", "kfac", False), ("classification", "ekfac", True), ("binary", "diagonal", True),
     ("regression", "full", False), ("classification", "full", True)],
)  # fmt: skip
def test_a_saved_posterior_is_the_same_after_torch_load(tmp_path, kind, curvature, per_parameter):
    la, model, x = _fitted(kind, curvature)
    la.optimize_prior_precision(prior_precision=[1.0] * 4 if per_parameter else 1.0, steps=50)
    la.temperature = 0.8
    if kind == "regression":
        la.optimize_prior_precision(learn_sigma_noise=True, steps=50)
    torch.save(la.state_dict(), tmp_path / "laplace.pt")
    state = torch.load(tmp_path / "laplace.pt", weights_only=True)
    moved = copy.deepcopy(model)  # the model's values need not be θ*: the state holds it
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(1.0)
    restored = Laplace.from_state_dict(moved, LOSSES[kind](), state)
    assert restored.sigma_noise == la.sigma_noise and restored.num_terms == la.num_terms
    torch.testing.assert_close(restored.mean, la.mean)
    _same(restored, la, x)


def test_load_state_dict_replaces_a_fitted_posterior():
    la, _, x = _fitted("classification")
    la.optimize_prior_precision(steps=50)
    other, _, _ = _fitted("classification", curvature="diagonal")
    other.load_state_dict(la.state_dict())
    _same(other, la, x)


def test_a_fresh_process_restores_the_same_marglik_and_predictive(tmp_path):
    la, model, x = _fitted("classification", "ekfac")
    la.optimize_prior_precision(steps=50)
    torch.save(la.state_dict(), tmp_path / "laplace.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from torch import nn
        from curvops.laplace import Laplace
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
        model.load_state_dict(torch.load({str(tmp_path / "model.pt")!r}, weights_only=True))
        state = torch.load({str(tmp_path / "laplace.pt")!r}, weights_only=True)
        la = Laplace.from_state_dict(model, nn.CrossEntropyLoss(), state)
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        torch.save([la.log_marginal_likelihood(), la.predictive(x)], {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    marglik, predictive = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(marglik, la.log_marginal_likelihood())
    torch.testing.assert_close(predictive, la.predictive(x))


def test_a_state_of_another_model_or_likelihood_is_refused():
    la, model, _ = _fitted("classification")
    state = la.state_dict()
    with pytest.raises(ValueError, match="'classification' likelihood"):
        Laplace.from_state_dict(model, nn.BCEWithLogitsLoss(), state)
    with pytest.raises(ValueError, match="parameters are"):
        Laplace.from_state_dict(model, nn.CrossEntropyLoss(), state, params=[model[0].weight])
    with pytest.raises(ValueError, match="lacks the keys"):
        Laplace.from_state_dict(model, nn.CrossEntropyLoss(), {k: v for k, v in state.items() if k != "loss"})
    with pytest.raises(ValueError, match="Not a Laplace state_dict"):
        Laplace.from_state_dict(model, nn.CrossEntropyLoss(), model.state_dict())
    wider = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DOUBLE)
    with pytest.raises(ValueError, match="'mean' has shape"):
        Laplace.from_state_dict(wider, nn.CrossEntropyLoss(), state)
