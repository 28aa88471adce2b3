"""Issue 13, item 7: ``curvops.nn.coverage`` says, before any pass, which block each parameter
gets, and every row is what the builders then do (labels and block types of the operator they
build, or the error they raise, word for word)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import curvops
from curvops.linalg import (
    Dense,
    Diagonal,
    GroupedKronecker,
    GroupedKroneckerEigen,
    Kronecker,
    KroneckerEigen,
    Permuted,
)
from curvops.linalg.blocks import block_layout
from curvops.nn.kfac import kronecker_approximation

TOKENS, WIDTH, LENGTH = 6, 4, 3


class Mixed(nn.Module):
    """Tokens → embedding → self-attention → LayerNorm → 1×1 convolution → BatchNorm → Linear
    layers (one frozen) → head, optionally tied to the embedding."""

    def __init__(self, groups: int = 1, max_norm: float | None = None, tie: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(TOKENS, WIDTH, max_norm=max_norm)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.ln = nn.LayerNorm(WIDTH)
        self.conv = nn.Conv2d(WIDTH, WIDTH, kernel_size=1, groups=groups)
        self.bn = nn.BatchNorm2d(WIDTH)
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.frozen = nn.Linear(WIDTH, WIDTH).requires_grad_(False)
        self.head = nn.Linear(WIDTH, TOKENS, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        x = self.ln(x + self.attn(x, x, x)[0])  # need_weights: no flash attention (no double backward on CPU)
        image = self.bn(self.conv(x.transpose(1, 2).unsqueeze(-1)))
        x = self.frozen(torch.tanh(self.fc(image.squeeze(-1).transpose(1, 2))))
        return self.head(x)


def mixed(**options) -> nn.Module:
    torch.manual_seed(0)
    return Mixed(**options).double().eval()


def data() -> list:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TOKENS, (2, LENGTH), generator=generator)
    return [(tokens, torch.randn(2, LENGTH, TOKENS, generator=generator, dtype=torch.float64))]


def build(model, approximation, params=None, batches=None, **options):
    batches = data() if batches is None else batches
    return kronecker_approximation(
        approximation, model, nn.MSELoss(), batches, params=params, fisher_type="type-2", **options
    )


def expected_type(row: curvops.nn.CoverageRow) -> type:
    """The operator class the builder gives the row's block."""
    if row.groups > 1:  # one block per group
        return GroupedKroneckerEigen if row.block == "kronecker-eigen" else GroupedKronecker
    if row.block == "kronecker-eigen":
        return KroneckerEigen
    if row.block == "kronecker":
        return Dense if row.bias == "separate" and row.label.endswith(".bias") else Kronecker
    return {"dense": Dense, "diagonal": Diagonal, "exact": Dense, "exact-diagonal": Diagonal}[row.block]


def assert_builder_agrees(
    model, approximation="kfac", params=None, batches=None, **options
) -> curvops.nn.Coverage:
    """Every row of the coverage is what the builder does: refused rows raise the row's reason
    (alone, and the whole configuration raises one of them); the other rows' blocks are the
    operator's, with their labels, sizes and types."""
    report = curvops.nn.coverage(model, params, approximation, **options)
    named = dict(model.named_parameters())
    for row in report.refused:
        with pytest.raises(ValueError) as alone:
            build(model, approximation, [named[row.name]], batches, **options)
        assert str(alone.value) == row.reason
    if report.refused:
        with pytest.raises(ValueError) as whole:
            build(model, approximation, params, batches, **options)
        message = str(whole.value)
        reasons = {row.reason for row in report.refused}
        assert message in reasons or all(repr(row.module) in message for row in report.refused)
    kept = [row for row in report if row.block != "refused"]
    if not kept:
        return report
    op = build(model, approximation, [named[row.name] for row in kept], batches, **options)
    layout = block_layout(op)
    assert set(layout.labels) == {row.label for row in kept}
    for label, block in zip(layout.labels, layout.blocks, strict=True):
        rows = [row for row in kept if row.label == label]
        assert block.shape[0] == sum(row.numel for row in rows)
        inner = block.op if isinstance(block, Permuted) else block
        assert {type(inner)} == {expected_type(row) for row in rows}, (label, type(inner))
    return report


