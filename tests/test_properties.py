"""Property-based checks: any plain MLP or CNN of these families keeps resify's invariants."""

import copy

import torch
import torch.nn as nn
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import assert_every_parameter_has_grad

import resify

ACTIVATIONS = [nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU]


@st.composite
def mlps(draw):
    widths = draw(st.lists(st.integers(1, 12), min_size=2, max_size=7))
    act = draw(st.sampled_from(ACTIVATIONS))
    norm = draw(st.booleans())
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), *([nn.LayerNorm(b)] if norm else []), act()]
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
    plan = resify.applied_plan(converted)
    assert type(converted) is type(model)  # the user's class: shortcuts live in its modules' forwards
    n_layers = len(widths) - 1
    linears = [name for name, m in model.named_children() if isinstance(m, nn.Linear)]
    covered = [name for s in plan.sites for name in s.layers]
    if group == 1:
        # the sites tile the layers in order: one layer each, or 2 to 4 layers whose widths come back
        # to the input's (an identity instead of two projections); the last layer is left out exactly
        # when its bounded activation (Tanh, Sigmoid) makes the model's output range, and only it
        bounded = isinstance(model[-1], (nn.Tanh, nn.Sigmoid))
        assert covered == linears[: len(linears) - bounded]
        assert [s.start for s in plan.skipped if s.code == "bounded_output"] == linears[len(linears) - bounded :]
        for s in plan.sites:
            assert len(s.layers) == 1 or (s.kind == "identity" and 2 <= len(s.layers) <= 4)
    else:
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
    plan = resify.applied_plan(converted)
    assert type(converted) is type(model)  # the user's class: shortcuts live in its modules' forwards
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


# ---------------------------------------------------------------------------------------------
# drop-in replacement over generated architectures: other sizes, other batches, both modes

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_ADAPTIVE = {
    1: (nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d),
    2: (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d),
    3: (nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d),
}
_BOUNDED = [None, None, nn.Sigmoid, nn.Tanh, lambda: nn.Softmax(dim=1)]


@st.composite
def _pool(draw, dims):
    kind = draw(st.sampled_from(["max", "avg", "adaptive", "adaptive_max"]))
    if kind.startswith("adaptive"):
        return _ADAPTIVE[dims][kind == "adaptive_max"](draw(st.integers(1, 3)))
    k = draw(st.integers(2, 3))
    s = draw(st.integers(1, 2))
    p = draw(st.integers(0, k // 2))
    ceil = draw(st.booleans())
    if kind == "max":
        return _MAXPOOL[dims](k, s, p, dilation=draw(st.integers(1, 2)), ceil_mode=ceil)
    return _AVGPOOL[dims](k, s, p, ceil_mode=ceil, count_include_pad=draw(st.booleans()))


@st.composite
def architectures(draw):
    """(model, example input shape, other input shapes): any mix of the layers resify handles."""
    dims = draw(st.sampled_from([0, 1, 2, 3]))  # 0: an MLP
    act = draw(st.sampled_from(ACTIVATIONS))
    depth = draw(st.integers(1, 4))
    batch = draw(st.integers(2, 3))
    layers: list = []
    if dims == 0:
        widths = draw(st.lists(st.integers(2, 10), min_size=depth + 1, max_size=depth + 1))
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), *([nn.LayerNorm(b)] if draw(st.booleans()) else []), act()]
        bounded = draw(st.sampled_from(_BOUNDED))
        layers += [nn.Linear(widths[-1], 3), *([bounded()] if bounded else [])]
        example = (batch, widths[0])
        others = [(draw(st.integers(1, 4)), widths[0]) for _ in range(2)]
        return nn.Sequential(*layers), example, others
    channels = draw(st.lists(st.integers(1, 6), min_size=depth + 1, max_size=depth + 1))
    for a, b in zip(channels, channels[1:]):
        k = draw(st.integers(1, 3))
        layers.append(
            _CONV[dims](
                a,
                b,
                k,
                stride=draw(st.integers(1, 2)),
                padding=draw(st.integers(0, k // 2)),
                dilation=draw(st.integers(1, 2)),
            )
        )
        norm = draw(st.sampled_from(["none", "batch", "group"]))
        if norm == "batch":
            layers.append(_BN[dims](b))
        elif norm == "group":
            layers.append(nn.GroupNorm(1, b))
        layers.append(act())
        if draw(st.booleans()):
            layers.append(draw(_pool(dims)))
    size = draw(st.integers(6, 12 if dims == 3 else 24))
    head = draw(st.sampled_from(["global", "flatten"]))
    if head == "global":
        layers += [_ADAPTIVE[dims][0](1), nn.Flatten(), nn.Linear(channels[-1], 4)]
    else:  # the flattened size fixes the input size: other sizes fail in both models
        with torch.no_grad():
            flat = (
                nn.Sequential(*layers, nn.Flatten())(torch.zeros(1, channels[0], *[size] * dims)).shape[1]
                if _accepts(nn.Sequential(*layers), (1, channels[0], *[size] * dims))
                else 1
            )
        layers += [nn.Flatten(), nn.Linear(flat, 4)]
    bounded = draw(st.sampled_from(_BOUNDED))
    layers += [bounded()] if bounded else []
    example = (batch, channels[0], *[size] * dims)
    others = [
        (draw(st.integers(1, 3)), channels[0], *[draw(st.integers(1, 30 if dims < 3 else 14)) for _ in range(dims)])
        for _ in range(3)
    ]
    return nn.Sequential(*layers), example, others


def _accepts(model, shape):
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(shape))
        return True
    except Exception:
        return False


def _outcome(model, x, train):
    model = copy.deepcopy(model).train(train)
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            return model(x), None
    except Exception as e:
        return None, e


@settings(max_examples=40, deadline=None)
@given(architectures())
def test_any_architecture_converts_to_a_drop_in_replacement(built):
    """Converted on one input, then for other sizes and batches, in train and eval mode: the
    converted model runs exactly when the original runs, with the same output shape, and with
    preserve_output=True the same outputs (rtol 1e-5) wherever the original's are finite."""
    model, example, others = built
    torch.manual_seed(0)
    x = torch.randn(example)
    assume(_accepts(model, example))
    model.eval()
    converted = resify.apply(model, x)
    preserved = resify.apply(model, x, preserve_output=True)
    for shape in [example, *others]:
        x = torch.randn(shape)
        for train in (False, True):
            want, error = _outcome(model, x, train)
            got, got_error = _outcome(converted, x, train)
            where = f"{shape}, {'train' if train else 'eval'}"
            assert (error is None) == (got_error is None), f"{where}: original {error!r}, converted {got_error!r}"
            if error is None:
                assert got.shape == want.shape, where
                same, _ = _outcome(preserved, x, train)
                if torch.isfinite(want).all():  # (a max-pool over padding alone gives -inf; β·S is then 0·inf)
                    torch.testing.assert_close(
                        same, want, rtol=1e-5, atol=1e-6, msg=lambda m, where=where: f"{where}: {m}"
                    )
