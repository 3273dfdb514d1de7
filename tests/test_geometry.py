"""Spatial geometry (resify/planning/geometry.py): each Window read from an op's hyperparameters gives, at every
input size, the output size that torch itself gives on a real tensor, and None exactly where torch raises."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from resify.planning.geometry import SAME, Window, size_functions
from resify.tracing.trace import trace

SIZES = range(1, 41)
SAFE = 24  # a size every op of the tables accepts, for the spatial dims not under test


class Functional(nn.Module):
    """``fn(x, self.weight)``: a functional op with an optional weight parameter."""

    def __init__(self, fn, weight_shape=None):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(weight_shape)) if weight_shape else None

    def forward(self, x):
        return self.fn(x, self.weight)


def _windows(model, channels, dims):
    """The windows of the op whose value the traced model returns (a torch.nn layer stays one call_module node)."""
    wrapped = model if isinstance(model, Functional) else nn.Sequential(model)
    traced = trace(wrapped, torch.randn(1, channels, *[SAFE] * dims))
    (op,) = (n.args[0] for n in traced.graph.nodes if n.op == "output")
    assert op.op == "call_module" or isinstance(model, Functional), op.format_node()
    return size_functions(traced.root, op, dims)


def _torch_size(model, channels, dims, dim, n):
    """Output size of ``model`` along spatial ``dim`` for an input of size ``n`` there; None where torch raises."""
    shape = [1, channels, *[SAFE] * dims]
    shape[2 + dim] = n
    try:
        with torch.no_grad():
            return model(torch.zeros(shape)).shape[2 + dim]
    except RuntimeError:
        return None


# (module or Functional, input channels, spatial dims)
CASES = {
    "Conv1d k5": (nn.Conv1d(2, 3, 5), 2, 1),
    "Conv1d k4 s3 p2 d2": (nn.Conv1d(2, 3, 4, stride=3, padding=2, dilation=2), 2, 1),
    "Conv2d per-dim": (nn.Conv2d(2, 3, (3, 5), stride=(2, 1), padding=(1, 0), dilation=(1, 3)), 2, 2),
    "Conv2d valid": (nn.Conv2d(2, 3, 3, padding="valid"), 2, 2),
    "Conv2d same dilated": (nn.Conv2d(2, 3, 4, padding="same", dilation=2), 2, 2),
    "Conv3d per-dim": (nn.Conv3d(1, 2, (3, 2, 1), stride=(1, 2, 3), padding=(0, 1, 0)), 1, 3),
    "MaxPool1d k3 s2": (nn.MaxPool1d(3, 2), 1, 1),
    "MaxPool1d k3 s2 p1 ceil": (nn.MaxPool1d(3, 2, 1, ceil_mode=True), 1, 1),
    "MaxPool1d k4 s3 p2 d2": (nn.MaxPool1d(4, 3, 2, dilation=2), 1, 1),
    "MaxPool2d per-dim": (nn.MaxPool2d((3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1)), 1, 2),
    "MaxPool2d k3 s2 p1 ceil": (nn.MaxPool2d(3, 2, 1, ceil_mode=True), 1, 2),
    "MaxPool2d k5 s3 p2 ceil": (nn.MaxPool2d(5, 3, 2, ceil_mode=True), 1, 2),
    "MaxPool3d k2 (stride = kernel)": (nn.MaxPool3d(2), 1, 3),
    "AvgPool1d k4 s3 p2 ceil": (nn.AvgPool1d(4, 3, 2, ceil_mode=True), 1, 1),
    "AvgPool2d per-dim": (nn.AvgPool2d((2, 3), stride=(2, 2), padding=(1, 1)), 1, 2),
    "AvgPool3d k3 s2 ceil": (nn.AvgPool3d(3, 2, ceil_mode=True), 1, 3),
    "LPPool2d k3 s2": (nn.LPPool2d(2, 3, stride=2), 1, 2),
    "LPPool1d k2 (stride = kernel)": (nn.LPPool1d(2, 2), 1, 1),
    "F.conv2d positional": (
        Functional(lambda x, w: F.conv2d(x, w, None, (2, 1), (1, 2), (1, 2)), (3, 2, 3, 5)),
        2,
        2,
    ),
    "F.conv1d keywords": (
        Functional(lambda x, w: F.conv1d(x, w, stride=2, padding=1, dilation=3), (3, 2, 3)),
        2,
        1,
    ),
    "F.conv3d valid": (Functional(lambda x, w: F.conv3d(x, w, padding="valid"), (2, 1, 2, 3, 1)), 1, 3),
    "F.conv2d same": (Functional(lambda x, w: F.conv2d(x, w, padding="same"), (3, 2, 5, 3)), 2, 2),
    "F.max_pool2d positional ceil": (Functional(lambda x, w: F.max_pool2d(x, 3, 2, 1, 1, True)), 1, 2),
    "F.max_pool1d keywords dilated": (
        Functional(lambda x, w: F.max_pool1d(x, kernel_size=4, stride=3, dilation=2)),
        1,
        1,
    ),
    "F.max_pool2d stride defaults to kernel": (Functional(lambda x, w: F.max_pool2d(x, (2, 3))), 1, 2),
    "F.avg_pool2d positional ceil": (Functional(lambda x, w: F.avg_pool2d(x, 3, 2, 1, True)), 1, 2),
    "F.avg_pool1d keywords": (Functional(lambda x, w: F.avg_pool1d(x, kernel_size=5, stride=2, padding=2)), 1, 1),
}


@pytest.mark.parametrize("model,channels,dims", CASES.values(), ids=CASES.keys())
def test_each_window_gives_the_size_torch_gives_at_every_input_size(model, channels, dims):
    windows = _windows(model, channels, dims)
    assert windows is not None and len(windows) == dims
    got = {(d, n): windows[d](n) for d in range(dims) for n in SIZES}
    want = {(d, n): _torch_size(model, channels, dims, d, n) for d in range(dims) for n in SIZES}
    assert got == want


@pytest.mark.parametrize(
    "model,channels,dims,windows",
    [
        (nn.Conv2d(2, 3, (3, 5), stride=(2, 1), padding=(1, 0), dilation=(1, 3)), 2, 2, [(3, 2, 1, 1), (5, 1, 0, 3)]),
        (nn.MaxPool1d(3, 2, 1, ceil_mode=True), 1, 1, [(3, 2, 1, 1)]),
        (nn.AvgPool2d((2, 3), stride=(2, 2), padding=(1, 1)), 1, 2, [(2, 2, 1, 1), (3, 2, 1, 1)]),
        (Functional(lambda x, w: F.conv1d(x, w, stride=2, padding=1, dilation=3), (3, 2, 3)), 2, 1, [(3, 2, 1, 3)]),
    ],
    ids=["Conv2d", "MaxPool1d ceil", "AvgPool2d", "F.conv1d"],
)
def test_windows_hold_the_ops_hyperparameters(model, channels, dims, windows):
    ceil = [bool(getattr(model, "ceil_mode", False))] * dims
    assert _windows(model, channels, dims) == [Window(*w, c) for w, c in zip(windows, ceil)]


SIZE_KEEPING = {
    "Conv2d same": (nn.Conv2d(2, 3, 3, padding="same"), 2, 2),
    "F.conv1d same": (Functional(lambda x, w: F.conv1d(x, w, padding="same"), (3, 2, 5)), 2, 1),
    "ReLU": (nn.ReLU(), 2, 2),
    "GELU": (nn.GELU(), 2, 1),
    "F.silu": (Functional(lambda x, w: F.silu(x)), 2, 2),
    "Tensor.sigmoid": (Functional(lambda x, w: x.sigmoid()), 2, 3),
    "BatchNorm2d": (nn.BatchNorm2d(2), 2, 2),
    "GroupNorm": (nn.GroupNorm(1, 2), 2, 3),
    "InstanceNorm1d": (nn.InstanceNorm1d(2), 2, 1),
    "F.batch_norm": (Functional(lambda x, w: F.batch_norm(x, None, None, training=True)), 2, 2),
    "Dropout2d": (nn.Dropout2d(0.5), 2, 2),
    "F.dropout": (Functional(lambda x, w: F.dropout(x, 0.5)), 2, 1),
}


@pytest.mark.parametrize("model,channels,dims", SIZE_KEEPING.values(), ids=SIZE_KEEPING.keys())
def test_size_keeping_ops_give_SAME_in_every_dim(model, channels, dims):
    assert _windows(model, channels, dims) == [SAME] * dims


@pytest.mark.parametrize(
    "model,channels,dims",
    [
        (nn.AdaptiveAvgPool2d(3), 2, 2),
        (nn.AdaptiveMaxPool1d(4), 2, 1),
        (Functional(lambda x, w: F.adaptive_avg_pool3d(x, 2)), 2, 3),
        (nn.ConvTranspose2d(2, 3, 3, stride=2), 2, 2),
        (nn.Upsample(scale_factor=2), 2, 2),
        (Functional(lambda x, w: F.interpolate(x, scale_factor=2.0)), 2, 1),
        (Functional(lambda x, w: F.pad(x, (1, 1))), 2, 1),
        (nn.Flatten(), 2, 2),
    ],
    ids=[
        "AdaptiveAvgPool2d",
        "AdaptiveMaxPool1d",
        "F.adaptive_avg_pool3d",
        "ConvTranspose2d",
        "Upsample",
        "F.interpolate",
        "F.pad",
        "Flatten",
    ],
)
def test_adaptive_pools_and_unknown_ops_give_None(model, channels, dims):
    assert _windows(model, channels, dims) is None


def test_a_functional_conv_without_a_recorded_weight_shape_gives_None():
    """Read from a plain fx trace (no TensorInfo on the weight): the kernel is unknown."""
    model = Functional(lambda x, w: F.conv2d(x, w), (3, 2, 3, 3))
    gm = torch.fx.symbolic_trace(model)
    conv = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert size_functions(gm, conv, 2) is None


def test_SAME_is_the_identity_window():
    assert Window(kernel=1, stride=1, padding=0, dilation=1, ceil=False) == SAME
    assert [SAME(n) for n in SIZES] == list(SIZES)
    assert len({SAME, Window(1, 1, 0, 1, False), Window(3, 1, 1, 1, False)}) == 2  # hashable, by value


@pytest.mark.parametrize(
    "window,expected",  # torch's formula, worked by hand
    [
        (Window(3, 2, 1, 1, False), {1: 1, 2: 1, 3: 2, 4: 2, 7: 4, 8: 4}),
        (Window(3, 2, 0, 1, True), {1: None, 3: 1, 4: 2, 5: 2, 6: 3}),
        (Window(2, 2, 1, 1, True), {1: 1, 2: 2, 3: 2, 4: 3}),  # at 1 and 3 the last window would start in the padding
        (Window(3, 1, 0, 2, False), {4: None, 5: 1, 9: 5}),
    ],
)
def test_window_sizes_worked_by_hand(window, expected):
    assert {n: window(n) for n in expected} == expected


def _pool_size(fn, n):
    try:
        return fn(torch.zeros(1, 1, n)).shape[-1]
    except RuntimeError:
        return None


@pytest.mark.parametrize(
    "window,fn",
    [
        (Window(2, 2, 0, 1, True), lambda x: F.max_pool1d(x, 2, ceil_mode=True)),
        (Window(3, 3, 0, 1, True), lambda x: F.avg_pool1d(x, 3, 3, ceil_mode=True)),
        (Window(3, 2, 0, 2, True), lambda x: F.max_pool1d(x, 3, 2, 0, 2, ceil_mode=True)),
        (Window(5, 3, 2, 2, True), lambda x: F.max_pool1d(x, 5, 3, 2, 2, ceil_mode=True)),
    ],
    ids=["max_pool1d k2", "avg_pool1d k3 s3", "max_pool1d k3 s2 d2", "max_pool1d k5 s3 p2 d2"],
)
def test_ceil_mode_windows_on_inputs_shorter_than_the_window(window, fn):
    assert {n: window(n) for n in SIZES} == {n: _pool_size(fn, n) for n in SIZES}


def test_an_activation_written_as_arithmetic_keeps_the_size():
    model = Functional(lambda x, w: x * torch.sigmoid(x))
    traced = trace(model, torch.randn(1, 2, SAFE, SAFE))
    mul = next(n for n in traced.graph.nodes if n.op == "call_function" and n.name.startswith("mul"))
    assert size_functions(traced.root, mul, 2) == [SAME, SAME]


def test_a_padded_AvgPool3d_on_inputs_smaller_than_its_kernel():
    pool = nn.AvgPool3d(3, 2, 1)
    assert _windows(pool, 1, 3) == [Window(3, 2, 1, 1, False, min_size=3)] * 3
    windows = _windows(pool, 1, 3)
    got = {(d, n): windows[d](n) for d in range(3) for n in range(1, 6)}
    assert got == {(d, n): _torch_size(pool, 1, 3, d, n) for d in range(3) for n in range(1, 6)}
