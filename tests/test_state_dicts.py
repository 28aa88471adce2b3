"""Issue 11, item 16: a tampered or foreign state dict raises StateDictError naming the operator,
the path of a nested one and the key; well-formed ones round-trip exactly.

Every tampering case of the table is applied to every operator type (and to the KFAC family's
labelled block-diagonals), through both ``curvops.from_state_dict`` and ``op.load_state_dict``.
"""

import copy
import io
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from helpers import DOUBLE, generator, random_orthogonal, random_psd
from torch import nn

import curvops
from curvops.linalg.state import _REGISTRY


def _data():
    x = torch.randn(7, 3, generator=generator(0), dtype=DOUBLE)
    return [(x, torch.randint(0, 2, (7,), generator=generator(1)))]


def _mlp(names=None):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)]
    if names is not None:
        layers = OrderedDict(zip(names, layers, strict=True))
        return nn.Sequential(layers).double()
    return nn.Sequential(*layers).double()


def _kronecker_eigen():
    q = random_orthogonal(3, seed=2)
    return curvops.KroneckerEigen([q, None], torch.rand(3, 2, generator=generator(3), dtype=DOUBLE) + 0.5)


def _dense(n=3, seed=0):
    return curvops.Dense(random_psd(n, seed=seed))


OPERATORS = {
    "Dense": _dense,
    "Diagonal": lambda: curvops.Diagonal(torch.tensor([1.0, 2.0, 3.0], dtype=DOUBLE)),
    "Identity": lambda: curvops.Identity(4, dtype=DOUBLE),
    "Kronecker": lambda: curvops.Kronecker(random_psd(2), torch.tensor([1.0, 2.0, 3.0], dtype=DOUBLE)),
    "KroneckerEigen": _kronecker_eigen,
    "BlockDiagonal": lambda: curvops.BlockDiagonal(
        [curvops.Diagonal(torch.ones(2, dtype=DOUBLE)), curvops.Kronecker(random_psd(2), random_psd(2))]
    ),
    "Permuted": lambda: curvops.Permuted(_dense(), torch.tensor([2, 0, 1])),
    "Scaled": lambda: 2.5 * _dense(),
    "Sum": lambda: _dense() + _dense(seed=1) + 0.5 * curvops.Identity(3, dtype=DOUBLE),
    "LowRankUpdate": lambda: curvops.LowRankUpdate(_dense(), torch.ones(3, 2, dtype=DOUBLE)),
    "LanczosPower": lambda: _dense().power(-0.5, damping=0.1, method="lanczos"),
    "CGInverse": lambda: _dense().inverse(damping=0.1, method="cg"),
    "KFAC": lambda: curvops.KFAC(_mlp(), nn.CrossEntropyLoss(), _data()),
    "KFAC-joint": lambda: curvops.KFAC(_mlp(), nn.CrossEntropyLoss(), _data(), bias="joint"),
    "EKFAC": lambda: curvops.EKFAC(_mlp(), nn.CrossEntropyLoss(), _data()),
    "TKFAC": lambda: curvops.TKFAC(_mlp(), nn.CrossEntropyLoss(), _data()),
    "KFAC-subset": lambda: _kfac_subset(),
}


def _kfac_subset():
    model = _mlp()
    return curvops.KFAC(model, nn.CrossEntropyLoss(), _data(), params=[model[2].bias, model[0].weight])


def _other_type(name):
    return "Diagonal" if name == "Dense" else "Dense"


# ---------------------------------------------------------------- the tampering cases
# Each takes a (deep-copied) state dict and returns (tampered state, text the error must
# name), or None where the case does not apply to this operator.


def _tensor_case(change, nested):
    """Apply ``change(node, name)`` to a tensor of the operator itself or of a sub-operator."""

    def case(state):
        node = state if not nested else next((c for c in state["children"] if c["tensors"]), None)
        if node is None or not node["tensors"]:
            return None
        return state, change(node, sorted(node["tensors"]))

    return case


def _drop_tensor(node, names):
    del node["tensors"][names[0]]
    return f"'{names[0]}'"


def _extra_tensor(node, names):
    node["tensors"]["spare"] = torch.ones(2, dtype=DOUBLE)
    return "'spare'"


