"""Issue 13, item 8: a tiny GPT and a tiny ResNet (``examples/tiny_models.py``) in every
Kronecker approximation and the optimizer, against dense float64 truth from ``torch.func``.

Where KFAC is exact — one datum and one token, where every weight gradient is one outer
product ``g aᵀ`` per output-space column — every block of KFAC, EKFAC, TKFAC and TEKFAC is the
GGN's diagonal block. Elsewhere EKFAC's defining property is checked: in its own eigenbasis
its eigenvalues are the diagonal of the true block. Norm layers' blocks are exact always.
"""

import doctest
import sys
from pathlib import Path

import pytest
import torch
from helpers import DOUBLE, kron, train_steps
from model_truth import Truth
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvops
from curvops.optim import KFACOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny_models
from tiny_models import TinyGPT, TinyResNet

VOCABULARY, TOKENS = 7, 4
BUILDERS = {
    "kfac": curvops.KFAC,
    "ekfac": curvops.EKFAC,
    "tkfac": curvops.TKFAC,
    "tekfac": lambda *args, **options: curvops.TKFAC(*args, eigenvalue_correction=True, **options),
}


def gpt(seed: int = 0, tied: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return TinyGPT(VOCABULARY, width=8, layers=1, heads=2, tokens=TOKENS, tied=tied).to(DOUBLE)


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyResNet(channels_in=1, channels=2, classes=3).to(DOUBLE)
    with torch.no_grad():  # running statistics that are not the initial (0, 1)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tokens(data: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, VOCABULARY, (data, length), generator=g),
        torch.randint(0, VOCABULARY, (data, length), generator=g),
    )


def parameter_blocks(model: nn.Module) -> list[slice]:
    """The slice of every parameter in the flat vector (``bias="separate"``: one block each)."""
    slices, start = [], 0
    for p in model.parameters():
        slices.append(slice(start, start + p.numel()))
        start += p.numel()
    return slices


def block_diagonal(matrix: torch.Tensor, slices: list[slice]) -> torch.Tensor:
    """``matrix`` with every entry outside the diagonal blocks ``slices`` set to zero."""
    kept = torch.zeros_like(matrix)
    for s in slices:
        kept[s, s] = matrix[s, s]
    return kept


def parameters_of(model: nn.Module, *kinds: type[nn.Module]) -> set[str]:
    """The names of the parameters of ``model``'s modules of the given kinds."""
    return {
        f"{name}.{attribute}"
        for name, module in model.named_modules()
        if isinstance(module, kinds)
        for attribute, _ in module.named_parameters(recurse=False)
    }


