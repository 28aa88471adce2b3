"""Issue 11, item 22: the influence functions take the curvature builder's options
(``curvature_options=``), check them, and recommend them for a model with a module without a
Kronecker rule (an ``nn.PReLU``; a LayerNorm has its exact block)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvops
from curvops.influence import (
    influence_curvature,
    influence_scores,
    leave_one_out_scores,
    self_influence,
)

DAMPING = 1e-2


def _layernorm_model() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)]
    model = nn.Sequential(*layers).double().eval()
    with torch.no_grad():  # LayerNorm's affine parameters away from their (1, 0) start
        model[1].weight.add_(0.3 * torch.randn(4, dtype=torch.float64))
        model[1].bias.add_(0.3 * torch.randn(4, dtype=torch.float64))
    return model


def _data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, dtype=torch.float64, generator=generator)
    return x, torch.randint(0, 3, (count,), generator=generator)


def _per_example_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[D, N]``: ``∇ℓ_n`` of the summed cross-entropy of each datum on its own, by autograd."""
    params = list(model.parameters())
    columns = []
    for n in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1], reduction="sum")
        columns.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(columns, dim=1)


def _dense_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(1/N) Σ_n J_n^T ∇²_f ℓ_n J_n`` of the mean cross-entropy, from torch.func Jacobians."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(flat: torch.Tensor) -> torch.Tensor:
        pieces = flat.split([s.numel() for s in shapes])
        tensors = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return functional_call(model, tensors, (x,))

    jacobian = jacrev(outputs)(theta)  # [N, C, D]
    output = outputs(theta).detach()
    output_hessian = hessian(lambda f: nn.functional.cross_entropy(f, y))(output)  # [N, C, N, C]
    return torch.einsum("nca,ncmd,mdb->ab", jacobian, output_hessian, jacobian)


def _truth_scores(model, train, query, curvature: torch.Tensor) -> torch.Tensor:
    """``∇ℓ_t^T (F + λI)^-1 ∇ℓ_n`` with the dense float64 ``F``."""
    train_gradients = _per_example_gradients(model, *train)
    query_gradients = _per_example_gradients(model, *query)
    damped = curvature + DAMPING * torch.eye(curvature.shape[0], dtype=torch.float64)
    return query_gradients.T @ torch.linalg.solve(damped, train_gradients)


def test_kfac_with_layernorm_matches_dense_truth():
    model, train, query = _layernorm_model(), _data(10, 1), _data(3, 2)
    loss = nn.CrossEntropyLoss()
    direct = curvops.KFAC(model, loss, [train], fisher_type="type-2", bias="joint", unsupported="dense")
    dense_kfac = direct.to_dense()
    # the LayerNorm block (parameters 16..23) is the exact GGN's block
    ggn = _dense_ggn(model, *train)
    torch.testing.assert_close(dense_kfac[16:24, 16:24], ggn[16:24, 16:24])
    options = {"unsupported": "dense"}
    scores = influence_scores(
        model, loss, train, query, "kfac", DAMPING, curvature_options=options, train_batch_size=4
    )
    torch.testing.assert_close(scores, _truth_scores(model, train, query, dense_kfac))
    own = self_influence(model, loss, train, "kfac", DAMPING, curvature_options=options)
    torch.testing.assert_close(own, _truth_scores(model, train, train, dense_kfac).diagonal())
    built = influence_curvature(model, loss, train, "kfac", curvature_options=options)
    torch.testing.assert_close(built.to_dense(), dense_kfac)


def test_ggn_with_layernorm_matches_torch_func_ggn():
    model, train, query = _layernorm_model(), _data(10, 1), _data(3, 2)
    ggn = _dense_ggn(model, *train)
    scores = influence_scores(
        model,
        nn.CrossEntropyLoss(),
        train,
        query,
        "ggn",
        DAMPING,
        curvature_options={"check_deterministic": True},
    )
    torch.testing.assert_close(scores, _truth_scores(model, train, query, ggn))