def _not_a_tensor(node, names):
    node["tensors"][names[-1]] = node["tensors"][names[-1]].tolist()
    return f"tensors['{names[-1]}']"


def _extra_axis(node, names):
    node["tensors"][names[-1]] = node["tensors"][names[-1]].unsqueeze(-1)
    return f"tensors['{names[-1]}']"


def _wrong_dtype(node, names):
    tensor = node["tensors"][names[-1]]
    node["tensors"][names[-1]] = tensor.float() if tensor.is_floating_point() else tensor.double()
    return f"tensors['{names[-1]}']"


def _set_top(key, value):
    def case(state):
        state[key] = value
        return state, key

    return case


def _drop_top(key):
    def case(state):
        del state[key]
        return state, f"'{key}'"

    return case


def _swap_type(state):
    new = _other_type(state["type"])
    return {**state, "type": new}, new


def _config_case(change, optional=True):
    def case(state):
        keys = [key for key in state["config"] if optional or key != "labels"]  # labels are optional
        return None if not keys else (state, change(state["config"], keys[0]))

    return case


def _drop_setting(config, key):
    del config[key]
    return f"'{key}'"


def _string_setting(config, key):
    config[key] = "2"
    return f"config['{key}']"


def _extra_setting(state):
    state["config"]["spare"] = 1
    return state, "'spare'"


def _child_case(change):
    def case(state):
        return None if not state["children"] else (state, change(state["children"]))

    return case


def _none_child(children):
    children[0] = None
    return "children["


def _no_children(children):
    children.clear()
    return "children"


def _child_of_another_type(children):
    children[0]["type"] = _other_type(children[0]["type"])
    return children[0]["type"]


CASES = {
    "not a dict": lambda state: ([state], "not a curvops operator state dict"),
    "None": lambda state: (None, "not a curvops operator state dict"),
    **{f"no {key}": _drop_top(key) for key in ("type", "shape", "dtype", "tensors", "children", "config")},
    "extra top-level key": lambda state: ({**state, "version": 2}, "'version'"),
    "type of another operator": _swap_type,
    "unknown type": lambda state: ({**state, "type": "Mystery"}, "'Mystery'"),
    "unhashable type": lambda state: ({**state, "type": ["Dense"]}, "type"),
    "shape of floats": _set_top("shape", [5.5, 5.5]),
    "shape not square": _set_top("shape", [3, 4]),
    "integer dtype": _set_top("dtype", "int64"),
    "unknown dtype": _set_top("dtype", "float99"),
    "tensors None": _set_top("tensors", None),
    "children None": _set_top("children", None),
    "config None": _set_top("config", None),
    "missing tensor": _tensor_case(_drop_tensor, nested=False),
    "extra tensor": _tensor_case(_extra_tensor, nested=False),
    "tensor as a list": _tensor_case(_not_a_tensor, nested=False),
    "tensor of another shape": _tensor_case(_extra_axis, nested=False),
    "tensor of another dtype": _tensor_case(_wrong_dtype, nested=False),
    "missing setting": _config_case(_drop_setting, optional=False),
    "setting of another type": _config_case(_string_setting),
    "extra setting": _extra_setting,
    "None child": _child_case(_none_child),
    "no children": _child_case(_no_children),
    "nested: child of another type": _child_case(_child_of_another_type),
    "nested: missing tensor": _tensor_case(_drop_tensor, nested=True),
    "nested: extra tensor": _tensor_case(_extra_tensor, nested=True),
    "nested: tensor of another shape": _tensor_case(_extra_axis, nested=True),
    "nested: tensor of another dtype": _tensor_case(_wrong_dtype, nested=True),
}


@pytest.fixture(scope="module", params=list(OPERATORS))
def built(request):
    op = OPERATORS[request.param]()
    return op, op.state_dict()


