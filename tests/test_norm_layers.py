"""Normalization layers get the exact block of their affine parameters for each Fisher type,
from the statistics pass (curvops/nn/layers/norm.py): checked against the exact operators'
blocks and, for the GGN, against J^T Λ J from torch.func, in float64."""

import copy

import pytest
import torch
from helpers import DOUBLE, generator, train_steps
from torch import nn

import curvops
from curvops.errors import StateDictError
from curvops.nn.kfac import kronecker_approximation
from curvops.nn.layers import DENSE_LIMIT, LayerNormRule, register_layer_rule
from curvops.optim import KFACOptimizer

CE = nn.CrossEntropyLoss()
EXACT = {"type-2": curvops.GGN, "empirical": curvops.EmpiricalFisher, "mc": curvops.FisherMC}


def _randomised(model):
    """Affine parameters away from (1, 0) and batch norms with running statistics of their own."""
    g = generator(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=g, dtype=DOUBLE))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g, dtype=DOUBLE) / 2)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) / 2)
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
    return model.eval()


def _tokens(shape):
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(shape), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3))


MODELS = {  # (model, input shape of one datum); the norm layer is module "1"
    "layernorm": (lambda: nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)), (3,)),
    "layernorm-tokens": (lambda: _tokens(4), (5, 3)),
    "layernorm-2d-shape": (lambda: _tokens((5, 4)), (5, 3)),
    "rmsnorm": (lambda: nn.Sequential(nn.Linear(3, 5), nn.RMSNorm(5), nn.Tanh(), nn.Linear(5, 3)), (3,)),
    "groupnorm": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 2), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)
        ),
        (2, 4, 4),
    ),
    "batchnorm1d": (
        lambda: nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)),
        (3,),
    ),
    "batchnorm1d-sequence": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 2), nn.BatchNorm1d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)
        ),
        (2, 5),
    ),
    "batchnorm2d": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)
        ),
        (2, 3, 3),
    ),
    "batchnorm3d": (
        lambda: nn.Sequential(
            nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)
        ),
        (1, 3, 3, 3),
    ),
}


def _setup(kind, n=7, seed=0):
    torch.manual_seed(seed)
    build, shape = MODELS[kind]
    model = _randomised(build().double())
    x = torch.randn(n, *shape, generator=generator(seed), dtype=DOUBLE)
    y = torch.randint(0, 3, (n,), generator=generator(seed + 1))
    return model, [(x[:4], y[:4]), (x[4:], y[4:])]  # two batches: the normalisation is the data set's


def _exact_block(fisher_type, model, data, params):
    options = {"mc_samples": 2, "seed": 3} if fisher_type == "mc" else {}
    return EXACT[fisher_type](model, CE, data, params=params, **options).to_dense()


def _joint_label(model):
    """``"1"`` for a joint block; ``"1.weight"`` for a norm without a bias (``nn.RMSNorm``)."""
    return "1" if getattr(model[1], "bias", None) is not None else "1.weight"


def _kfac(name, model, data, fisher_type, **options):
    if fisher_type == "mc":
        options = {"mc_samples": 2, "seed": 3, **options}
    return kronecker_approximation(name, model, CE, data, fisher_type=fisher_type, **options)


@pytest.mark.parametrize("fisher_type", list(EXACT))
@pytest.mark.parametrize("kind", list(MODELS))
def test_the_norm_block_is_the_exact_operators_block(kind, fisher_type):
    model, data = _setup(kind)
    norm = list(model[1].parameters())
    exact = _exact_block(fisher_type, model, data, norm)
    size = norm[0].numel()
    joint = _kfac("kfac", model, data, fisher_type, bias="joint")
    torch.testing.assert_close(joint.block(_joint_label(model)).to_dense(), exact, rtol=0, atol=1e-10)
    separate = _kfac("kfac", model, data, fisher_type)
    torch.testing.assert_close(separate.block("1.weight").to_dense(), exact[:size, :size], rtol=0, atol=1e-10)
    if len(norm) == 2:
        torch.testing.assert_close(
            separate.block("1.bias").to_dense(), exact[size:, size:], rtol=0, atol=1e-10
        )


@pytest.mark.parametrize("kind", ["layernorm-tokens", "batchnorm2d"])
def test_the_kronecker_blocks_around_a_norm_layer_are_unchanged(kind):
    """The Linear/Conv blocks are those of a KFAC without the norm layer's parameters."""
    model, data = _setup(kind)
    outer = [p for i, m in enumerate(model) if i != 1 for p in m.parameters()]
    for name in ("kfac", "ekfac", "tkfac", "tekfac"):
        with_norm = _kfac(name, model, data, "type-2")
        without = _kfac(name, model, data, "type-2", params=outer)
        for label in ("0.weight", "0.bias", "4.weight", "4.bias"):
            torch.testing.assert_close(with_norm.block(label).to_dense(), without.block(label).to_dense())


