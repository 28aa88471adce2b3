"""EKFAC, TKFAC and TEKFAC against the exact block-diagonal GGN and against KFAC (and KFAC
itself where all four are exact: weight sharing in its setting, embeddings)."""

import pytest
import torch
from helpers import DOUBLE, generator
from model_truth import Truth
from test_kfac import ConvNet, Tokens, _batches, _block_diagonal, _deep_linear, _groups, _mlp
from torch import nn

import curvops
from curvops.nn.layers.per_datum import correction_strategy

APPROXIMATIONS = {
    "kfac": lambda *args, **kwargs: curvops.KFAC(*args, **kwargs),
    "ekfac": lambda *args, **kwargs: curvops.EKFAC(*args, **kwargs),
    "tkfac": lambda *args, **kwargs: curvops.TKFAC(*args, **kwargs),
    "tekfac": lambda *args, **kwargs: curvops.TKFAC(*args, eigenvalue_correction=True, **kwargs),
}


@pytest.mark.parametrize("name", ["ekfac", "tkfac", "tekfac"])
@pytest.mark.parametrize("bias", ["separate", "joint"])
def test_exact_where_kfac_is_exact(name, bias):
    build = APPROXIMATIONS[name]
    model = _deep_linear()
    x = torch.randn(9, 4, generator=generator(0), dtype=DOUBLE)
    y = torch.randn(9, 2, generator=generator(1), dtype=DOUBLE)
    loss_fn = nn.MSELoss()
    op = build(model, loss_fn, _batches(x, y, [4, 2, 3]), fisher_type="type-2", bias=bias)
    expected = _block_diagonal(Truth(model, loss_fn, x, y).ggn(), _groups(model, joint=bias == "joint"))
    torch.testing.assert_close(op.to_dense(), expected)
    one = _mlp()
    xo, yo = torch.randn(1, 4, generator=generator(2), dtype=DOUBLE), torch.tensor([1])
    single = build(one, nn.CrossEntropyLoss(), [(xo, yo)], fisher_type="type-2", bias=bias)
    exact = Truth(one, nn.CrossEntropyLoss(), xo, yo).ggn()
    torch.testing.assert_close(single.to_dense(), _block_diagonal(exact, _groups(one, joint=bias == "joint")))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", sorted(APPROXIMATIONS))
def test_weight_sharing_exact_in_its_setting(name, approx):
    torch.manual_seed(0)
    model = Tokens(pool=approx == "reduce").double()
    x = torch.randn(6, 5, 4, generator=generator(0), dtype=DOUBLE)
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=generator(1), dtype=DOUBLE)
    loss_fn = nn.MSELoss()
    op = APPROXIMATIONS[name](
        model, loss_fn, _batches(x, y, [2, 4]), fisher_type="type-2", kfac_approx=approx
    )
    torch.testing.assert_close(
        op.to_dense(), _block_diagonal(Truth(model, loss_fn, x, y).ggn(), _groups(model))
    )


@pytest.mark.parametrize("name", sorted(APPROXIMATIONS))
def test_embedding_exact_per_token(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 3, padding_idx=0), nn.Linear(3, 2)).double()
    x = torch.randint(0, 7, (6, 4), generator=generator(0))
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=generator(1), dtype=DOUBLE)
    loss_fn = nn.MSELoss()
    op = APPROXIMATIONS[name](model, loss_fn, _batches(x, y, [2, 4]), fisher_type="type-2")
    torch.testing.assert_close(
        op.to_dense(), _block_diagonal(Truth(model, loss_fn, x, y).ggn(), _groups(model))
    )
    if name in ("kfac", "tkfac"):
        assert op.block("0.weight").factors[0].ndim == 1  # [num_embeddings]: diagonal


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_corrected_eigenvalues_are_never_farther_from_the_true_blocks(model_name, fisher_type):
    model = _mlp() if model_name == "mlp" else _cnn()
    shape = (10, 4) if model_name == "mlp" else (10, 2, 4, 4)
    x = torch.randn(shape, generator=generator(0), dtype=DOUBLE)
    y = torch.randint(0, 3, (10,), generator=generator(1))
    loss_fn = nn.CrossEntropyLoss()
    data = _batches(x, y, [6, 4])
    truth = Truth(model, loss_fn, x, y)
    exact = _block_diagonal(
        truth.ggn() if fisher_type == "type-2" else truth.empirical_fisher(), _groups(model)
    )

    def error(op):
        return (op.to_dense() - exact).norm().item()

    kfac = error(curvops.KFAC(model, loss_fn, data, fisher_type=fisher_type))
    ekfac = error(curvops.EKFAC(model, loss_fn, data, fisher_type=fisher_type))
    tkfac = error(curvops.TKFAC(model, loss_fn, data, fisher_type=fisher_type))
    tekfac = error(curvops.TKFAC(model, loss_fn, data, fisher_type=fisher_type, eigenvalue_correction=True))
    assert ekfac <= kfac * (1 + 1e-10) and tekfac <= tkfac * (1 + 1e-10)
    assert ekfac < kfac and tekfac < tkfac


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_tkfac_keeps_every_blocks_trace(model_name):
    model = _mlp() if model_name == "mlp" else _cnn()
    shape = (10, 4) if model_name == "mlp" else (10, 2, 4, 4)
    x = torch.randn(shape, generator=generator(0), dtype=DOUBLE)
    y = torch.randint(0, 3, (10,), generator=generator(1))
    loss_fn = nn.CrossEntropyLoss()
    tkfac = curvops.TKFAC(model, loss_fn, _batches(x, y, [3, 7]), fisher_type="type-2")
    exact = Truth(model, loss_fn, x, y).ggn()
    for label, group in zip(tkfac.labels, _groups(model), strict=True):
        torch.testing.assert_close(tkfac.block(label).trace(), exact[group][:, group].trace(), msg=label)
        if label.endswith("weight"):
            phi = tkfac.block(label).factors[1]
            torch.testing.assert_close(phi.trace(), torch.tensor(1.0, dtype=DOUBLE))