def test_every_parameter_of_a_mixed_model_gets_the_block_kfac_gives_it():
    model = mixed()
    report = assert_builder_agrees(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert [row.name for row in report] == trainable  # the frozen layer is not chosen by default
    assert {row.name: row.block for row in report if row.block != "refused"} == {
        "emb.weight": "kronecker",
        "attn.in_proj_weight": "kronecker",
        "attn.in_proj_bias": "kronecker",
        "attn.out_proj.weight": "kronecker",
        "attn.out_proj.bias": "kronecker",
        "conv.weight": "kronecker",
        "conv.bias": "kronecker",
        "fc.weight": "kronecker",
        "fc.bias": "kronecker",
        "head.weight": "kronecker",
        "ln.weight": "exact",
        "ln.bias": "exact",
        "bn.weight": "exact",
        "bn.bias": "exact",
    }
    assert (report["emb.weight"].rule, report["conv.weight"].rule, report["fc.bias"].rule) == (
        "EmbeddingRule",
        "ConvRule",
        "LinearRule",
    )
    assert (report["fc.weight"].bias, report["head.weight"].bias, report["fc.bias"].label) == (
        "separate",
        None,
        "fc.bias",
    )
    attention = report["attn.out_proj.weight"]
    where = (attention.module, attention.module_type, attention.block, attention.rule, attention.label)
    assert where == ("attn", "MultiheadAttention", "kronecker", "AttentionRule", "attn.out_proj.weight")
    assert not report.refused
    assert (report["ln.weight"].rule, report["bn.bias"].rule) == ("LayerNormRule", "ChannelNormRule")
    numel = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    assert report.totals == {
        "kronecker": sum(numel[name] for name in ("emb", "attn", "conv", "fc", "head")),
        "exact": sum(numel[name] for name in ("ln", "bn")),
    }
    assert report.model_refusal is None


@pytest.mark.parametrize(
    ("approximation", "bias", "unsupported", "variant"),
    [
        ("kfac", "separate", "error", {"groups": 2}),
        ("kfac", "separate", "error", {"max_norm": 10.0}),
        ("kfac", "separate", "error", {"tie": True}),
        ("kfac", "joint", "dense", {}),
        ("kfac", "joint", "diagonal", {"groups": 2}),
        ("ekfac", "separate", "diagonal", {}),
        ("ekfac", "joint", "dense", {"tie": True}),
        ("tkfac", "joint", "diagonal", {}),
        ("tkfac", "joint", "error", {"max_norm": 10.0}),
        ("tekfac", "separate", "dense", {}),
    ],
)
def test_every_row_is_what_the_builder_does(approximation, bias, unsupported, variant):
    """(An embedding with ``max_norm`` renormalises its weight in place in every forward, so a model
    with one is stale at any second pass: its variants build in one pass, without exact blocks.)"""
    report = assert_builder_agrees(mixed(**variant), approximation, bias=bias, unsupported=unsupported)
    kronecker = "kronecker-eigen" if approximation in ("ekfac", "tekfac") else "kronecker"
    assert report["fc.weight"].block == kronecker and report["fc.bias"].bias == bias
    assert report["ln.weight"].block == "exact"
    assert report["attn.out_proj.weight"].block == kronecker
    assert report.approximation == approximation.upper()


def test_refusals_of_a_rule_check_and_of_weight_tying_give_the_builders_error():
    grouped = curvops.nn.coverage(mixed(groups=2), unsupported="dense")  # issue 13: no longer refused
    assert (grouped["conv.weight"].block, grouped["conv.weight"].groups) == ("kronecker", 2)
    assert "kronecker ×2" in grouped.table() and grouped["conv.bias"].reason is None
    renormed = curvops.nn.coverage(mixed(max_norm=1.0), unsupported="dense")
    assert "max_norm" in renormed["emb.weight"].reason
    tied = assert_builder_agrees(mixed(tie=True), unsupported="dense")
    assert tied["emb.weight"].block == "kronecker" and tied["emb.weight"].label == "emb.weight"
    tied = assert_builder_agrees(mixed(tie=True), "ekfac", unsupported="dense")
    assert tied["emb.weight"].block == "refused" and "head" not in [row.module for row in tied]
    assert "'emb.weight' and 'head.weight': its block is KFAC's" in tied["emb.weight"].reason
    reduced = assert_builder_agrees(mixed(), kfac_approx="reduce", unsupported="dense")
    assert "kfac_approx='expand'" in reduced["emb.weight"].reason
    assert reduced["fc.weight"].block == "kronecker"


def test_explicit_params_as_a_list_or_a_dict_keep_their_order():
    model = mixed()
    chosen = [model.fc.bias, model.frozen.weight, model.fc.weight, model.ln.weight]
    report = assert_builder_agrees(model, params=chosen, bias="joint", unsupported="diagonal")
    assert [row.name for row in report] == ["fc.bias", "frozen.weight", "fc.weight", "ln.weight"]
    assert (report["fc.bias"].label, report["frozen.weight"].bias) == ("fc", None)
    everything = dict(model.named_parameters())
    report = assert_builder_agrees(model, params=everything, unsupported="dense")
    assert [row.name for row in report] == list(everything)
    assert report["frozen.weight"].block == "kronecker" and report["ln.bias"].label == "ln.bias"


def test_a_model_that_is_itself_a_layer_is_labelled_by_its_type():
    batches = [(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))]
    report = assert_builder_agrees(nn.Linear(3, 2).double(), batches=batches)
    assert [(row.module, row.label) for row in report] == [("", "Linear.weight"), ("", "Linear.bias")]