def _ggn_by_torch_func(model, x, y, params):
    """``(1/N) Σ_n J_n^T ∇²_f ℓ_n J_n`` of ``params`` from torch.func, independently of curvops."""
    names = [name for name, p in model.named_parameters() if any(p is q for q in params)]
    fixed = {name: p.detach() for name, p in model.named_parameters()}
    chosen = {name: fixed[name] for name in names}

    def output(values, datum):
        return torch.func.functional_call(model, {**fixed, **values}, (datum.unsqueeze(0),)).squeeze(0)

    total = 0
    for datum, target in zip(x, y, strict=True):
        jacobian = torch.func.jacrev(output)(chosen, datum)
        j = torch.cat([jacobian[name].reshape(jacobian[name].shape[0], -1) for name in names], dim=1)
        f = output(chosen, datum).detach()
        hessian = torch.func.hessian(lambda z, t=target: nn.functional.cross_entropy(z, t))(f)
        total = total + j.T @ hessian @ j
    return total / len(x)


class TokenTagger(nn.Module):
    """Per-token outputs ``[N, C, S]``: a loss term per token."""

    def __init__(self):
        super().__init__()
        self.a, self.ln, self.b = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.ln(self.a(x)))).transpose(1, 2)


@pytest.mark.parametrize(
    ("fisher_type", "loss_fn"),
    [("mc", CE), ("empirical", CE), ("type-2", nn.MSELoss()), ("type-2", nn.BCEWithLogitsLoss())],
)
def test_per_token_losses_give_the_exact_block(fisher_type, loss_fn):
    """Several loss terms per datum: exact for "mc" and "empirical" (per-datum gradients of the
    datum's loss) and for type-2 with one column per output element (MSE, BCE)."""
    torch.manual_seed(0)
    model = _randomised(TokenTagger().double())
    x = torch.randn(5, 4, 3, generator=generator(0), dtype=DOUBLE)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        y = torch.randint(0, 3, (5, 4), generator=generator(1))
    else:
        y = torch.rand(5, 3, 4, generator=generator(1), dtype=DOUBLE)
    options = {"mc_samples": 2, "seed": 3} if fisher_type == "mc" else {}
    norm = list(model.ln.parameters())
    exact = EXACT[fisher_type](model, loss_fn, [(x, y)], params=norm, **options).to_dense()
    op = curvops.KFAC(model, loss_fn, [(x, y)], fisher_type=fisher_type, bias="joint", **options)
    torch.testing.assert_close(op.block("ln").to_dense(), exact, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["layernorm-tokens", "groupnorm", "batchnorm2d", "rmsnorm"])
def test_the_type_2_block_is_the_ggn_from_torch_func(kind):
    model, data = _setup(kind)
    norm = list(model[1].parameters())
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    block = _kfac("kfac", model, data, "type-2", bias="joint").block(_joint_label(model)).to_dense()
    torch.testing.assert_close(block, _ggn_by_torch_func(model, x, y, norm), rtol=0, atol=1e-10)


@pytest.mark.parametrize("fisher_type", list(EXACT))
@pytest.mark.parametrize("name", ["ekfac", "tkfac", "tekfac"])
def test_every_approximation_gives_the_same_exact_block(name, fisher_type):
    model, data = _setup("layernorm")
    reference = _kfac("kfac", model, data, fisher_type, bias="joint").block("1").to_dense()
    op = _kfac(name, model, data, fisher_type, bias="joint")
    assert type(op.block("1")).__name__ == "Dense"
    torch.testing.assert_close(op.block("1").to_dense(), reference, rtol=0, atol=1e-12)


