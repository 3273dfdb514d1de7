"""What resify knows about torch ops (resify/ops.py): the predicates and lookups on the nodes of small
traced models, module style and functional style, each node checked against a table of exact answers."""

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations, parametrize

from resify.analysis.bounds import is_bounded_activation, reaches_output_unchanged
from resify.ops import (
    ACTIVATION_METHODS,
    DROPOUT_FUNCTIONS,
    SHAPE_KEEPING_ACTIVATION_FUNCTIONS,
    SHAPE_KEEPING_ACTIVATION_MODULES,
    called_module,
    data_input,
    describe,
    fetch,
    follower_role,
    is_elementwise,
    is_layer_node,
    is_multiply,
    is_nonlinear,
    layer_kind,
    layer_name,
    layer_weight,
    merge_operands,
    parametrized_originals,
)


class Modules(nn.Module):
    """Module style: every op a submodule (a weight-normed Linear among them)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(8, 8)
        self.wn = parametrizations.weight_norm(nn.Linear(8, 8))
        self.blocks = nn.Sequential(nn.Conv1d(1, 2, 3), nn.MaxPool1d(2), nn.ReLU6())
        self.flat = nn.Flatten()
        self.sig = nn.Sigmoid()
        self.keep = nn.Identity()

    def forward(self, x):
        h = self.drop(self.bn(self.act(self.fc1(x))))
        y = self.fc2(h) + h
        c = self.blocks(self.wn(y).unsqueeze(1))
        return self.keep(self.sig(self.flat(c))).view(-1)


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4))
        self.bias = nn.Parameter(torch.zeros(6))


class Functional(nn.Module):
    """Functional style: parameters read by F.linear / F.conv1d, activations and arithmetic as calls."""

    def __init__(self):
        super().__init__()
        self.holder = Holder()
        self.w = nn.Parameter(torch.randn(6, 6))
        self.k = nn.Parameter(torch.randn(2, 1, 3))

    def forward(self, x):
        h = F.relu(F.linear(x, self.holder.weight, bias=self.holder.bias))
        h2 = F.linear(h, weight=self.w)  # weight by keyword
        h3 = F.linear(h2, self.w * 2)  # a computed weight: not a layer
        c = F.max_pool1d(F.conv1d(h3.unsqueeze(1), self.k), 2)
        g = F.dropout(torch.cat([h, h2], 1).tanh(), 0.1)
        e = torch.exp(g * torch.sigmoid(g) * 2)
        sums = (torch.cat(tensors=[h, h2]), h.add(h2), torch.cat([h]), h + 1, h - h2, torch.add(h, h2), h.sub(h2))
        maths = (h**2, torch.neg(h), torch.abs(h), h.mul(2), h.mul(h2), h.exp(), h / h2)
        return torch.softmax(F.layer_norm(c, (2,)).flatten(1), -1), e, h.relu(), sums, maths


@pytest.fixture(scope="module")
def modules():
    model = Modules()
    return model, torch.fx.symbolic_trace(model)


@pytest.fixture(scope="module")
def functional():
    model = Functional()
    return model, torch.fx.symbolic_trace(model)


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


# name: (is_layer_node, follower_role, describe, is_bounded_activation, reaches_output_unchanged)
MODULE_NODES = {
    "x": (False, None, "'x'", False, False),
    "fc1": (True, None, "'fc1' (Linear)", False, False),
    "act": (False, "activation", "'act' (GELU)", False, False),
    "bn": (False, "norm", "'bn' (BatchNorm1d)", False, False),
    "drop": (False, "dropout", "'drop' (Dropout)", False, False),
    "fc2": (True, None, "'fc2' (Linear)", False, False),
    "add": (False, None, "'add' (add)", False, False),
    "wn": (True, None, "'wn' (ParametrizedLinear)", False, False),
    "unsqueeze": (False, None, "'unsqueeze' (Tensor.unsqueeze)", False, False),
    "blocks_0": (True, None, "'blocks.0' (Conv1d)", False, False),
    "blocks_1": (False, "pool", "'blocks.1' (MaxPool1d)", False, False),
    "blocks_2": (False, "activation", "'blocks.2' (ReLU6)", True, False),  # ReLU6 is a Hardtanh: bounded
    "flat": (False, None, "'flat' (Flatten)", False, False),
    "sig": (False, "activation", "'sig' (Sigmoid)", True, True),  # then Identity and view: shape ops only
    "keep": (False, "dropout", "'keep' (Identity)", False, True),
    "view": (False, None, "'view' (Tensor.view)", False, True),
    "output": (False, None, "'output'", False, False),
}

FUNCTIONAL_NODES = {
    "holder_weight": (False, None, "'holder_weight'", False, False),
    "linear": (True, None, "'linear' (linear)", False, False),
    "relu": (False, "activation", "'relu' (relu)", False, False),
    "linear_1": (True, None, "'linear_1' (linear)", False, False),
    "mul": (False, None, "'mul' (mul)", False, False),
    "linear_2": (False, None, "'linear_2' (linear)", False, False),
    "conv1d": (True, None, "'conv1d' (conv1d)", False, False),
    "max_pool1d": (False, "pool", "'max_pool1d' (max_pool1d)", False, False),
    "tanh": (False, "activation", "'tanh' (Tensor.tanh)", True, False),
    "dropout": (False, "dropout", "'dropout' (dropout)", False, False),
    "sigmoid": (False, "activation", "'sigmoid' (sigmoid)", True, False),
    "layer_norm": (False, "norm", "'layer_norm' (layer_norm)", False, False),
    "flatten": (False, None, "'flatten' (Tensor.flatten)", False, False),
    "softmax": (False, None, "'softmax' (softmax)", True, True),
    "exp": (False, None, "'exp' (exp)", False, True),
    "relu_1": (False, "activation", "'relu_1' (Tensor.relu)", False, True),
}


@pytest.mark.parametrize("name,expected", MODULE_NODES.items(), ids=MODULE_NODES.keys())
def test_module_style_nodes(modules, name, expected):
    _, gm = modules
    n = _node(gm, name)
    got = (
        is_layer_node(gm, n),
        follower_role(gm, n),
        describe(gm, n),
        is_bounded_activation(gm, n),
        reaches_output_unchanged(gm, n),
    )
    assert got == expected


@pytest.mark.parametrize("name,expected", FUNCTIONAL_NODES.items(), ids=FUNCTIONAL_NODES.keys())
def test_functional_style_nodes(functional, name, expected):
    _, gm = functional
    n = _node(gm, name)
    got = (
        is_layer_node(gm, n),
        follower_role(gm, n),
        describe(gm, n),
        is_bounded_activation(gm, n),
        reaches_output_unchanged(gm, n),
    )
    assert got == expected


# (graph, node): (layer_kind, layer_name, path of the weight tensor under the model)
LAYERS = {
    ("modules", "fc1"): ("Linear", "fc1", "fc1.weight"),
    ("modules", "fc2"): ("Linear", "fc2", "fc2.weight"),
    ("modules", "blocks_0"): ("Conv1d", "blocks.0", "blocks.0.weight"),
    ("functional", "linear"): ("Linear", "holder", "holder.weight"),
    ("functional", "linear_1"): ("Linear", "w", "w"),
    ("functional", "conv1d"): ("Conv1d", "k", "k"),
}


@pytest.mark.parametrize("where,expected", LAYERS.items(), ids=[f"{g}:{n}" for g, n in LAYERS])
def test_layer_kind_name_and_weight(request, where, expected):
    model, gm = request.getfixturevalue(where[0])
    n = _node(gm, where[1])
    kind, name, weight = expected
    assert (layer_kind(gm, n), layer_name(n)) == (kind, name)
    assert layer_weight(gm, n) is fetch(model, weight)


def test_a_parametrized_layer_gives_its_stored_tensor_as_weight(modules):
    """The stored original of the weight's shape (weight_norm's direction v, not its magnitude g),
    never the computed weight; the report reads the same tensor."""
    model, gm = modules
    n = _node(gm, "wn")
    assert layer_name(n) == "wn"
    assert layer_weight(gm, n) is model.wn.parametrizations.weight.original1
    assert tuple(layer_weight(gm, n).shape) == (8, 8)


def test_layer_weight_does_not_step_a_spectral_norm():
    model = nn.Sequential(parametrizations.spectral_norm(nn.Linear(5, 3)))
    gm = torch.fx.symbolic_trace(model)
    u = model[0].parametrizations.weight[0]._u.clone()
    w = layer_weight(gm, _node(gm, "_0"))
    assert w is model[0].parametrizations.weight.original
    assert torch.equal(model[0].parametrizations.weight[0]._u, u)


@pytest.mark.parametrize(
    "layer,kind",
    [
        (parametrizations.weight_norm(nn.Linear(4, 4)), "Linear"),
        (parametrizations.spectral_norm(nn.Conv2d(2, 2, 3)), "Conv2d"),
    ],
    ids=["weight_norm Linear", "spectral_norm Conv2d"],
)
def test_a_parametrized_layer_is_of_its_module_kind(layer, kind):
    gm = torch.fx.symbolic_trace(nn.Sequential(layer))
    assert layer_kind(gm, _node(gm, "_0")) == kind


MERGES = {
    ("modules", "add"): ("add", ["fc2", "drop"]),  # self.fc2(h) + h
    ("functional", "cat"): ("concat", ["relu", "linear_1"]),
    ("functional", "cat_1"): ("concat", ["relu", "linear_1"]),  # torch.cat(tensors=[...])
    ("functional", "add"): ("add", ["relu", "linear_1"]),  # h.add(h2)
    ("functional", "add_2"): ("add", ["relu", "linear_1"]),  # torch.add(h, h2)
    ("functional", "cat_2"): None,  # one operand
    ("functional", "add_1"): None,  # h + 1: one graph value
    ("functional", "sub"): None,
    ("functional", "mul_1"): None,
    ("modules", "fc1"): None,
}


@pytest.mark.parametrize("where,expected", MERGES.items(), ids=[f"{g}:{n}" for g, n in MERGES])
def test_merge_operands(request, where, expected):
    _, gm = request.getfixturevalue(where[0])
    got = merge_operands(_node(gm, where[1]))
    assert (got if got is None else (got[0], [o.name for o in got[1]])) == expected


# node of the functional graph: (is_elementwise, is_nonlinear)
ELEMENTWISE = {
    "relu": (True, True),
    "tanh": (True, True),  # Tensor.tanh
    "sigmoid": (True, True),
    "mul_1": (True, True),  # g * sigmoid(g): both operands from the graph
    "mul_2": (True, False),  # … * 2
    "exp": (True, True),
    "pow_1": (True, True),  # h ** 2
    "neg": (True, False),
    "abs_1": (True, False),
    "mul_3": (True, False),  # h.mul(2)
    "mul_4": (True, True),  # h.mul(h2)
    "exp_1": (True, True),  # h.exp()
    "truediv": (True, True),  # h / h2
    "add": (True, False),  # h.add(h2)
    "sub_1": (True, False),  # h.sub(h2)
    "add_1": (True, False),  # h + 1
    "mul": (True, False),  # self.w * 2
    "cat": (False, False),
    "unsqueeze": (False, False),
    "dropout": (False, False),
    "linear": (False, False),
    "x": (False, False),
}


@pytest.mark.parametrize("name,expected", ELEMENTWISE.items(), ids=ELEMENTWISE.keys())
def test_elementwise_and_nonlinear(functional, name, expected):
    _, gm = functional
    n = _node(gm, name)
    assert (is_elementwise(n), is_nonlinear(n)) == expected


@pytest.mark.parametrize("name", ["sub", "add_2"], ids=["h - h2", "torch.add(h, h2)"])
def test_a_sum_of_two_graph_values_is_linear(functional, name):
    _, gm = functional
    assert is_nonlinear(_node(gm, name)) is False


def test_is_multiply_is_an_element_wise_product_not_a_matrix_product():
    class Products(nn.Module):
        def forward(self, x, g):
            return x * g, torch.mul(x, g), x.mul(g), x @ g, torch.matmul(x, g), x + g

    gm = torch.fx.symbolic_trace(Products())
    found = [is_multiply(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert found == [True, True, True, False, False, False]


def test_called_module_is_the_models_own_submodule(modules):
    model, gm = modules
    assert called_module(gm, _node(gm, "blocks_0")) is model.blocks[0]
    assert called_module(gm, _node(gm, "wn")) is model.wn
    assert [called_module(gm, _node(gm, n)) for n in ("x", "add", "unsqueeze", "view", "output")] == [None] * 5


def test_fetch_walks_a_dotted_path():
    model = Modules()
    assert fetch(model, "blocks.0.weight") is model.blocks[0].weight
    assert fetch(model, "bn.running_mean") is model.bn.running_mean
    assert fetch(model, "blocks") is model.blocks
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        fetch(model, "blocks.nope.weight")


class Scale(nn.Module):
    def forward(self, x):
        return 2 * x


@pytest.mark.parametrize(
    "make,name,originals",
    [
        (lambda: parametrizations.weight_norm(nn.Linear(3, 2)), "weight", ["original0", "original1"]),
        (lambda: parametrizations.spectral_norm(nn.Linear(3, 2)), "weight", ["original"]),
        (lambda: parametrize.register_parametrization(nn.Linear(3, 2), "bias", Scale()), "bias", ["original"]),
    ],
    ids=["weight_norm", "spectral_norm", "a parametrized bias"],
)
def test_parametrized_originals(make, name, originals):
    m = make()
    stored = m.parametrizations[name]
    assert [id(p) for p in parametrized_originals(m, name)] == [id(getattr(stored, o)) for o in originals]


def test_data_input(functional):
    _, gm = functional
    assert data_input(_node(gm, "relu")) is _node(gm, "linear")
    assert data_input(_node(gm, "cat_1")) == [_node(gm, "relu"), _node(gm, "linear_1")]  # the only keyword
    assert data_input(_node(gm, "x")) is None


_ACTIVATION_ARGS = {nn.Threshold: (0.1, 0.0)}
_FUNCTION_ARGS = {F.threshold: (0.1, 0.0), F.prelu: (torch.tensor([0.25]),)}
_FUNCTION_SHAPES = {F.dropout2d: (2, 3, 4, 5), F.dropout3d: (2, 3, 2, 4, 5)}  # channel-wise dropout's own ranks


@pytest.mark.parametrize("cls", SHAPE_KEEPING_ACTIVATION_MODULES, ids=lambda c: c.__name__)
def test_each_shape_keeping_activation_module_keeps_the_shape(cls):
    x = torch.randn(2, 3, 5)
    assert cls(*_ACTIVATION_ARGS.get(cls, ()))(x).shape == x.shape


@pytest.mark.parametrize(
    "fn",
    sorted(SHAPE_KEEPING_ACTIVATION_FUNCTIONS | DROPOUT_FUNCTIONS, key=lambda f: f.__name__),
    ids=lambda f: f.__name__,
)
def test_each_shape_keeping_activation_and_dropout_function_keeps_the_shape(fn):
    x = torch.randn(_FUNCTION_SHAPES.get(fn, (2, 3, 5)))
    assert fn(x.clone(), *_FUNCTION_ARGS.get(fn, ())).shape == x.shape


@pytest.mark.parametrize("method", sorted(ACTIVATION_METHODS))
def test_each_activation_method_keeps_the_shape(method):
    x = torch.randn(2, 3, 5)
    assert getattr(x.clone(), method)().shape == x.shape