def exact_ggn(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernels have no double backward
        return Truth(model, loss_fn, x, y).ggn()


def test_tiny_models_examples_run():
    assert doctest.testmod(tiny_models).failed == 0


@pytest.mark.parametrize("name", list(BUILDERS))
def test_tiny_gpt_gets_a_block_for_every_parameter(name):
    model = gpt()
    report = curvops.nn.coverage(model, approximation=name)
    assert report.rows and all(
        row.block in ("kronecker", "kronecker-eigen", "exact") for row in report.rows
    ), str(report)
    x, y = tokens(2, TOKENS)
    op = BUILDERS[name](model, nn.CrossEntropyLoss(), [(x, y)])
    size = sum(p.numel() for p in model.parameters())
    assert op.shape == (size, size)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_tiny_gpt_blocks_are_the_ggn_blocks_on_one_datum_and_one_token(name):
    model, loss_fn = gpt(), nn.CrossEntropyLoss()
    x, y = tokens(1, 1)
    truth = exact_ggn(model, loss_fn, x, y)
    op = BUILDERS[name](model, loss_fn, [(x, y)], fisher_type="type-2")
    expected = block_diagonal(truth, parameter_blocks(model))
    torch.testing.assert_close(op.to_dense(), expected, atol=1e-10, rtol=1e-8)


def check_eigenbasis_property(op: curvops.CurvatureOperator, truth: torch.Tensor) -> int:
    """Assert, block by block, that a ``KroneckerEigen`` block's eigenvalues are the diagonal of the
    true block in its eigenbasis (EKFAC's property) and that every other block is the true block;
    return the number of ``KroneckerEigen`` blocks."""
    eigen, start = 0, 0
    for block in op.blocks:
        size = block.shape[0]
        true_block = truth[start : start + size, start : start + size]
        start += size
        if not isinstance(block, curvops.KroneckerEigen):
            torch.testing.assert_close(block.to_dense(), true_block, atol=1e-10, rtol=1e-8)
            continue
        basis = kron(
            *(
                torch.eye(n, dtype=DOUBLE) if q is None else q
                for n, q in zip(block.sizes, block.eigenvectors, strict=True)
            )
        )
        torch.testing.assert_close(
            block.spectrum.flatten(), torch.diagonal(basis.T @ true_block @ basis), atol=1e-10, rtol=1e-8
        )
        eigen += 1
    return eigen


@pytest.mark.parametrize("name", ["ekfac", "tekfac"])
def test_tiny_gpt_eigenvalues_are_the_true_blocks_diagonal_in_the_eigenbasis(name):
    # the empirical Fisher: its per-datum (per-sequence) gradients are what the correction sums
    model, loss_fn = gpt(), nn.CrossEntropyLoss()
    x, y = tokens(3, TOKENS)
    with sdpa_kernel(SDPBackend.MATH):
        truth = Truth(model, loss_fn, x, y).empirical_fisher()
    op = BUILDERS[name](model, loss_fn, [(x, y)], fisher_type="empirical")
    eigen = check_eigenbasis_property(op, truth)
    kronecker_parameters = sum(1 for n, _ in model.named_parameters() if "ln" not in n and "norm" not in n)
    assert eigen == kronecker_parameters


def test_tiny_gpt_padded_tokens_enter_no_block():
    # one valid token (the first: causal attention makes it independent of the padding): KFAC exact
    model, loss_fn = gpt(), nn.CrossEntropyLoss(ignore_index=-100)
    x, y = tokens(1, TOKENS)
    y[:, 1:] = -100
    truth = exact_ggn(model, loss_fn, x, y)
    expected = block_diagonal(truth, parameter_blocks(model))
    for name, build in BUILDERS.items():
        op = build(model, loss_fn, [(x, y)], fisher_type="type-2")
        torch.testing.assert_close(op.to_dense(), expected, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_tiny_gpt_padded_batch_equals_the_unpadded_sequences(name):
    # sequences of 4 and 2 tokens: padded into one batch, or as two batches of their own lengths
    model, loss_fn = gpt(), nn.CrossEntropyLoss(ignore_index=-100)
    x, y = tokens(2, TOKENS)
    padded = y.clone()
    padded[1, 2:] = -100
    together = BUILDERS[name](model, loss_fn, [(x, padded)], fisher_type="empirical")
    apart = BUILDERS[name](model, loss_fn, [(x[:1], y[:1]), (x[1:, :2], y[1:, :2])], fisher_type="empirical")
    torch.testing.assert_close(together.to_dense(), apart.to_dense(), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "tkfac", "tekfac"])
def test_kfac_optimizer_trains_the_tiny_gpt(curvature):
    model, loss_fn = gpt(), nn.CrossEntropyLoss()
    x, y = tokens(8, TOKENS, seed=1)
    optimizer = KFACOptimizer(model, loss_fn, curvature=curvature, lr=0.05, damping=0.1, T_inv=5)
    losses = train_steps(model, optimizer, loss_fn, [(x, y)] * 30)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    optimizer.remove_hooks()


def test_tiny_resnet_in_eval_mode_batchnorm_blocks_are_exact():
    model, loss_fn = resnet(), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 1, 6, 6, generator=g, dtype=DOUBLE), torch.randint(0, 3, (3,), generator=g)
    report = curvops.nn.coverage(model)
    assert all(row.block in ("kronecker", "kronecker-eigen", "exact") for row in report.rows), str(report)
    truth = Truth(model, loss_fn, x, y).ggn()
    op = curvops.KFAC(model, loss_fn, [(x, y)], fisher_type="type-2")
    slices = parameter_blocks(model)
    dense = op.to_dense()
    names = [n for n, _ in model.named_parameters()]
    norms = parameters_of(model, nn.BatchNorm2d)
    assert len(norms) == 12
    for name, s in zip(names, slices, strict=True):
        if name in norms:
            torch.testing.assert_close(dense[s, s], truth[s, s], atol=1e-10, rtol=1e-8, msg=name)
    torch.testing.assert_close(dense, block_diagonal(dense, slices))  # one block per parameter


def test_tiny_resnet_blocks_are_the_ggn_blocks_on_one_datum():
    # one image: the head (one position) and the norm blocks are exact, the convolutions are not
    model, loss_fn = resnet(), nn.CrossEntropyLoss()
    x, y = torch.randn(1, 1, 6, 6, dtype=DOUBLE), torch.tensor([2])
    truth = Truth(model, loss_fn, x, y).ggn()
    names = [n for n, _ in model.named_parameters()]
    exact = parameters_of(model, nn.BatchNorm2d, nn.Linear)
    for name, build in BUILDERS.items():
        dense = build(model, loss_fn, [(x, y)], fisher_type="type-2").to_dense()
        for parameter, s in zip(names, parameter_blocks(model), strict=True):
            if parameter in exact:
                torch.testing.assert_close(
                    dense[s, s], truth[s, s], atol=1e-10, rtol=1e-8, msg=f"{name} {parameter}"
                )