class Counted:
    """A re-iterable data set that counts its passes."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def _passes(builder, model, data, params=None):
    counted = Counted(data)
    builder(model, CE, counted, params=params, fisher_type="type-2")
    return counted.passes


def test_exact_blocks_take_no_correcting_pass(monkeypatch):
    model, data = _setup("layernorm")
    norm = list(model[1].parameters())
    kfac = _passes(curvops.KFAC, model, data)
    assert _passes(curvops.EKFAC, model, data, norm) == _passes(curvops.KFAC, model, data, norm) == kfac
    assert _passes(curvops.EKFAC, model, data) == kfac  # corrected from the statistics pass's kept batches
    monkeypatch.setattr("curvops.nn.kronecker_pass.CORRECTION_CACHE_BYTES", 0)  # nothing kept
    assert _passes(curvops.EKFAC, model, data, norm) == kfac
    assert _passes(curvops.EKFAC, model, data) == kfac + 1  # the Linear layers' correction


class SmallLimitNorm(nn.LayerNorm):
    """A LayerNorm whose rule keeps dense blocks up to 6 parameters only."""


register_layer_rule(SmallLimitNorm, LayerNormRule(dense_limit=6))


def test_blocks_above_the_dense_limit_are_the_exact_diagonal():
    torch.manual_seed(0)
    model = _randomised(
        nn.Sequential(nn.Linear(3, 5), SmallLimitNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    )
    _, data = _setup("layernorm")
    norm = list(model[1].parameters())
    exact = curvops.GGN(model, CE, data, params=norm).to_dense().diagonal()
    joint = curvops.KFAC(model, CE, data, fisher_type="type-2", bias="joint").block("1")
    assert type(joint).__name__ == "Diagonal"
    torch.testing.assert_close(joint.to_dense().diagonal(), exact, rtol=0, atol=1e-10)
    separate = curvops.KFAC(model, CE, data, fisher_type="type-2")
    assert [type(separate.block(f"1.{k}")).__name__ for k in ("weight", "bias")] == ["Diagonal", "Diagonal"]
    torch.testing.assert_close(separate.block("1.bias").to_dense().diagonal(), exact[5:], rtol=0, atol=1e-10)
    assert curvops.nn.coverage(model)["1.weight"].block == "exact-diagonal"
    dense = curvops.KFAC(model, CE, data, params=[model[1].weight], fisher_type="type-2").block("1.weight")
    assert type(dense).__name__ == "Dense"  # 5 chosen parameters: below the limit


def test_the_default_dense_limit():
    assert DENSE_LIMIT == 2048
    small, large = nn.Sequential(nn.LayerNorm(1024)), nn.Sequential(nn.LayerNorm(1025))
    assert curvops.nn.coverage(small, bias="joint")["0.weight"].block == "exact"
    assert curvops.nn.coverage(large, bias="joint")["0.weight"].block == "exact-diagonal"
    assert curvops.nn.coverage(large, params=[large[0].weight])["0.weight"].block == "exact"


def test_forward_only_gives_the_identity():
    model, data = _setup("groupnorm")
    op = curvops.KFAC(model, CE, data, fisher_type="forward-only", bias="joint")
    torch.testing.assert_close(op.block("1").to_dense(), torch.eye(8, dtype=DOUBLE))


def test_a_bf16_model_gets_float32_statistics():
    model64, data = _setup("layernorm-tokens")
    exact = curvops.GGN(model64, CE, data, params=list(model64[1].parameters())).to_dense()
    model16 = copy.deepcopy(model64).bfloat16()
    data16 = [(x.bfloat16(), y) for x, y in data]
    block = curvops.KFAC(model16, CE, data16, fisher_type="type-2", bias="joint").block("1")
    assert block.dtype == torch.bfloat16 and type(block).__name__ == "Cast"
    dense = block.to_dense().double()
    assert torch.linalg.norm(dense - exact) / torch.linalg.norm(exact) < 0.05


def test_batch_norm_in_train_mode_is_refused_with_its_fix():
    model, data = _setup("batchnorm2d")
    with pytest.raises(ValueError, match=r"'1' is a BatchNorm2d in train mode.*model\.eval\(\)"):
        curvops.KFAC(model.train(), CE, data, fisher_type="type-2")
    assert "train mode" in curvops.nn.coverage(model).model_refusal


def test_coverage_names_the_exact_blocks_the_builders_give():
    model, data = _setup("batchnorm2d")
    for bias, labels in (("joint", ["1", "1"]), ("separate", ["1.weight", "1.bias"])):
        report = curvops.nn.coverage(model, bias=bias, approximation="ekfac")
        rows = [report["1.weight"], report["1.bias"]]
        assert [(r.block, r.rule, r.label) for r in rows] == [
            ("exact", "ChannelNormRule", label) for label in labels
        ]
        op = curvops.EKFAC(model, CE, data, fisher_type="type-2", bias=bias)
        assert all(type(op.block(label)).__name__ == "Dense" for label in labels)


def test_invalid_dense_limit_is_refused():
    with pytest.raises(ValueError, match="dense_limit must be an integer >= 0"):
        LayerNormRule(dense_limit=-1)


# ------------------------------------------------------------------ the optimizer


def _gpt_like():
    """Tokens [N, S, D] through LayerNorm, an MLP and a final LayerNorm, then a head."""
    torch.manual_seed(0)
    layers = [nn.LayerNorm(4), nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4), nn.LayerNorm(4)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(12, 3)).double()


def _training_batches(steps=30):
    x = torch.randn(32, 3, 4, generator=generator(5), dtype=DOUBLE)
    y = torch.randint(0, 3, (32,), generator=generator(6))
    return [(x, y)] * steps


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "tkfac", "tekfac"])
def test_the_optimizer_trains_a_layer_norm_model_with_every_curvature(curvature):
    model = _gpt_like()
    opt = KFACOptimizer(model, CE, curvature=curvature, lr=0.05, damping=0.1, fisher_type="type-2", T_inv=2)
    assert {id(p) for p in model[0].parameters()} <= {id(p) for p in opt.curvature_params}
    losses = train_steps(model, opt, CE, _training_batches())
    assert losses[-1] < 0.7 * losses[0]


def test_the_optimizer_block_is_the_exact_block_and_its_damped_inverse():
    model = _gpt_like()
    x, y = _training_batches(1)[0]
    exact = curvops.GGN(model, CE, (x, y), params=list(model[0].parameters())).to_dense()
    opt = KFACOptimizer(model, CE, lr=0.0, momentum=0.0, damping=0.1, fisher_type="type-2", bias="joint")
    train_steps(model, opt, CE, [(x, y)])
    torch.testing.assert_close(opt.curvature_operator().block("0").to_dense(), exact, rtol=0, atol=1e-10)
    damped = torch.linalg.inv(exact + 0.1 * torch.eye(8, dtype=DOUBLE))
    torch.testing.assert_close(opt.preconditioner.block("0").to_dense(), damped, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "tkfac", "tekfac"])
def test_the_optimizer_state_dict_round_trips(curvature):
    model = _gpt_like()
    twin = copy.deepcopy(model)
    options = {"curvature": curvature, "lr": 0.05, "damping": 0.1, "T_inv": 2}
    opt = KFACOptimizer(model, CE, **options)
    batches = _training_batches(5)
    train_steps(model, opt, CE, batches[:3])
    twin.load_state_dict(model.state_dict())
    restored = KFACOptimizer(twin, CE, **options)
    restored.load_state_dict(opt.state_dict())
    train_steps(model, opt, CE, batches[3:])
    train_steps(twin, restored, CE, batches[3:])
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_the_optimizer_on_a_bf16_model_keeps_float32_statistics():
    model = _gpt_like().bfloat16()
    opt = KFACOptimizer(model, CE, lr=0.05, damping=0.1, fisher_type="type-2", bias="joint")
    x, y = _training_batches(1)[0]
    train_steps(model, opt, CE, [(x.bfloat16(), y)] * 3)
    running = next(s for s in opt.layers if s.layer.name == "0").exact_block
    assert running.dtype == torch.float32 and running.shape == (8, 8)
    assert opt.preconditioner.block("0").dtype == torch.bfloat16
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_reduce_gives_the_same_exact_block():
    model, data = _setup("layernorm-tokens")
    expand = _kfac("kfac", model, data, "type-2", bias="joint").block("1").to_dense()
    reduce = _kfac("kfac", model, data, "type-2", bias="joint", kfac_approx="reduce").block("1").to_dense()
    torch.testing.assert_close(reduce, expand, rtol=0, atol=0)


def test_a_wrong_exact_block_in_a_state_dict_is_refused():
    model = _gpt_like()
    opt = KFACOptimizer(model, CE, lr=0.05)
    train_steps(model, opt, CE, _training_batches(1))
    state = opt.state_dict()
    state["curvature"]["statistics"]["0"]["exact_block"] = torch.zeros(3, 3, dtype=DOUBLE)
    with pytest.raises(StateDictError, match=r"\['statistics'\]\['0'\]\['exact_block'\].*\[8, 8\]"):
        KFACOptimizer(model, CE, lr=0.05).load_state_dict(state)


def test_the_optimizer_trains_through_batch_norm_in_train_mode():
    """A training loop's batch norm normalises with the batch: so do its blocks."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)
    ).double()
    x = torch.randn(16, 2, 3, 3, generator=generator(2), dtype=DOUBLE)
    y = torch.randint(0, 3, (16,), generator=generator(3))
    opt = KFACOptimizer(model, CE, lr=0.05, damping=0.1, fisher_type="empirical", bias="joint")
    losses = train_steps(model, opt, CE, [(x, y)] * 20)
    assert losses[-1] < 0.7 * losses[0]
    opt = KFACOptimizer(model, CE, lr=0.0, momentum=0.0, fisher_type="empirical", bias="joint")
    train_steps(model, opt, CE, [(x, y)])
    block = opt.curvature_operator().block("1").to_dense()
    # x̂ does not depend on γ, β: each datum's gradient of the batch-coupled forward is Σ_s x̂_ns ⊙ g_ns
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    norm = list(model[1].parameters())
    per_datum = torch.stack(
        [torch.cat(torch.autograd.grad(loss, norm, retain_graph=True)) for loss in losses]
    )
    torch.testing.assert_close(block, per_datum.T @ per_datum / len(x), rtol=0, atol=1e-10)
