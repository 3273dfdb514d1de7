"""The tracers (resify/tracing/tracers.py): leaves kept whole, concrete values that decide control flow,
the probe of self.training, and where a failed trace stopped."""

import threading

import pytest
import torch
import torch.nn as nn

from resify.tracing.tracers import (
    ConcreteTracer,
    LeafTracer,
    current_module,
    holds_tensor,
    raised_by_user,
    restore_placeholder_names,
    tracing,
    training_probe,
    user_frame,
)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = Inner(), Inner()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.second(self.first(x)))


def _called(graph):
    return [str(n.target) for n in graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize(
    "leaves, called",
    [
        ((), ["first.fc", "second.fc", "head"]),  # torch.nn layers are leaves, user modules are traced through
        ([Inner], ["first", "second", "head"]),
        (["sec*"], ["first.fc", "second", "head"]),
        (["first", nn.Linear], ["first", "second.fc", "head"]),
    ],
)
def test_leaf_modules_by_type_or_glob_stay_one_call(leaves, called):
    assert _called(LeafTracer(leaves).trace(Outer())) == called


class UsesLen(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        n = len(x)
        h = torch.relu(self.fc1(x))
        if int(h.size(0)) == n:  # decided on the example: one specialisation
            h = self.fc2(h)
        return h.view(n, -1)


def test_the_concrete_tracer_decides_control_flow_on_the_example_and_records_its_values():
    model, x = UsesLen(), torch.randn(5, 6)
    with pytest.raises(RuntimeError, match="'len' is not supported in symbolic tracing"):
        LeafTracer().trace(model)
    tracer = ConcreteTracer((x,))
    graph = tracer.trace(model)
    assert tracer.specialised == 1
    returned = next(n for n in graph.nodes if n.op == "output").args[0]
    assert torch.equal(tracer.values[returned], model(x))
    assert [n.name for n in graph.nodes] == ["x", "fc1", "relu", "size", "fc2", "view", "output"]
    tracer.record_shapes(graph)  # drops 'size': it only decided the branch
    assert {n.name: n.meta["resify"].shape for n in graph.nodes if n.meta["resify"]} == {
        "x": (5, 6),
        "fc1": (5, 6),
        "relu": (5, 6),
        "fc2": (5, 6),
        "view": (5, 6),
    }


def test_the_concrete_tracer_answers_dtype_and_device_with_the_real_ones():
    class Casts(nn.Module):
        def forward(self, x):
            eps = torch.finfo(x.dtype).eps
            return (x + eps).to(x.device) * float(x.shape[-1])

    x = torch.randn(2, 3, dtype=torch.float64)
    tracer = ConcreteTracer((x,))
    graph = tracer.trace(Casts())
    returned = next(n for n in graph.nodes if n.op == "output").args[0]
    torch.testing.assert_close(tracer.values[returned], (x + torch.finfo(torch.float64).eps) * 3.0)


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * (0.5 if self.training else 1.0)


class ModeFree(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


def test_the_probe_records_the_modules_that_read_self_training_and_restores_their_classes():
    model = nn.Sequential(ModeFree(), ModeDependent(), nn.Dropout(0.1))
    reads = []
    with training_probe(model, reads):
        assert type(model[1]) is not ModeDependent and isinstance(model[1], ModeDependent)
        assert type(model[0]) is ModeFree and type(model[2]) is nn.Dropout  # no 'training' in their source
        graph = LeafTracer().trace(model)
    assert reads == [model[1]]
    assert [type(m) for m in model] == [ModeFree, ModeDependent, nn.Dropout] and model[1].training
    assert "mul" in [n.name for n in graph.nodes]

    with training_probe(model, None):  # no list: nothing swapped
        assert type(model[1]) is ModeDependent


def test_tracing_is_one_at_a_time_and_probes_self_training():
    model = nn.Sequential(ModeDependent())
    reads, entered = [], threading.Event()

    def trace_elsewhere():
        with tracing(nn.Linear(1, 1)):
            entered.set()

    with tracing(model, reads):
        LeafTracer().trace(model)
        other = threading.Thread(target=trace_elsewhere)
        other.start()
        assert not entered.wait(0.2)  # the other thread waits for this trace to end
    other.join(30.0)
    assert entered.is_set() and not other.is_alive() and reads == [model[0]]


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        h = self.fc(x)
        return h if mask is None else h * mask


def test_a_specialised_parameter_gets_its_name_back():
    graph = LeafTracer().trace(Masked(), concrete_args={"mask": None})
    assert [n.target for n in graph.nodes if n.op == "placeholder"] == ["x", "mask_1"]  # fx's renaming
    restore_placeholder_names(graph, ["mask"])
    assert [n.target for n in graph.nodes if n.op == "placeholder"] == ["x", "mask"]
    code = torch.fx.GraphModule(Masked(), graph).code
    assert "def forward(self, x, mask = None):" in code


def _raise_here():
    raise ValueError("from the user's code")


def test_where_an_error_was_raised_is_the_users_line():
    with pytest.raises(ValueError) as mine:
        _raise_here()
    line = _raise_here.__code__.co_firstlineno + 1
    assert user_frame(mine.value) == f' at test_tracers.py:{line} `raise ValueError("from the user\'s code")`'
    assert raised_by_user(mine.value)
    with pytest.raises(AttributeError) as torchs:
        nn.Linear(2, 2).get_submodule("nope")  # raised in torch/nn/modules/module.py
    assert not raised_by_user(torchs.value)
    assert user_frame(torchs.value).startswith(" at test_tracers.py:")  # the caller's line, not torch's
    tracer = LeafTracer()
    assert current_module(tracer) == ""  # nothing traced yet
    tracer.module_stack = {"": None, "blocks.0": None}
    assert current_module(tracer) == " in module 'blocks.0'"


@pytest.mark.parametrize(
    "value, holds",
    [
        (torch.ones(1), True),
        ([1, (2, {"k": torch.ones(1)})], True),
        ({"a": [1, 2]}, False),
        ((None, "x", 3.0), False),
    ],
)
def test_holds_tensor(value, holds):
    assert holds_tensor(value) is holds


class _Rotate(nn.Module):
    """A function made a module at import time (as the ``kernels`` package does to transformers'
    rotary embedding) and called from a forward without being a submodule."""

    def forward(self, x):
        return torch.cat([-x[..., 2:], x[..., :2]], dim=-1)


_rotate = _Rotate()


class UsesAGlobalModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(torch.relu(_rotate(self.fc1(x))))


@pytest.mark.parametrize("tracer", ["symbolic", "concrete"])
def test_a_module_the_root_does_not_hold_is_traced_through_as_a_function(tracer):
    torch.manual_seed(0)
    model, x = UsesAGlobalModule(), torch.randn(3, 4)
    t = LeafTracer() if tracer == "symbolic" else ConcreteTracer((x,))
    gm = torch.fx.GraphModule(model, t.trace(model))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc1", "fc2"]
    assert torch.cat in [n.target for n in gm.graph.nodes]  # _rotate's own ops, inline
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_a_model_calling_a_module_it_does_not_hold_converts():
    import resify

    torch.manual_seed(0)
    model, x = UsesAGlobalModule(), torch.randn(3, 4)
    converted = resify.apply(model, x, preserve_output=True)
    assert [s.start for s in resify.applied_plan(converted).sites] == ["fc1", "fc2"]
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)
