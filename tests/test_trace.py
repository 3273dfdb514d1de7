"""The trace stage: tracers, shapes, derived inputs, and the errors a user can cause."""
import pytest
import torch
import torch.nn as nn

import resify
from resify.trace import trace


class TakesTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x, y):
        return self.b(torch.relu(self.a(x)) + y)


class UsesLen(nn.Module):
    """len() and int() of traced sizes: symbolic tracing fails, the concrete tracer copes."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x):
        n = len(x)
        h = torch.relu(self.fc1(x))
        if int(h.size(0)) == n:
            h = self.fc2(h)
        return h.view(n, -1)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.from_numpy(x.numpy()))  # leaves torch: no tracer can follow


def test_symbolic_trace_records_shapes_on_every_tensor_node():
    traced = trace(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), torch.randn(3, 8))
    assert traced.tracer == "symbolic"
    shapes = {n.name: n.meta["resify"].shape for n in traced.graph.nodes if n.meta.get("resify")}
    assert shapes == {"input_1": (3, 8), "_0": (3, 4), "_1": (3, 4), "output": (3, 4)}


def test_tuple_example_input():
    model = TakesTwo()
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    converted = resify.apply(model, (x, y))
    plan = converted.meta["resify_plan"]
    assert [s.start for s in plan.sites] == ["b"]  # 'a' is joined by y before 'b': not single-entry
    assert "joins the span" not in plan.skipped[0].reason or plan.skipped[0].start == "a"
    torch.testing.assert_close(converted(x, y), model(x, y) + torch.relu(model.a(x)) + y)


def test_concrete_tracer_handles_len_and_int():
    model = UsesLen()
    x = torch.randn(5, 6)
    with pytest.warns(resify.ResifyWarning, match=r"\[5, 6\]"):
        converted = resify.apply(model, x)
    assert converted.meta["resify_plan"].tracer == "concrete"
    h = torch.relu(model.fc1(x)) + x
    torch.testing.assert_close(converted(x), model.fc2(h) + h)


def test_concrete_trace_does_not_touch_batchnorm_statistics_or_rng():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            y = self.drop(self.bn(self.conv(x)))
            return y if y.shape == x.shape else x

    model = Branchy().train()
    x = torch.randn(2, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with pytest.warns(resify.ResifyWarning):
        converted = resify.apply(model, x)  # identity shortcut only: no new weights drawn
    assert torch.equal(torch.rand(3), expected_next)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    for k, v in converted.state_dict().items():
        if not k.startswith("resify."):
            assert torch.equal(v, state[k]), k


def test_untraceable_model_names_the_source_line():
    with pytest.raises(resify.TraceError, match=r"could not trace Untraceable.*test_trace.py:\d+.*leaf_modules"):
        resify.apply(Untraceable(), torch.randn(2, 4))


def test_leaf_modules_keep_a_module_whole():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Untraceable()

        def forward(self, x):
            return self.inner(x)

    plan = resify.plan(Wrapper(), torch.randn(2, 4), leaf_modules=[Untraceable])
    assert plan.n_layers == 0 and plan.sites == ()
    plan = resify.plan(Wrapper(), torch.randn(2, 4), leaf_modules=["inner"])
    assert plan.n_layers == 0


def test_wrong_input_shape_names_the_layer_and_shape():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(resify.TraceError, match=r"layer '0' \(Linear\) rejected input of shape \[2, 5\]"):
        resify.apply(model, torch.randn(2, 5))


def test_missing_input_for_a_conv_asks_for_one():
    with pytest.raises(resify.TraceError, match=r"example_input=torch.randn\(2, 3, 32, 32\)"):
        resify.plan(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))


@pytest.mark.parametrize("bad", [object(), "model.py", nn.Linear])
def test_non_module_is_a_type_error(bad):
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        resify.apply(bad)


def test_bad_example_input_type():
    with pytest.raises(resify.TraceError, match="example_input must be a tensor or a tuple"):
        resify.apply(nn.Linear(3, 3), example_input=3.0)


def test_tensor_constants_made_while_tracing_stay_off_the_users_model():
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.offset = torch.ones(4)  # a plain tensor attribute: fx stores it as a constant

        def forward(self, x):
            return self.fc(x) + self.offset

    model = WithConstant()
    names = set(vars(model))
    converted = resify.apply(model, torch.randn(2, 4))
    assert set(vars(model)) == names  # the tracer set its constants on a copy, not on the model
    x = torch.randn(2, 4)
    torch.testing.assert_close(converted(x), model(x) + x)


def test_converted_model_has_its_own_tensors_and_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Tied()
    converted = resify.apply(model, torch.randn(2, 6))
    assert converted.a.weight is converted.b.weight
    assert converted.a.weight is not model.a.weight
    with torch.no_grad():
        converted.a.weight.add_(1.0)
    assert not torch.equal(converted.a.weight, model.a.weight)
