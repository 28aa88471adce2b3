"""``nn.MultiheadAttention`` in KFAC, EKFAC, TKFAC, TEKFAC and ``KFACOptimizer``: equal to the same
attention written with ``nn.Linear`` and ``F.scaled_dot_product_attention``, exact where KFAC is
exact, the model untouched, and clear errors for what the rule refuses."""

import copy

import pytest
import torch
import torch.nn.functional as F
from model_truth import Truth
from torch import nn

import curvops
from curvops.nn.layers import AttentionRule, register_layer_rule
from curvops.optim import KFACOptimizer

DOUBLE = torch.float64
E, H, N, L = 4, 2, 3, 5
APPROXIMATIONS = ["kfac", "ekfac", "tkfac", "tekfac"]


@pytest.fixture
def separate_rule():
    """q, k and v blocks for every attention module (cross-attention with kdim = vdim = embed_dim)."""
    register_layer_rule(nn.MultiheadAttention, AttentionRule(in_projection="separate"))
    yield
    register_layer_rule(nn.MultiheadAttention, AttentionRule())


class LinearAttention(nn.Module):
    """The attention of ``mha`` written with ``nn.Linear`` projections and SDPA (batch first)."""

    def __init__(self, mha: nn.MultiheadAttention, joint: bool) -> None:
        super().__init__()
        self.joint, self.zero_attn = joint, mha.add_zero_attn
        weight = mha.in_proj_weight
        biases = mha.in_proj_bias.detach().chunk(3)
        if joint:
            self.in_proj = nn.Linear(E, 3 * E).to(DOUBLE)
            self.in_proj.weight.data.copy_(weight.detach())
            self.in_proj.bias.data.copy_(mha.in_proj_bias.detach())
        else:
            weights = weight.detach().chunk(3) if weight is not None else None
            for i, (part, size) in enumerate(zip("qkv", (E, mha.kdim, mha.vdim), strict=True)):
                linear = nn.Linear(size, E).to(DOUBLE)
                source = weights[i] if weights is not None else getattr(mha, f"{part}_proj_weight").detach()
                linear.weight.data.copy_(source)
                linear.bias.data.copy_(biases[i])
                setattr(self, part, linear)
        self.out = nn.Linear(E, E).to(DOUBLE)
        self.out.weight.data.copy_(mha.out_proj.weight.detach())
        self.out.bias.data.copy_(mha.out_proj.bias.detach())

    def params(self) -> list[nn.Parameter]:
        """In the layout of the attention's ``in_proj_weight`` (or q/k/v weights), ``in_proj_bias``,
        ``out_proj``."""
        if self.joint:
            return [self.in_proj.weight, self.in_proj.bias, self.out.weight, self.out.bias]
        parts = [self.q, self.k, self.v]
        return [p.weight for p in parts] + [p.bias for p in parts] + [self.out.weight, self.out.bias]

    def forward(
        self, query, key, value, attn_mask=None, key_padding_mask=None, is_causal=False, need_weights=True
    ):
        if self.joint:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            q, k, v = self.q(query), self.k(key), self.v(value)
        n, length, source = q.shape[0], q.shape[1], k.shape[1]
        heads = [t.view(n, -1, H, E // H).transpose(1, 2) for t in (q, k, v)]
        mask = torch.zeros(n, H, length, source, dtype=DOUBLE)
        if attn_mask is not None:
            shaped = attn_mask.view(n, H, length, source) if attn_mask.dim() == 3 else attn_mask
            mask = mask.masked_fill(shaped, float("-inf")) if shaped.dtype == torch.bool else mask + shaped
        if key_padding_mask is not None:
            mask = mask.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if self.zero_attn:  # one more key and value, zero in every head, never masked
            heads[1:] = [torch.cat([t, t.new_zeros(n, H, 1, E // H)], dim=2) for t in heads[1:]]
            mask = F.pad(mask, (0, 1))
        attended = F.scaled_dot_product_attention(*heads, attn_mask=mask)
        return self.out(attended.transpose(1, 2).reshape(n, length, E))


class Model(nn.Module):
    """Inputs ``[N, L, E + kdim + vdim]`` split into query, key and value (all the query for
    self-attention), the attention, and a token-wise head to 3 outputs."""

    def __init__(
        self, attention: nn.Module, self_attention: bool, batch_first: bool, masks: dict, kdim=E
    ) -> None:
        super().__init__()
        self.attention, self.self_attention, self.batch_first = attention, self_attention, batch_first
        self.masks, self.kdim = masks, kdim
        torch.manual_seed(7)
        self.head = nn.Linear(E, 3).to(DOUBLE)

    def forward(self, x):
        if self.self_attention:
            query = key = value = x[..., :E]
        else:
            query, key, value = x[..., :E], x[..., E : E + self.kdim], x[..., E + self.kdim :]
        if isinstance(self.attention, LinearAttention):
            return self.head(self.attention(query, key, value, **self.masks))
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
            if self.self_attention:
                key = value = query
        out = self.attention(query, key, value, **self.masks)[0]
        return self.head(out if self.batch_first else out.transpose(0, 1))


def _causal():
    return torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)


def _masks(kind: str) -> dict:
    g = torch.Generator().manual_seed(3)
    if kind == "none":
        return {}
    if kind == "no weights":
        return {"need_weights": False}
    if kind == "bool 2-D":
        mask = torch.rand(L, L, generator=g) < 0.3
        mask.fill_diagonal_(False)
        return {"attn_mask": mask}
    if kind == "float 3-D":
        return {"attn_mask": torch.randn(N * H, L, L, generator=g, dtype=DOUBLE)}
    if kind == "key padding":
        padding = torch.zeros(N, L, dtype=torch.bool)
        padding[0, 3:], padding[2, 1:] = True, True
        return {"key_padding_mask": padding}
    return {"attn_mask": _causal(), "is_causal": True}


def _pair(self_attention=True, kdim=E, vdim=E, batch_first=True, masks="none", add_zero_attn=False):
    """The attention model and its twin written with nn.Linear, with the same weights."""
    torch.manual_seed(0)
    options = {"kdim": kdim, "vdim": vdim, "add_zero_attn": add_zero_attn}
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **options).to(DOUBLE)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    joint = self_attention and kdim == vdim == E
    twin = LinearAttention(mha, joint)
    model = Model(mha, self_attention, batch_first, _masks(masks), kdim)
    linear_model = Model(twin, self_attention, True, _masks(masks), kdim)
    linear_model.head.load_state_dict(model.head.state_dict())
    return model, linear_model


def _data(kdim=E, vdim=E, n=N, length=L, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, E + kdim + vdim, generator=g, dtype=DOUBLE)
    return x, torch.randn(n, length, 3, generator=g, dtype=DOUBLE)


def _params(model, linear_model):
    ours = [*model.attention.parameters(), *model.head.parameters()]
    theirs = [*linear_model.attention.params(), *linear_model.head.parameters()]
    return ours, theirs


CASES = [
    {"self_attention": True},
    {"self_attention": True, "batch_first": False},
    {"self_attention": True, "masks": "bool 2-D"},
    {"self_attention": True, "masks": "float 3-D", "batch_first": False},
    {"self_attention": True, "masks": "key padding"},
    {"self_attention": True, "masks": "causal"},
    {"self_attention": True, "masks": "no weights", "batch_first": False},
    {"self_attention": True, "masks": "key padding", "add_zero_attn": True},
    {"self_attention": False, "kdim": 3, "vdim": 5, "masks": "float 3-D", "add_zero_attn": True},
    {"self_attention": False, "kdim": 3, "vdim": 5},
    {"self_attention": False, "kdim": 3, "vdim": 5, "batch_first": False, "masks": "key padding"},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", ["separate", "joint"])
def test_attention_equals_the_same_attention_written_with_linear(case, kfac_approx, bias):
    """Every approximation with ``"expand"``. With ``"reduce"`` the keys' output gradients summed over
    tokens vanish (softmax is shift invariant): ``G`` of the in-projection is singular, so EKFAC's
    eigenbasis in its null space (where the corrections live) is any, and a separate key block's
    TKFAC ``Ψ = G / tr G`` is rounding noise over rounding noise; those are left out there."""
    dims = {k: v for k, v in case.items() if k in ("kdim", "vdim")}
    model, linear_model = _pair(**case)
    x, y = _data(**dims)
    torch.testing.assert_close(model(x), linear_model(x), rtol=1e-12, atol=1e-12)
    ours, theirs = _params(model, linear_model)
    reduce_ok = ["kfac", "tkfac"] if case["self_attention"] else ["kfac"]
    for name in APPROXIMATIONS if kfac_approx == "expand" else reduce_ok:
        options = {"fisher_type": "type-2", "kfac_approx": kfac_approx, "bias": bias}
        op = curvops.nn.kfac.kronecker_approximation(
            name, model, nn.MSELoss(), [(x, y)], params=ours, **options
        )
        twin = curvops.nn.kfac.kronecker_approximation(
            name, linear_model, nn.MSELoss(), [(x, y)], params=theirs, **options
        )
        torch.testing.assert_close(op.to_dense(), twin.to_dense(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masks", ["none", "causal"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_with_equal_dimensions_has_separate_qkv_blocks(masks, batch_first):
    model, linear_model = _pair(self_attention=False, batch_first=batch_first, masks=masks)
    x, y = _data()
    ours, theirs = _params(model, linear_model)
    for name in APPROXIMATIONS:
        op = curvops.nn.kfac.kronecker_approximation(
            name, model, nn.MSELoss(), [(x, y)], params=ours, fisher_type="type-2"
        )
        twin = curvops.nn.kfac.kronecker_approximation(
            name, linear_model, nn.MSELoss(), [(x, y)], params=theirs, fisher_type="type-2"
        )
        torch.testing.assert_close(op.to_dense(), twin.to_dense(), rtol=1e-10, atol=1e-12)
    labels = set(op.labels)
    assert {"attention.in_proj.q.weight", "attention.in_proj.v.bias", "attention.out_proj.weight"} <= labels


def test_some_attention_parameters_only():
    model, linear_model = _pair(self_attention=False, kdim=3, vdim=5)
    x, y = _data(kdim=3, vdim=5)
    mha, twin = model.attention, linear_model.attention
    ours = [mha.k_proj_weight, mha.in_proj_bias, mha.out_proj.bias]
    theirs = [twin.k.weight, twin.q.bias, twin.k.bias, twin.v.bias, twin.out.bias]
    op = curvops.KFAC(model, nn.MSELoss(), [(x, y)], params=ours, fisher_type="type-2", bias="joint")
    expected = curvops.KFAC(
        linear_model, nn.MSELoss(), [(x, y)], params=theirs, fisher_type="type-2", bias="joint"
    )
    torch.testing.assert_close(op.to_dense(), expected.to_dense(), rtol=1e-10, atol=1e-12)
    labels = (
        "attention.in_proj.k",
        "attention.in_proj.q.bias",
        "attention.in_proj.v.bias",
        "attention.out_proj.bias",
    )
    assert op.op.labels == labels  # the key's rows [W_k b_k]: a joint block on entries that are no range


@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_one_datum_one_token_is_the_exact_ggn_block(name):
    """One datum, one token, MSE: every approximation equals the GGN's blocks (in_proj, out_proj, head)."""
    model, _ = _pair(masks="none")
    x, y = _data(n=1, length=1)
    loss_fn = nn.MSELoss()
    op = curvops.nn.kfac.kronecker_approximation(
        name, model, loss_fn, [(x, y)], fisher_type="type-2", bias="joint"
    )
    truth = Truth(model, loss_fn, x, y).ggn()
    sizes = [3 * E * E + 3 * E, E * E + E, 3 * E + 3]
    blocks = torch.block_diag(*[torch.ones(n, n) for n in sizes]).bool()
    torch.testing.assert_close(op.to_dense(), truth * blocks, rtol=1e-10, atol=1e-12)
    assert truth[~blocks].abs().max() > 1e-3


def _call_kwargs():
    causal = _causal()
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[1, 2:] = True
    return [
        {},
        {"need_weights": False},
        {"average_attn_weights": False},
        {"attn_mask": causal, "is_causal": True},
        {"attn_mask": causal, "is_causal": True, "need_weights": False},
        {"key_padding_mask": padding, "attn_mask": torch.rand(L, L) < 0.2},
        {"key_padding_mask": padding.to(DOUBLE) * -1e9},
    ]


@pytest.mark.parametrize(
    "options", [{}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 3, "vdim": 5}]
)
@pytest.mark.parametrize("batch_first", [True, False])
def test_the_recomputed_call_gives_the_module_output(options, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **options).to(DOUBLE)
    g = torch.Generator().manual_seed(0)
    shape = (N, L) if batch_first else (L, N)
    query = torch.randn(*shape, E, generator=g, dtype=DOUBLE)
    key = torch.randn(*shape, mha.kdim, generator=g, dtype=DOUBLE)
    value = torch.randn(*shape, mha.vdim, generator=g, dtype=DOUBLE)
    calls = [(query, key, value)] + ([(query, query, query)] if mha._qkv_same_embed_dim else [])
    rule = AttentionRule(in_projection="separate")
    for args in calls:
        for kwargs in _call_kwargs():
            expected = mha(*args, **kwargs)
            (output, weights), parts = rule.capture("attn", mha, args, kwargs, expected)
            torch.testing.assert_close(output, expected[0], rtol=0, atol=1e-14)
            assert (weights is None) == (expected[1] is None)
            if weights is not None:
                torch.testing.assert_close(weights, expected[1], rtol=0, atol=1e-14)
            assert set(parts) == {"in_proj.q", "in_proj.k", "in_proj.v", "out_proj"}


def test_bias_k_and_bias_v_are_others_with_a_reason():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, add_bias_kv=True, add_zero_attn=True).to(DOUBLE)
    model = Model(mha, True, True, {})
    x, y = _data()
    with pytest.raises(
        ValueError, match=r"'attention' \(MultiheadAttention\).*bias_k and bias_v.*unsupported="
    ):
        curvops.KFAC(model, nn.MSELoss(), [(x, y)], fisher_type="type-2")
    op = curvops.KFAC(model, nn.MSELoss(), [(x, y)], fisher_type="type-2", unsupported="dense")
    assert "attention" in op.labels and "attention.in_proj.weight" in op.labels
    truth = Truth(model, nn.MSELoss(), x, y).ggn()
    names = [n for n, _ in model.named_parameters()]
    offsets = torch.cumsum(torch.tensor([0] + [p.numel() for p in model.parameters()]), 0)
    where = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in (2, 3)])
    assert names[2:4] == ["attention.bias_k", "attention.bias_v"]
    torch.testing.assert_close(
        op.block("attention").to_dense(), truth[where][:, where], rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("curvature", APPROXIMATIONS)
@pytest.mark.parametrize(
    "case", [{}, {"self_attention": False, "kdim": 3, "vdim": 5, "masks": "key padding"}]
)
def test_the_optimizer_steps_as_for_the_linear_twin(curvature, case):
    dims = {k: v for k, v in case.items() if k in ("kdim", "vdim")}
    model, linear_model = _pair(**case)
    ours, theirs = _params(model, linear_model)
    loss_fn, twin_loss = nn.MSELoss(), nn.MSELoss()
    options = {"curvature": curvature, "fisher_type": "type-2", "lr": 0.1, "damping": 1e-2, "T_inv": 1}
    opt = KFACOptimizer(model, loss_fn, **options)
    twin_opt = KFACOptimizer(linear_model, twin_loss, **options)
    for step in range(3):
        x, y = _data(**dims, seed=10 + step)
        for m, o, f in ((model, opt, loss_fn), (linear_model, twin_opt, twin_loss)):
            o.zero_grad()
            f(m(x), y).backward()
            o.step()
        for p, q in zip(_flat(ours), _flat(theirs), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    restored = KFACOptimizer(model, nn.MSELoss(), **options)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert set(restored.state_dict()["curvature"]["statistics"]) == set(
        opt.state_dict()["curvature"]["statistics"]
    )
    torch.testing.assert_close(restored.preconditioner.to_dense(), opt.preconditioner.to_dense())


def _flat(params):
    return [torch.cat([p.detach().reshape(-1) for p in params])]


def test_the_model_is_unchanged_by_building_and_by_the_optimizer():
    model, _ = _pair(masks="causal")
    x, y = _data()
    before = model(x).detach()
    params = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    for name in APPROXIMATIONS:
        curvops.nn.kfac.kronecker_approximation(name, model, nn.MSELoss(), [(x, y)], fisher_type="type-2")
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and "forward" not in vars(module)
    for name, p in model.named_parameters():
        assert p is params[name][0] and torch.equal(p.detach(), params[name][1]) and p.grad is None
    assert torch.equal(model(x), before)
    opt = KFACOptimizer(model, nn.MSELoss())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert torch.equal(copy.deepcopy(model)(x), before)
    opt.remove_hooks()
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_attention_dropout_in_train_mode_is_refused_naming_the_module():
    torch.manual_seed(0)
    model = Model(nn.MultiheadAttention(E, H, dropout=0.1, batch_first=True).to(DOUBLE), True, True, {})
    x, y = _data()
    message = r"'attention' \(MultiheadAttention\) has attention dropout 0\.1 in train mode.*model\.eval\(\)"
    with pytest.raises(ValueError, match=message):
        curvops.KFAC(model, nn.MSELoss(), [(x, y)], fisher_type="type-2")
    loss_fn = nn.MSELoss()
    KFACOptimizer(model, loss_fn)
    with pytest.raises(ValueError, match=message):
        loss_fn(model(x), y)
    model.eval()
    curvops.KFAC(model, nn.MSELoss(), [(x, y)], fisher_type="type-2")  # eval mode: no dropout


def test_unbatched_inputs_are_refused_naming_the_module():
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H).to(DOUBLE)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    x = torch.randn(L, E, dtype=DOUBLE)
    with pytest.raises(
        ValueError, match=r"'attn' \(MultiheadAttention\) is called with unbatched 2-D inputs"
    ):
        curvops.KFAC(Unbatched(), nn.MSELoss(), [(x, torch.randn(L, E, dtype=DOUBLE))], fisher_type="type-2")


def test_self_attention_with_separate_blocks_by_the_rule(separate_rule):
    model, linear_model = _pair()
    linear_model.attention = LinearAttention(model.attention, joint=False)
    x, y = _data()
    ours, theirs = _params(model, linear_model)
    for name in APPROXIMATIONS:
        op = curvops.nn.kfac.kronecker_approximation(name, model, nn.MSELoss(), [(x, y)], params=ours)
        twin = curvops.nn.kfac.kronecker_approximation(
            name, linear_model, nn.MSELoss(), [(x, y)], params=theirs
        )
        torch.testing.assert_close(op.to_dense(), twin.to_dense(), rtol=1e-10, atol=1e-12)


class Switching(nn.Module):
    """Self-attention, or cross-attention to ``2x`` when ``cross`` (or for batches of one datum)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True).to(DOUBLE)
        self.cross = False

    def forward(self, x):
        memory = 2 * x if self.cross or len(x) == 1 else x
        return self.attn(x, memory, memory)[0]


def test_the_builders_refuse_a_module_called_otherwise_than_in_the_first_batch():
    x = torch.randn(N, L, E, dtype=DOUBLE)
    batches = [(x, x), (x[:1], x[:1])]
    with pytest.raises(ValueError, match=r"'attn' is called differently from its first call.*in_proj\.q"):
        curvops.KFAC(Switching(), nn.MSELoss(), batches, fisher_type="type-2")


def test_the_optimizer_refuses_a_module_called_otherwise_than_at_first():
    model, loss_fn = Switching(), nn.MSELoss()
    opt = KFACOptimizer(model, loss_fn, fisher_type="type-2")
    x = torch.randn(N, L, E, dtype=DOUBLE)
    loss_fn(model(x), x).backward()
    opt.step()
    model.cross = True
    with pytest.raises(ValueError, match=r"'attn' is called differently from its first call"):
        model(x)


def test_a_subclass_with_its_own_forward_is_refused():
    class Scaled(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            out, weights = super().forward(*args, **kwargs)
            return 2 * out, weights

    torch.manual_seed(0)
    model = Model(Scaled(E, H, batch_first=True).to(DOUBLE), True, True, {})
    x, y = _data()
    with pytest.raises(
        ValueError, match=r"'attention' \(Scaled\) is an nn.MultiheadAttention with a forward of its own"
    ):
        curvops.KFAC(model, nn.MSELoss(), [(x, y)], fisher_type="type-2")


def test_coverage_rows_of_attention():
    model, _ = _pair()
    report = curvops.nn.coverage(model)
    assert report["attention.in_proj_weight"].label == "attention.in_proj.weight"
    assert report["attention.out_proj.bias"].label == "attention.out_proj.bias"
    assert {row.block for row in report} == {"kronecker"}
    assert report["attention.in_proj_weight"].module == "attention"
    cross, _ = _pair(self_attention=False)
    register_layer_rule(nn.MultiheadAttention, AttentionRule(in_projection="separate"))
    try:
        row = curvops.nn.coverage(cross)["attention.in_proj_weight"]
    finally:
        register_layer_rule(nn.MultiheadAttention, AttentionRule())
    assert row.label == ", ".join(f"attention.in_proj.{part}.weight" for part in "qkv")
