"""Batches as mappings (``{"input_ids", "attention_mask", "labels"}``) through
``curvops.nn.mapping_batches``: every operator, the optimizer, Laplace and the influence
functions give what they give on the equivalent ``(X, y)`` tuple batches; clear errors."""

import pytest
import torch
from helpers import DOUBLE
from torch import nn

import curvops
from curvops.influence import influence_scores, self_influence
from curvops.laplace import Laplace
from curvops.nn import mapping_batches
from curvops.optim import KFACOptimizer

VOCAB, LENGTH, CLASSES = 7, 5, 3


class Classifier(nn.Module):
    """``forward(input_ids, attention_mask) -> {"logits": [N, C]}`` (masked mean of embeddings)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(VOCAB, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, CLASSES)

    def hidden(self, input_ids, attention_mask):
        return torch.tanh(self.mix(self.embedding(input_ids))) * attention_mask.unsqueeze(-1)

    def forward(self, input_ids, attention_mask):
        pooled = self.hidden(input_ids, attention_mask).sum(1) / attention_mask.sum(1, keepdim=True)
        return {"logits": self.head(pooled)}


class Tagger(Classifier):
    """Token logits ``[N·S, C]``: with ``ignore_index`` targets at the padding."""

    def forward(self, input_ids, attention_mask):
        return {"logits": self.head(self.hidden(input_ids, attention_mask)).flatten(0, 1)}


class OnTensors(nn.Module):
    """The same model on one tensor ``X = [ids, mask]`` stacked on the last axis: ``model(X)``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x[..., 0].long(), x[..., 1])["logits"]


def loader(tokens: bool = False, batches: int = 2, size: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(batches):
        ids = torch.randint(0, VOCAB, (size, LENGTH), generator=g)
        mask = torch.ones(size, LENGTH, dtype=DOUBLE)
        mask[:, 3:] = (torch.rand(size, 2, generator=g) > 0.5).to(DOUBLE)
        if tokens:
            labels = torch.randint(0, CLASSES, (size * LENGTH,), generator=g)
            labels[mask.flatten() == 0] = -100
        else:
            labels = torch.randint(0, CLASSES, (size,), generator=g)
        result.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return result


def as_tuples(batches: list[dict]) -> list[tuple]:
    return [(torch.stack([b["input_ids"].to(DOUBLE), b["attention_mask"]], -1), b["labels"]) for b in batches]


OPERATORS = [
    (curvops.GGN, {}),
    (curvops.Hessian, {}),
    (curvops.EmpiricalFisher, {}),
    (curvops.FisherMC, {"mc_samples": 2}),
    (curvops.KFAC, {"fisher_type": "type-2"}),
    (curvops.KFAC, {"fisher_type": "mc", "kfac_approx": "reduce", "bias": "joint"}),
    (curvops.EKFAC, {"fisher_type": "empirical"}),
    (curvops.TKFAC, {"fisher_type": "type-2", "eigenvalue_correction": True}),
]


@pytest.mark.parametrize(("builder", "options"), OPERATORS)
@pytest.mark.parametrize("model_type", [Classifier, Tagger])
def test_every_operator_on_mappings_equals_it_on_tuples(builder, options, model_type):
    tokens = model_type is Tagger
    model = model_type().double()
    batches = loader(tokens=tokens)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    if builder is curvops.KFAC and options.get("kfac_approx") == "reduce":
        options = {**options, "params": [model.mix.weight, model.mix.bias, model.head.weight]}
    mapped = builder(model, loss_fn, mapping_batches(batches, output="logits"), **options)
    tensor_options = dict(options)
    tuples = builder(OnTensors(model), loss_fn, as_tuples(batches), **tensor_options)
    torch.testing.assert_close(mapped.to_dense(), tuples.to_dense(), rtol=1e-12, atol=1e-12)
    v = torch.randn(mapped.shape[0], dtype=DOUBLE)
    torch.testing.assert_close(mapped @ v, tuples @ v, rtol=1e-12, atol=1e-12)


def test_the_target_entry_and_the_inputs_are_chosen_by_key():
    model = Classifier().double()
    renamed = [
        {"ids": b["input_ids"], "mask": b["attention_mask"], "y": b["labels"], "id": 0} for b in loader()
    ]

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids, mask):
            return self.inner(ids, mask)

    data = mapping_batches(renamed, target="y", inputs=["ids", "mask"], output=lambda out: out["logits"])
    assert len(data) == 2
    x, y = next(iter(data))
    assert list(x) == ["ids", "mask"] and y is renamed[0]["y"]
    ggn = curvops.GGN(Named(), nn.CrossEntropyLoss(), data).to_dense()
    expected = curvops.GGN(OnTensors(model), nn.CrossEntropyLoss(), as_tuples(loader())).to_dense()
    torch.testing.assert_close(ggn, expected, rtol=1e-12, atol=1e-12)


