"""resify.analysis.bounds: which ops bound their output, which only reshape it, and what reaches the output unchanged."""

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from resify.analysis.bounds import is_bounded_activation, is_shape_op, reaches_output_unchanged


def _node(gm, target_name):
    return next(n for n in gm.graph.nodes if n.name == target_name)


class _Methods(nn.Module):
    def forward(self, x):
        a = x.sigmoid()
        b = x.relu()
        c = torch.tanh(x)
        d = F.relu(x)
        e = x.view(-1)
        f = x.exp()
        g = x[0]
        return a, b, c, d, e, f, g


@pytest.fixture(scope="module")
def methods():
    return torch.fx.symbolic_trace(_Methods())


@pytest.mark.parametrize(
    "module,bounded",
    [
        (nn.Sigmoid(), True),
        (nn.Tanh(), True),
        (nn.ReLU6(), True),  # a Hardtanh
        (nn.Hardsigmoid(), True),
        (nn.Softmax(dim=1), True),
        (nn.LogSoftmax(dim=1), True),
        (nn.Softmin(dim=1), True),
        (nn.ReLU(), False),  # unbounded above
        (nn.GELU(), False),
        (nn.Hardswish(), False),
        (nn.Linear(2, 2), False),
        (nn.Identity(), False),
    ],
)
def test_bounded_modules(module, bounded):
    gm = torch.fx.symbolic_trace(nn.Sequential(module))
    assert is_bounded_activation(gm, _node(gm, "_0")) is bounded


@pytest.mark.parametrize(
    "name,bounded,shape",
    [
        ("sigmoid", True, False),
        ("relu", False, False),
        ("tanh", True, False),
        ("relu_1", False, False),
        ("view", False, True),
        ("exp", False, False),
        ("getitem", False, True),
        ("x", False, False),  # a placeholder is neither
    ],
)
def test_functions_and_methods(methods, name, bounded, shape):
    n = _node(methods, name)
    assert is_bounded_activation(methods, n) is bounded
    assert is_shape_op(methods, n) is shape


@pytest.mark.parametrize(
    "module,shape", [(nn.Flatten(), True), (nn.Unflatten(1, (2, 2)), True), (nn.Identity(), True), (nn.ReLU(), False)]
)
def test_shape_modules(module, shape):
    gm = torch.fx.symbolic_trace(nn.Sequential(module))
    assert is_shape_op(gm, _node(gm, "_0")) is shape


class _Heads(nn.Module):
    """One sigmoid reaches the output through reshapes only; one through a multiply; one is not used."""

    def forward(self, x):
        through = torch.sigmoid(x).flatten(1).unsqueeze(0).permute(1, 0, 2).contiguous()
        scaled = torch.tanh(x) * 2
        unused = torch.softmax(x, 1)  # noqa: F841
        return through, scaled


def test_reaches_output_unchanged_through_shape_ops_only():
    gm = torch.fx.symbolic_trace(_Heads())
    nodes = {n.name: n for n in gm.graph.nodes}
    assert reaches_output_unchanged(gm, nodes["sigmoid"])
    assert reaches_output_unchanged(gm, nodes["flatten"])
    assert not reaches_output_unchanged(gm, nodes["tanh"])  # scaled by an arithmetic op first
    assert reaches_output_unchanged(gm, nodes["mul"])
    assert not reaches_output_unchanged(gm, nodes["softmax"])  # no user at all


def test_a_value_used_twice_reaches_the_output_where_one_path_does():
    class Two(nn.Module):
        def forward(self, x):
            s = torch.sigmoid(x)
            return s.view(-1) + 1, s.reshape(-1)

    gm = torch.fx.symbolic_trace(Two())
    assert reaches_output_unchanged(gm, _node(gm, "sigmoid"))

    class Neither(nn.Module):
        def forward(self, x):
            s = torch.sigmoid(x)
            return s.view(-1) + 1, s * s

    gm = torch.fx.symbolic_trace(Neither())
    assert not reaches_output_unchanged(gm, _node(gm, "sigmoid"))


def test_a_bounded_final_layer_of_a_sequential_reaches_the_output():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Flatten()))
    lin, sig = _node(gm, "_0"), _node(gm, "_1")
    assert is_bounded_activation(gm, sig) and reaches_output_unchanged(gm, sig)
    assert not is_bounded_activation(gm, lin) and not reaches_output_unchanged(gm, lin)


class _CastOutput(nn.Module):
    def __init__(self, method):
        super().__init__()
        self.method = method
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        s = torch.sigmoid(self.fc(x))
        return s.to(torch.float32) if self.method == "to" else getattr(s, self.method)()


@pytest.mark.parametrize("method", ["float", "clone", "detach", "to"])
def test_a_cast_or_copy_of_the_output_keeps_it_unchanged(method):
    gm = torch.fx.symbolic_trace(_CastOutput(method))
    # the values in [0, 1] are the model's output all the same
    assert reaches_output_unchanged(gm, _node(gm, "sigmoid"))


def test_the_planner_leaves_a_cast_bounded_output_alone():
    """A model that ends in ``torch.sigmoid(logits).float()`` keeps its outputs in [0, 1]."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return torch.sigmoid(self.fc2(torch.relu(self.fc1(x)))).float()

    import resify

    torch.manual_seed(0)
    plan = resify.plan(Net(), torch.randn(3, 4))
    assert [s.start for s in plan.sites] == ["fc1"]
    assert [(s.start, s.code) for s in plan.skipped] == [("fc2", "bounded_output")]