def test_batch_norm_in_train_mode_refuses_the_whole_model():
    model = mixed().train()
    report = curvops.nn.coverage(model, [model.fc.weight])
    with pytest.raises(ValueError) as error:
        curvops.KFAC(model, nn.MSELoss(), data(), params=[model.fc.weight])
    assert report.model_refusal == str(error.value)
    assert f"KFAC refuses the model: {report.model_refusal}" in str(report)


def test_coverage_runs_no_forward_pass_and_changes_nothing():
    model = mixed(max_norm=0.1)  # a forward would renormalise the embedding in place
    calls = []
    for module in model.modules():
        module.register_forward_pre_hook(lambda *_: calls.append(1))
    before = {name: p.clone() for name, p in model.state_dict().items()}
    for approximation in ("kfac", "ekfac", "tkfac", "tekfac"):
        curvops.nn.coverage(model, approximation=approximation, unsupported="dense")
    assert calls == []
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize(
    "options",
    [
        {"approximation": "kfca"},
        {"bias": "both"},
        {"kfac_approx": "mean"},
        {"unsupported": "ignore"},
        {"params": [nn.Parameter(torch.zeros(2))]},
        {"params": []},
    ],
)
def test_invalid_options_raise_the_builders_error(options):
    model = mixed()
    name = options.pop("approximation", "kfac")
    with pytest.raises(ValueError) as ours:
        curvops.nn.coverage(model, approximation=name, **options)
    with pytest.raises(ValueError) as builders:
        build(model, name, **options) if name != "kfca" else curvops.nn.options.approximation(name)
    assert str(ours.value) == str(builders.value)


def test_the_table_is_aligned_and_lists_totals_and_reasons():
    report = curvops.nn.coverage(mixed(), unsupported="error")
    lines = str(report).splitlines()
    header, rows = lines[0], lines[1 : 1 + len(report)]
    for column in ("shape", "numel", "module", "type", "block", "rule", "bias", "label"):
        start = header.index(column)
        assert all(line[start - 2 : start] == "  " and line[start] != " " for line in rows), column
    totals = ", ".join(f"{kind} {count}" for kind, count in report.totals.items())
    assert lines[1 + len(report)] == totals
    assert lines[2 + len(report) :] == [f"refused {row.name}: {row.reason}" for row in report.refused]


def test_rows_are_immutable_and_found_by_name():
    report = curvops.nn.coverage(mixed())
    with pytest.raises(dataclasses.FrozenInstanceError):
        report["fc.weight"].block = "dense"
    with pytest.raises(KeyError, match=r"No parameter 'fc\.weights'"):
        report["fc.weights"]
    assert len(report) == len(list(report)) == len(report.rows)