def test_tiny_resnet_ekfac_eigenvalues_are_the_true_blocks_diagonal_in_the_eigenbasis():
    model, loss_fn = resnet(), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 1, 6, 6, generator=g, dtype=DOUBLE), torch.randint(0, 3, (4,), generator=g)
    truth = Truth(model, loss_fn, x, y).empirical_fisher()
    op = curvops.EKFAC(model, loss_fn, [(x, y)], fisher_type="empirical")
    assert check_eigenbasis_property(op, truth) == len(parameters_of(model, nn.Conv2d, nn.Linear))


def test_tiny_resnet_in_train_mode_is_refused_by_the_builders_and_trained_by_the_optimizer():
    model, loss_fn = resnet().train(), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 6, 6, generator=g, dtype=DOUBLE), torch.randint(0, 3, (8,), generator=g)
    with pytest.raises(ValueError, match=r"(?i)train"):
        curvops.KFAC(model, loss_fn, [(x, y)])
    optimizer = KFACOptimizer(model, loss_fn, lr=0.1, damping=0.1, T_inv=5)
    losses = train_steps(model, optimizer, loss_fn, [(x, y)] * 20)
    assert losses[-1] < 0.7 * losses[0], losses


def nearest_kronecker(matrix: torch.Tensor, rows: tuple[int, int], columns: tuple[int, int]) -> torch.Tensor:
    """``B ⊗ C`` nearest to ``matrix`` in Frobenius norm (``B`` ``rows[0] x rows[1]``, ``C``
    ``columns[0] x columns[1]``), from the top singular pair of Van Loan's rearrangement."""
    (p, q), (r, s) = rows, columns
    rearranged = matrix.reshape(p, r, q, s).permute(0, 2, 1, 3).reshape(p * q, r * s)
    u, sigma, vh = torch.linalg.svd(rearranged)
    b, c = (sigma[0].sqrt() * u[:, 0]).reshape(p, q), (sigma[0].sqrt() * vh[0]).reshape(r, s)
    return kron(b, c)


def test_tiny_gpt_with_a_tied_head_gets_the_nearest_kronecker_product_of_its_uses():
    model, loss_fn = gpt(tied=True), nn.CrossEntropyLoss()
    x, y = tokens(3, TOKENS)
    tied = curvops.KFAC(model, loss_fn, [(x, y)], fisher_type="type-2").block("token.weight")
    untied = gpt(tied=True)
    untied.head.weight = nn.Parameter(untied.token.weight.detach().clone())  # the same values, two uses
    twin = curvops.KFAC(
        untied, loss_fn, [(x, y)], params=[untied.token.weight, untied.head.weight], fisher_type="type-2"
    )
    uses = twin.block("token.weight").to_dense() + twin.block("head.weight").to_dense()
    torch.testing.assert_close(
        tied.to_dense(), nearest_kronecker(uses, (VOCABULARY,) * 2, (8, 8)), atol=1e-10, rtol=1e-8
    )
    with pytest.raises(ValueError, match=r"token\.weight"):
        curvops.EKFAC(model, loss_fn, [(x, y)])
    optimizer = KFACOptimizer(model, loss_fn, lr=0.05, damping=0.1, T_inv=5)
    losses = train_steps(model, optimizer, loss_fn, [(x, y)] * 30)
    assert losses[-1] < 0.5 * losses[0], losses


def test_tiny_gpt_from_mapping_batches_is_the_same_operator():
    class KeywordGPT(nn.Module):  # called as model(input_ids=..., attention_mask=...) -> {"logits"}
        def __init__(self):
            super().__init__()
            self.gpt = gpt()

        def forward(self, input_ids, attention_mask):
            return {"logits": self.gpt(input_ids * attention_mask)}

    model, loss_fn = KeywordGPT(), nn.CrossEntropyLoss()
    x, y = tokens(3, TOKENS)
    loader = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y}]
    data = curvops.nn.mapping_batches(loader, target="labels", output="logits")
    for name, build in BUILDERS.items():
        from_mappings = build(model, loss_fn, data).to_dense()
        torch.testing.assert_close(from_mappings, build(model.gpt, loss_fn, [(x, y)]).to_dense(), msg=name)
