"""Fit once, score many (``Influence``): one build of ``F`` for every query set, self and
leave-one-out scores; saved (torch, safetensors) and restored without refitting, with the same
scores as the one-shot functions."""

import pytest
import torch
from helpers import DOUBLE, generator
from test_influence import CE, _batches, _model
from test_influence_measurements import margin

import curvops.influence.problem as problem_module
from curvops.influence import Influence, influence_scores, leave_one_out_scores, self_influence


@pytest.fixture
def data():
    model = _model()
    x = torch.randn(12, 4, generator=generator(0), dtype=DOUBLE)
    y = torch.randint(0, 2, (12,), generator=generator(1))
    queries = [
        (
            torch.randn(3, 4, generator=generator(2 + k), dtype=DOUBLE),
            torch.randint(0, 2, (3,), generator=generator(9)),
        )
        for k in range(3)
    ]
    return model, _batches(x, y, [5, 7]), queries


@pytest.fixture
def builds(monkeypatch):
    """The number of curvature builds."""
    calls = []
    real = problem_module._build
    monkeypatch.setattr(problem_module, "_build", lambda *a, **o: calls.append(1) or real(*a, **o))
    return calls


@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "diagonal", "ggn"])
def test_one_fit_serves_every_query_set_and_equals_the_functions(data, builds, curvature):
    model, train, queries = data
    influence = Influence(model, CE, train, curvature=curvature, damping=0.1)
    for query in queries:
        torch.testing.assert_close(
            influence.scores(query), influence_scores(model, CE, train, query, curvature, 0.1)
        )
    parts = influence.scores(queries[0], measurement=margin, per_module=True)
    expected = influence_scores(
        model, CE, train, queries[0], curvature, 0.1, measurement=margin, per_module=True
    )
    assert list(parts) == list(expected)
    for label in parts:
        torch.testing.assert_close(parts[label], expected[label])
    torch.testing.assert_close(influence.self_influence(), self_influence(model, CE, train, curvature, 0.1))
    torch.testing.assert_close(
        influence.leave_one_out(queries[1], removed=[0, 4]),
        leave_one_out_scores(model, CE, train, queries[1], [0, 4], curvature, 0.1, fisher_type="type-2"),
    )
    calls = len(builds)
    influence.scores(queries[2])
    influence.self_influence()
    assert len(builds) == calls  # no build after the first use
    assert influence.curvature.shape == (23, 23)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_saved_influence_scores_the_same_without_refitting(tmp_path, data, builds, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    model, train, queries = data
    influence = Influence(model, CE, train, curvature="ekfac", damping="heuristic").fit()
    path = tmp_path / f"influence{suffix}"
    influence.save(path)
    built = len(builds)
    again = Influence.load(path, model, CE, train, train_batch_size=5, query_batch_size=2)
    for query in queries:
        torch.testing.assert_close(again.scores(query), influence.scores(query))
    torch.testing.assert_close(again.self_influence(), influence.self_influence())
    assert len(builds) == built  # restored, not rebuilt
    if suffix == ".pt":
        state = torch.load(path, weights_only=True)
        assert state["format"] == "curvops.influence/1" and state["damping"] == "heuristic"


def test_a_state_of_other_parameters_is_refused(data):
    model, train, _ = data
    state = Influence(model, CE, train, curvature="kfac").state_dict()
    with pytest.raises(ValueError, match=r"shape \(23, 23\)"):
        Influence.from_state_dict(state, model, CE, train, params=[model[0].weight, model[0].bias])
    reordered = [model[0].bias, model[0].weight, model[2].weight, model[2].bias]  # the same D
    with pytest.raises(ValueError, match="parameters are"):
        Influence.from_state_dict(state, model, CE, train, params=reordered)
    with pytest.raises(ValueError, match="Not an Influence state_dict"):
        Influence.from_state_dict(model.state_dict(), model, CE, train)
    with pytest.raises(TypeError, match="from_state_dict takes"):
        Influence.from_state_dict(state, model, CE, train, damping=1.0)