@pytest.mark.parametrize("case", list(CASES))
def test_a_tampered_state_dict_names_the_operator_and_the_key(built, case):
    op, state = built
    tampered = CASES[case](copy.deepcopy(state))
    if tampered is None:
        pytest.skip(f"{case!r} does not apply to a {state['type']}")
    tampered, key = tampered
    root = type(op).__name__
    named = tampered.get("type") if isinstance(tampered, dict) else None
    for load in (curvops.from_state_dict, copy.deepcopy(op).load_state_dict):
        with pytest.raises(curvops.StateDictError) as error:
            load(tampered)
        message = str(error.value)
        assert key in message
        # the operator: the one being loaded into, or the type the state dict says it is
        starts = [root, "state dict"] + ([named] if isinstance(named, str) else [])
        assert message.startswith(tuple(starts)), message
        if case.startswith("nested"):
            assert ".children[" in message, message


def test_a_nested_error_gives_the_path_of_the_sub_operator():
    op = OPERATORS["BlockDiagonal"]()
    state = op.state_dict()
    state["children"][1]["tensors"]["factor0"] = state["children"][1]["tensors"]["factor0"].float()
    path = re.escape("BlockDiagonal.children[1].tensors['factor0']: Kronecker tensor 'factor0' has dtype")
    for load in (curvops.from_state_dict, op.load_state_dict):
        with pytest.raises(curvops.StateDictError, match=path):
            load(state)
    kfac = OPERATORS["KFAC"]()
    state = kfac.state_dict()
    del state["children"][2]["tensors"]["factor1"]
    with pytest.raises(curvops.StateDictError, match=re.escape("BlockDiagonal.children['2.weight']")):
        kfac.load_state_dict(state)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            curvops.Identity(5, dtype=DOUBLE).state_dict() | {"config": {"size": 5.5}},
            "'size' must be an integer",
        ),
        (
            curvops.Identity(5, dtype=DOUBLE).state_dict() | {"config": {"size": True}},
            "'size' must be an integer",
        ),
        (
            curvops.Identity(5, dtype=DOUBLE).state_dict() | {"config": {"size": -5}},
            "'size' must be an integer >= 0",
        ),
        ((2 * _dense()).state_dict() | {"config": {"scale": "2"}}, "'scale' must be a finite real number"),
        ((2 * _dense()).state_dict() | {"config": {"scale": True}}, "'scale' must be a finite real number"),
        ((2 * _dense()).state_dict() | {"config": {"scale": float("nan")}}, "'scale' must be a finite real"),
        ((_dense() + _dense()).state_dict() | {"config": {"shift": "0"}}, "'shift' must be a finite real"),
        (
            curvops.LowRankUpdate(_dense(), torch.ones(3, dtype=DOUBLE)).state_dict()
            | {"config": {"sign": 2.0}},
            "'sign' must be \\+1 or -1",
        ),
        (
            curvops.BlockDiagonal([_dense()], ["a"]).state_dict() | {"config": {"labels": [0]}},
            "'labels' must be a list of strings",
        ),
        (
            _dense().inverse(0.1, method="cg").state_dict()
            | {"config": {"damping": 0.1, "rtol": 1e-8, "maxiter": 10.0}},
            "'maxiter' must be an integer",
        ),
    ],
)
def test_settings_have_exact_types_and_are_not_coerced(state, message):
    with pytest.raises(curvops.StateDictError, match=message):
        curvops.from_state_dict(state)


def test_constructors_refuse_coercible_sizes_and_scales():
    with pytest.raises(TypeError, match=r"Identity size must be an integer, got 5\.5"):
        curvops.Identity(5.5)
    with pytest.raises(TypeError, match="Identity size must be an integer, got True"):
        curvops.Identity(True)
    with pytest.raises(TypeError, match="Scaled's scale must be a real number, got '2'"):
        curvops.Scaled(_dense(), "2")
    with pytest.raises(TypeError, match="Sum's shift must be a real number, got '2'"):
        curvops.Sum([_dense()], "2")
    assert curvops.Identity(np.int64(3)).shape == (3, 3)
    op = _dense()
    torch.testing.assert_close(curvops.Scaled(op, torch.tensor(2.0)).to_dense(), 2 * op.matrix)
    torch.testing.assert_close((op * np.float64(2.0)).to_dense(), 2 * op.matrix)