@pytest.mark.parametrize("model_name", ["tokens", "conv"])
def test_per_example_and_gramian_corrections_agree(model_name):
    torch.manual_seed(0)
    model = (Tokens(pool=False) if model_name == "tokens" else ConvNet(pool=True)).double()
    x = torch.randn(
        (6, 5, 4) if model_name == "tokens" else (6, 2, 5, 6), generator=generator(0), dtype=DOUBLE
    )
    with torch.no_grad():
        output = torch.tanh(model(x))
    y = torch.rand(output.shape, generator=generator(1), dtype=DOUBLE)
    loss_fn = nn.BCEWithLogitsLoss()
    data = _batches(x, y, [4, 2])
    results = [
        curvops.EKFAC(model, loss_fn, data, fisher_type="type-2", correction=c, bias="joint").to_dense()
        for c in ("per-example", "gramian", "auto")
    ]
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], results[2])


def test_auto_correction_picks_the_smaller_memory():
    # per-example: K·N·n_out·n_in; gramian: N·S²·(n_out + n_in)
    assert correction_strategy("auto", 2, 10, 1, 50, 60) == "gramian"  # 60,000 vs 1,100
    assert correction_strategy("auto", 1, 10, 100, 4, 4) == "per-example"  # 160 vs 800,000
    assert correction_strategy("per-example", 1, 10, 1, 50, 60) == "per-example"


def test_ekfac_and_tkfac_refuse_forward_only_and_unknown_corrections():
    model = _mlp()
    data = [(torch.randn(3, 4, dtype=DOUBLE), torch.randint(0, 3, (3,)))]
    for build in (curvops.EKFAC, curvops.TKFAC):
        with pytest.raises(ValueError, match="forward-only"):
            build(model, nn.CrossEntropyLoss(), data, fisher_type="forward-only")
    with pytest.raises(ValueError, match="Unknown correction 'exact'"):
        curvops.EKFAC(model, nn.CrossEntropyLoss(), data, correction="exact")


def test_ekfac_operator_quantities_and_state_dict(tmp_path):
    model = _mlp()
    data = [(torch.randn(8, 4, generator=generator(0), dtype=DOUBLE), torch.randint(0, 3, (8,)))]
    ekfac = curvops.EKFAC(model, nn.CrossEntropyLoss(), data, bias="joint")
    dense = ekfac.to_dense()
    eye = torch.eye(len(dense), dtype=DOUBLE)
    torch.testing.assert_close(ekfac.inverse(1e-2).to_dense(), torch.linalg.inv(dense + 1e-2 * eye))
    torch.testing.assert_close(ekfac.logdet(1e-2), torch.linalg.slogdet(dense + 1e-2 * eye)[1])
    torch.save(ekfac.state_dict(), tmp_path / "ekfac.pt")
    rebuilt = curvops.from_state_dict(torch.load(tmp_path / "ekfac.pt", weights_only=True))
    torch.testing.assert_close(rebuilt.to_dense(), dense)
