"""Property-based checks: any plain MLP or CNN of these families keeps resify's invariants."""
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import resify
from reference import assert_every_parameter_has_grad

ACTIVATIONS = [nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU]


@st.composite
def mlps(draw):
    widths = draw(st.lists(st.integers(1, 12), min_size=2, max_size=7))
    act = draw(st.sampled_from(ACTIVATIONS))
    norm = draw(st.booleans())
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), *( [nn.LayerNorm(b)] if norm else []), act()]
    return nn.Sequential(*layers), widths


@st.composite
def cnns(draw):
    channels = draw(st.lists(st.integers(1, 6), min_size=2, max_size=5))
    pools = draw(st.lists(st.booleans(), min_size=len(channels) - 1, max_size=len(channels) - 1))
    layers = []
    for (a, b), pool in zip(zip(channels, channels[1:]), pools):
        layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers), channels


@settings(max_examples=25, deadline=None)
@given(mlps(), st.sampled_from([None, "rezero", "layerscale"]), st.integers(1, 3))
def test_any_mlp_converts_with_every_invariant(built, gate, group):
    model, widths = built
    x = torch.randn(3, widths[0])
    converted = resify.apply(model, x, gate=gate, group=group)
    plan = converted.meta["resify_plan"]
    converted.graph.lint()
    n_layers = len(widths) - 1
    # every layer is covered by one span of `group`, but a last span whose bounded activation
    # (Tanh, Sigmoid) makes the model's output range
    bounded = isinstance(model[-1], (nn.Tanh, nn.Sigmoid)) and n_layers % group == 0
    assert len(plan.sites) == n_layers // group - bounded
    for s in plan.sites:
        assert s.kind == ("identity" if s.in_shape == s.out_shape else "projection")
    y = converted(x)
    assert y.shape == model(x).shape
    y.sum().backward()
    assert_every_parameter_has_grad(converted)
    assert sum(p.numel() for p in converted.parameters()) == plan.params_before + plan.added_params


@settings(max_examples=15, deadline=None)
@given(cnns(), st.sampled_from(["auto", "dense"]))
def test_any_cnn_converts_and_dense_keeps_outputs(built, shortcut):
    model, channels = built
    model.eval()
    size = 2 * 2 ** sum(isinstance(m, nn.MaxPool2d) for m in model)  # every pool has room to halve
    x = torch.randn(2, channels[0], size, size)
    converted = resify.apply(model, x, shortcut=shortcut).eval()
    plan = converted.meta["resify_plan"]
    converted.graph.lint()
    with torch.no_grad():
        y = converted(x)
    assert y.shape == model(x).shape
    if shortcut == "dense":
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)
        assert len(plan.sites) == len(channels) - 2  # the last layer feeds the output: nothing to widen


@settings(max_examples=15, deadline=None)
@given(mlps(), st.sampled_from([None, "rezero", "layerscale"]))
def test_preserve_output_keeps_any_mlp_unchanged(built, gate):
    model, widths = built
    x = torch.randn(3, widths[0])
    converted = resify.apply(model, x, gate=gate, preserve_output=True)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)