def test_options_reach_the_builder():
    model, train = _layernorm_model(), _data(10, 1)
    loss = nn.CrossEntropyLoss()
    mc = influence_curvature(
        model, loss, train, "ggn", fisher_type="mc", curvature_options={"mc_samples": 3, "seed": 5}
    )
    expected = curvops.FisherMC(model, loss, [train], mc_samples=3, seed=5).to_dense()
    torch.testing.assert_close(mc.to_dense(), expected)
    diagonal = influence_curvature(
        model, loss, train, "ekfac", curvature_options={"unsupported": "diagonal", "correction": "gramian"}
    )
    direct = curvops.EKFAC(
        model, loss, [train], fisher_type="type-2", bias="joint", unsupported="diagonal", correction="gramian"
    )
    torch.testing.assert_close(diagonal.to_dense(), direct.to_dense())


def _prelu_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Tanh(), nn.Linear(4, 3)).double().eval()


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "tkfac", "tekfac"])
def test_unsupported_module_error_recommends_what_works(curvature):
    model, train, query = _prelu_model(), _data(6, 1), _data(2, 2)
    loss = nn.CrossEntropyLoss()
    calls = [
        lambda **kw: influence_scores(model, loss, train, query, curvature, DAMPING, **kw),
        lambda **kw: self_influence(model, loss, train, curvature, DAMPING, **kw),
        lambda **kw: leave_one_out_scores(model, loss, train, query, 0, curvature, DAMPING, **kw),
        lambda **kw: influence_curvature(model, loss, train, curvature, **kw),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"'1' \(PReLU\).*curvature_options=\{'unsupported': 'dense'\}"):
            call()
        result = call(curvature_options={"unsupported": "dense"})  # the recommendation works
        dense = result.to_dense() if isinstance(result, curvops.CurvatureOperator) else result
        assert torch.isfinite(dense).all()


def _call_with(options, curvature="kfac", fisher_type="type-2"):
    model, train, query = _layernorm_model(), _data(6, 1), _data(2, 2)
    return influence_scores(
        model,
        nn.CrossEntropyLoss(),
        train,
        query,
        curvature,
        DAMPING,
        fisher_type=fisher_type,
        curvature_options=options,
    )


@pytest.mark.parametrize(
    ("options", "curvature", "fisher_type", "message"),
    [
        ({"unsupportd": "dense"}, "kfac", "type-2", r"'unsupportd'.*KFAC.*unsupported, check_deterministic"),
        (
            {"correction": "gramian"},
            "kfac",
            "type-2",
            r"\['correction'\] is not an option of curvature='kfac'",
        ),
        ({"mc_samples": 2}, "ggn", "type-2", r"'mc_samples'.*GGN\); it takes check_deterministic"),
        ({"seed": 1}, "identity", "type-2", r"'seed'.*curvature='identity'.*takes no curvature_options"),
        ({"seed": 1}, "diagonal", "empirical", r"'seed'.*takes no curvature_options"),
        ({"fisher_type": "mc"}, "kfac", "type-2", r"'fisher_type'.*pass fisher_type= to it instead"),
        ({"bias": "separate"}, "kfac", "type-2", r"'bias'.*pass bias="),
        ({"params": []}, "ggn", "type-2", r"'params'.*pass params="),
        ({"data": []}, "kfac", "type-2", r"'data'.*pass train_data="),
        ({"eigenvalue_correction": True}, "tkfac", "type-2", r"'eigenvalue_correction'"),
        ({"unsupported": "bogus"}, "kfac", "type-2", r"unsupported"),
    ],
)
def test_bad_options_raise_naming_the_key(options, curvature, fisher_type, message):
    with pytest.raises(ValueError, match=message):
        _call_with(options, curvature, fisher_type)


def test_options_with_a_prebuilt_operator_or_not_a_dict_raise():
    model, train, query = _layernorm_model(), _data(6, 1), _data(2, 2)
    loss = nn.CrossEntropyLoss()
    prebuilt = influence_curvature(model, loss, train, "ggn")
    with pytest.raises(ValueError, match="prebuilt operator"):
        influence_scores(model, loss, train, query, prebuilt, curvature_options={"unsupported": "dense"})
    with pytest.raises(TypeError, match="curvature_options must be a dict"):
        _call_with([("unsupported", "dense")])
    # an empty dict is no options
    torch.testing.assert_close(
        influence_scores(model, loss, train, query, prebuilt, DAMPING, curvature_options={}),
        influence_scores(model, loss, train, query, prebuilt, DAMPING),
    )