def test_kfac_state_of_other_layer_names_is_refused():
    loss = nn.CrossEntropyLoss()
    ours = curvops.KFAC(_mlp(), loss, _data())
    theirs = curvops.KFAC(_mlp(["fc1", "act", "fc2"]), loss, _data())
    torch.testing.assert_close(theirs.to_dense(), ours.to_dense())  # same matrix, other layers
    state = _saved(theirs.state_dict())
    with pytest.raises(curvops.StateDictError) as error:
        ours.load_state_dict(state)
    message = str(error.value)
    assert message.startswith("BlockDiagonal.config['labels']")
    for theirs_label, ours_label in (("fc1.weight", "0.weight"), ("fc2.bias", "2.bias")):
        assert f"{theirs_label!r} where the operator has {ours_label!r}" in message
    assert ours.labels == ("0.weight", "0.bias", "2.weight", "2.bias")  # unchanged
    assert curvops.from_state_dict(state).labels == theirs.labels  # rebuilding keeps its own labels
    ekfac = curvops.EKFAC(_mlp(), loss, _data(), bias="joint")
    other = curvops.EKFAC(_mlp(["fc1", "act", "fc2"]), loss, _data(), bias="joint")
    with pytest.raises(curvops.StateDictError, match="'fc1' where the operator has '0', 'fc2' where"):
        ekfac.load_state_dict(other.state_dict())


def test_block_labels_missing_or_not_matching_the_blocks():
    op = curvops.BlockDiagonal([_dense(), _dense(2)], ["a", "b"])
    state = op.state_dict()
    unlabelled = copy.deepcopy(state)
    del unlabelled["config"]["labels"]
    assert curvops.from_state_dict(unlabelled).labels is None  # labels are optional
    with pytest.raises(curvops.StateDictError, match=r"BlockDiagonal: state dict has settings \[\]"):
        op.load_state_dict(unlabelled)
    state["config"]["labels"] = ["a", "b", "c"]
    with pytest.raises(
        curvops.StateDictError, match=r"BlockDiagonal: BlockDiagonal cannot be built .* labels"
    ):
        curvops.from_state_dict(state)
    with pytest.raises(
        curvops.StateDictError, match=r"\['a', 'b', 'c'\] where the operator has \['a', 'b'\]"
    ):
        op.load_state_dict(state)


def _saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", list(OPERATORS))
def test_round_trips_through_a_file_stay_exact(name):
    op = OPERATORS[name]()
    state = _saved(op.state_dict())
    rebuilt = curvops.from_state_dict(state)
    x = torch.randn(op.shape[0], 3, generator=generator(4), dtype=DOUBLE)
    assert type(rebuilt) is type(op) and rebuilt.state_dict()["config"] == op.state_dict()["config"]
    assert torch.equal(rebuilt @ x, op @ x)
    fresh = OPERATORS[name]()
    fresh.load_state_dict(state)
    assert torch.equal(fresh @ x, op @ x)
    if isinstance(op, curvops.BlockDiagonal):
        assert rebuilt.labels == op.labels == fresh.labels


def test_every_built_in_operator_declares_its_state():
    rebuildable = [
        cls
        for cls in _REGISTRY.values()
        if cls.__module__.startswith("curvops.")
        and cls._from_state.__func__ is not curvops.CurvatureOperator._from_state.__func__
    ]
    assert {cls.__name__ for cls in rebuildable} >= {
        "Dense", "Diagonal", "Identity", "Kronecker", "KroneckerEigen", "BlockDiagonal",
        "Permuted", "Scaled", "Sum", "LowRankUpdate", "LanczosPower", "CGInverse",
    }  # fmt: skip
    for cls in rebuildable:
        assert cls._state_schema({}) is not None, cls.__name__


def test_a_user_operator_without_a_declaration_still_round_trips():
    class Twice(curvops.CurvatureOperator):
        def __init__(self, matrix):
            super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
            self.matrix = matrix

        def _matmat(self, x):
            return 2 * self.matrix @ x

        def _state_tensors(self):
            return {"m": self.matrix}

        @classmethod
        def _from_state(cls, tensors, children, config, dtype, device):
            return cls(tensors["m"])

    op = Twice(random_psd(3))
    assert torch.equal(curvops.from_state_dict(_saved(op.state_dict())).to_dense(), 2 * op.matrix)
    state = op.state_dict()
    state["tensors"]["m"] = [1.0]
    with pytest.raises(curvops.StateDictError, match=r"tensors\['m'\]: is not a tensor but list"):
        curvops.from_state_dict(state)