def test_optimizer_with_a_model_of_keyword_inputs_and_a_dict_output_steps_as_on_tuples():
    loss_fn = nn.CrossEntropyLoss()
    batches = loader(batches=4)
    for curvature in ("kfac", "ekfac"):
        model, reference = Classifier().double(), OnTensors(Classifier().double())
        options = {"curvature": curvature, "fisher_type": "mc", "lr": 0.1, "damping": 0.1, "T_inv": 2}
        opt, reference_opt = (
            KFACOptimizer(model, loss_fn, **options),
            KFACOptimizer(reference, loss_fn, **options),
        )
        for batch, (x, y) in zip(batches * 2, as_tuples(batches) * 2, strict=True):
            opt.zero_grad()
            loss_fn(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"],
                    batch["labels"]).backward()  # fmt: skip
            opt.step()
            reference_opt.zero_grad()
            loss_fn(reference(x), y).backward()
            reference_opt.step()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("curvature", ["kfac", "diagonal", "full"])
def test_laplace_marginal_likelihood_on_mappings_equals_it_on_tuples(curvature):
    model, batches = Classifier().double(), loader()
    loss_fn = nn.CrossEntropyLoss()
    mapped = Laplace(model, loss_fn, mapping_batches(batches, output="logits"), curvature=curvature)
    tuples = Laplace(OnTensors(model), loss_fn, as_tuples(batches), curvature=curvature)
    test = loader(batches=1, seed=4)
    x, _ = next(iter(mapping_batches(test, output="logits")))
    torch.testing.assert_close(mapped.predictive(x), tuples.predictive(as_tuples(test)[0][0]))
    for tau in (0.3, 2.0):
        torch.testing.assert_close(
            mapped.log_marginal_likelihood(prior_precision=tau),
            tuples.log_marginal_likelihood(prior_precision=tau),
        )


def test_influence_scores_on_mappings_equal_them_on_tuples():
    model, loss_fn = Classifier().double(), nn.CrossEntropyLoss()
    train, query = loader(), loader(batches=1, size=2, seed=1)
    mapped = influence_scores(
        model,
        loss_fn,
        mapping_batches(train, output="logits"),
        mapping_batches(query, output="logits"),
        "ekfac",
    )
    tuples = influence_scores(OnTensors(model), loss_fn, as_tuples(train), as_tuples(query), "ekfac")
    torch.testing.assert_close(mapped, tuples, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        self_influence(model, loss_fn, mapping_batches(train, output="logits"), "kfac"),
        self_influence(OnTensors(model), loss_fn, as_tuples(train), "kfac"),
    )


def test_mappings_are_placed_fingerprinted_checked_for_emptiness_and_staleness():
    model, loss_fn = Classifier().double(), nn.CrossEntropyLoss()
    batches = [{**b, "attention_mask": b["attention_mask"].float()} for b in loader()]
    empty = {key: value[:0] for key, value in batches[0].items()}
    data = mapping_batches([*batches, empty], output="logits")
    seen = [x for _, x, _ in curvops.nn.ModelData(model, data).batches("reading")]
    assert seen[0]["attention_mask"].dtype == DOUBLE and seen[0]["input_ids"].dtype == torch.int64
    full = curvops.GGN(model, loss_fn, mapping_batches(batches, output="logits")).to_dense()
    torch.testing.assert_close(curvops.GGN(model, loss_fn, data).to_dense(), full)  # the empty one adds 0
    changing = [dict(b) for b in batches]
    ggn = curvops.GGN(model, loss_fn, mapping_batches(changing, output="logits"))
    v = torch.ones(ggn.shape[0], dtype=DOUBLE)
    changing[1]["input_ids"] = (changing[1]["input_ids"] + 1) % VOCAB
    with pytest.raises(curvops.NonDeterministicDataError):
        ggn @ v
    ggn = curvops.GGN(model, loss_fn, mapping_batches(batches, output="logits"))
    with torch.no_grad():
        model.head.bias.add_(1.0)
    with pytest.raises(curvops.StaleParametersError, match=r"'head\.bias' changed"):
        ggn @ v


def test_clear_errors_for_missing_keys_non_mappings_and_dict_outputs():
    model, loss_fn = Classifier().double(), nn.CrossEntropyLoss()
    batches = loader()
    with pytest.raises(
        ValueError,
        match=r"Batch 0 has no target key 'label'; its keys are \['input_ids', 'attention_mask', 'labels'\]",
    ):
        curvops.GGN(model, loss_fn, mapping_batches(batches, target="label", output="logits"))
    with pytest.raises(ValueError, match="no input key 'token_type_ids'"):
        curvops.KFAC(model, loss_fn, mapping_batches(batches, inputs=["input_ids", "token_type_ids"]))
    with pytest.raises(TypeError, match="Batch 1 of mapping_batches is a tuple, not a mapping"):
        curvops.GGN(model, loss_fn, mapping_batches([batches[0], (1, 2)], output="logits"))
    with pytest.raises(
        TypeError, match=r"returned a dict with keys \['logits'\], not a tensor.*output='logits'"
    ):
        curvops.KFAC(model, loss_fn, mapping_batches(batches))
    with pytest.raises(
        TypeError, match=r"output='scores': the model returned \['logits'\], without that key"
    ):
        curvops.KFAC(model, loss_fn, mapping_batches(batches, output="scores"))
    with pytest.raises(TypeError, match=r"mapping with keys.*mapping_batches"):
        curvops.GGN(model, loss_fn, batches)
    with pytest.raises(TypeError, match="re-iterable"):
        mapping_batches(iter(batches))
