"""resify.apply on the seed guide's plain networks equals the guide's hand-written residual ones."""

import pytest
import torch
from reference import ExampleDeepNeuralNetwork, ImprovedResidualNetwork, assert_every_parameter_has_grad, is_resify_key

import resify

SIZES = [[128, 64, 32, 16, 8, 1], [32, 32, 32, 32, 32, 32], [64, 64, 32, 32, 16, 4], [10, 20, 20, 5, 5, 3]]


def _copy_seed_weights(converted, reference, sizes):
    """Copy the reference's layer and projection weights into the converted model by name."""
    state = converted.state_dict()
    for key, value in reference.state_dict().items():
        if key.startswith("projections."):
            i = int(key.split(".")[1])
            key = f"layers.{i}.resify.0.proj." + key.split(".")[-1]  # under its owner, layers.{i}
        assert key in state, key
        state[key] = value.clone()
    converted.load_state_dict(state)


@pytest.mark.parametrize("sizes", SIZES)
def test_auto_equals_improved_residual_network(sizes):
    torch.manual_seed(0)
    reference = ImprovedResidualNetwork(sizes, True)
    plain = ImprovedResidualNetwork(sizes, False)
    plain.load_state_dict({k: v for k, v in reference.state_dict().items() if k.startswith("layers.")})
    x = torch.randn(10, sizes[0])
    converted = resify.apply(plain, x, shortcut="auto", gate=None)
    _copy_seed_weights(converted, reference, sizes)
    n_proj = sum(a != b for a, b in zip(sizes, sizes[1:]))
    plan = resify.applied_plan(converted)
    assert [s.kind for s in plan.sites] == ["projection" if a != b else "identity" for a, b in zip(sizes, sizes[1:])]
    assert sum(s.kind == "projection" for s in plan.sites) == n_proj
    torch.testing.assert_close(converted(x), reference(x), rtol=0, atol=1e-6)
    x2 = torch.randn(3, sizes[0])  # a different batch size: the symbolic trace is shape-generic
    torch.testing.assert_close(converted(x2), reference(x2), rtol=0, atol=1e-6)
    converted(x).sum().backward()
    assert_every_parameter_has_grad(converted)


@pytest.mark.parametrize("sizes", SIZES)
def test_identity_equals_example_deep_network(sizes):
    torch.manual_seed(1)
    reference = ExampleDeepNeuralNetwork(sizes, True)
    plain = ExampleDeepNeuralNetwork(sizes, False)
    plain.load_state_dict(reference.state_dict())
    x = torch.randn(10, sizes[0])
    converted = resify.apply(plain, x, shortcut="identity", gate=None)
    torch.testing.assert_close(converted(x), reference(x), rtol=0, atol=1e-6)
    plan = resify.applied_plan(converted)
    assert len(plan.sites) == sum(a == b for a, b in zip(sizes, sizes[1:]))
    assert all(s.kind == "identity" and s.added_params == 0 for s in plan.sites)
    for s in plan.skipped:
        assert "shortcut='auto'" in s.reason


def test_seed_network_with_its_own_shortcuts_converts_on_the_concrete_tracer():
    """ExampleDeepNeuralNetwork(..., True) branches on shapes: symbolic tracing fails, resify falls back."""
    sizes = [32, 32, 32, 16, 16, 1]
    torch.manual_seed(2)
    model = ExampleDeepNeuralNetwork(sizes, True)
    x = torch.randn(4, 32)
    with pytest.warns(resify.ResifyWarning, match=r"valid for inputs shaped like \[4, 32\]"):
        resify.apply(model, x, graph_module=True)  # one graph for the model: specialised on the example
    converted = resify.apply(model, x)  # the sites' owners, layers.2 and layers.4, trace for any input
    plan = resify.applied_plan(converted)
    assert plan.tracer == "concrete"
    # its own three identity shortcuts are found; the two layers that change shape get projections
    assert [e.start for e in plan.existing] == ["layers.0.0", "layers.1.0", "layers.3.0"]
    assert [(s.start, s.kind) for s in plan.sites] == [("layers.2.0", "projection"), ("layers.4.0", "projection")]
    # with the projections' weights at zero the function is the original one
    with torch.no_grad():
        for name, p in converted.named_parameters():
            if is_resify_key(name):
                p.zero_()
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-6)
    x7 = torch.randn(7, 32)
    torch.testing.assert_close(converted(x7), model(x7), rtol=0, atol=1e-6)


def test_seed_example_without_input_is_derived_from_the_first_linear():
    plan = resify.plan(ImprovedResidualNetwork([128, 64, 32, 16, 8, 1], False))
    assert plan.sites[0].in_shape == (2, 128)
    assert [s.projection for s in plan.sites] == [
        "Linear(128, 64)",
        "Linear(64, 32)",
        "Linear(32, 16)",
        "Linear(16, 8)",
        "Linear(8, 1)",
    ]
    assert plan.added_params == sum(a * b + b for a, b in [(128, 64), (64, 32), (32, 16), (16, 8), (8, 1)])
