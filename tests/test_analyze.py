"""The analyze stage (resify/analysis/analyze.py): the layers, the shortcuts a model already has, and which
spans are single-entry single-exit regions."""

import warnings

import pytest
import torch
import torch.nn as nn

import resify
from resify.analysis.analyze import NAMESPACE, ExistingShortcut, Layer, analyze
from resify.tracing.shapes import TensorInfo
from resify.tracing.trace import trace


class ResBlock(nn.Module):
    """torchvision's BasicBlock, written out: identity, 1×1-conv projection or average-pool bypass."""

    def __init__(self, cin, cout, stride=1, pool=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if pool:
            self.down = nn.AvgPool2d(stride)
        elif stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.down is None else self.down(x)
        return torch.relu(out + shortcut)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.b1, self.b2, self.b3 = ResBlock(4, 4), ResBlock(4, 8, 2), ResBlock(8, 8, 2, pool=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.b3(self.b2(self.b1(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    return analyze(trace(Net(), torch.randn(2, 3, 8, 8)))


def _span(analysis, first, last):
    layers = {layer.name: layer for layer in analysis.layers}
    entry = analysis.node(layers[first].anchor).args[0]  # the span's input: its first layer's input
    return analysis.span_problem(entry, analysis.node(layers[last].output))


def test_a_layer_is_its_parametric_op_and_the_ops_that_follow_it():
    model = nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)
    )
    analysis = analyze(trace(model, torch.randn(3, 8)))
    f32 = torch.float32
    assert analysis.layers == [
        Layer("0", "Linear", "_0", "_3", ("norm", "activation", "dropout"), ("_0", "_1", "_2", "_3"),
              TensorInfo((3, 8), f32), TensorInfo((3, 16), f32)),
        Layer("4", "Linear", "_4", "_5", ("activation",), ("_4", "_5"), TensorInfo((3, 16), f32), TensorInfo((3, 16), f32)),
        Layer("6", "Linear", "_6", "_6", (), ("_6",), TensorInfo((3, 16), f32), TensorInfo((3, 4), f32)),
    ]  # fmt: skip
    assert analysis.existing == [] and analysis.inside_existing == {}
    assert [analysis.has_batchnorm(layer) for layer in analysis.layers] == [True, False, False]


def test_the_layers_of_residual_blocks(net):
    assert [(layer.name, layer.kind, layer.output, layer.roles) for layer in net.layers] == [
        ("stem", "Conv2d", "relu", ("activation",)),
        ("b1.conv1", "Conv2d", "relu_1", ("norm", "activation")),
        ("b1.conv2", "Conv2d", "b1_bn2", ("norm",)),
        ("b2.conv1", "Conv2d", "relu_3", ("norm", "activation")),
        ("b2.conv2", "Conv2d", "b2_bn2", ("norm",)),
        ("b2.down.0", "Conv2d", "b2_down_1", ("norm",)),
        ("b3.conv1", "Conv2d", "relu_5", ("norm", "activation")),
        ("b3.conv2", "Conv2d", "b3_bn2", ("norm",)),
        ("fc", "Linear", "fc", ()),
    ]


def test_existing_shortcuts_of_residual_blocks_with_each_kind_of_bypass(net):
    assert net.existing == [
        ExistingShortcut("add", "add", "b1.conv1", "b1.bn2", "identity", ("b1.conv1", "b1.conv2")),
        ExistingShortcut("add", "add_1", "b2.conv1", "b2.bn2", "projection", ("b2.conv1", "b2.conv2", "b2.down.0")),
        ExistingShortcut("add", "add_2", "b3.conv1", "b3.bn2", "parameter-free", ("b3.conv1", "b3.conv2")),
    ]
    assert net.inside_existing == {
        "b1.conv1": "add",
        "b1.conv2": "add",
        "b2.conv1": "add_1",
        "b2.conv2": "add_1",
        "b2.down.0": "add_1",
        "b3.conv1": "add_2",
        "b3.conv2": "add_2",
    }
    assert net.existing[1].to_dict()["layers"] == ["b2.conv1", "b2.conv2", "b2.down.0"]


@pytest.mark.parametrize(
    "first, last, problem",
    [
        ("stem", "stem", None),
        ("b1.conv2", "b1.conv2", None),
        ("fc", "fc", None),
        ("b1.conv1", "b1.conv1", "'relu' is also used by 'add' outside the span: not single-entry single-exit"),
        ("stem", "b1.conv1", "'relu' is also used by 'add' outside the span: not single-entry single-exit"),
        ("stem", "fc", "the span would enclose the existing shortcut at 'add'"),
    ],
)
def test_which_spans_are_single_entry_single_exit(net, first, last, problem):
    assert _span(net, first, last) == problem


def test_the_value_that_joins_a_span_is_named(net):
    assert _span(net, "b1.conv2", "fc") == (
        "another value ('relu' into 'add') joins the span between its input and output: not single-entry single-exit"
    )


class TakesTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, y):
        return self.b(torch.relu(self.a(x)) + y)


def test_a_second_input_joining_a_span_conditions_it_and_a_join_of_inputs_is_no_shortcut():
    analysis = analyze(trace(TakesTwo(), (torch.randn(2, 8), torch.randn(2, 8))))
    assert analysis.existing == []
    # judged on x's flow, y joining between a and b conditions the span: it has one entry, x
    assert _span(analysis, "a", "b") is None
    assert next(layer.roles for layer in analysis.layers if layer.name == "a") == ("activation", "condition")
    # a span that starts on y, the other input, is entered by x's path too: named
    assert analysis.span_problem(analysis.node("y"), analysis.node("b")) == (
        "another value ('relu' into 'add') joins the span between its input and output: not single-entry single-exit"
    )
    assert _span(analysis, "a", "a") is None and _span(analysis, "b", "b") is None
    assert analysis.span_problem(3.0, analysis.node("b")) == (
        "the span's input is a constant, not a value computed from the model's input"
    )


def test_reading_a_shape_is_not_data_flow():
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.pos = nn.Linear(6, 6), nn.Embedding(10, 6)

        def forward(self, x):
            return torch.relu(self.fc(x)) + self.pos(torch.arange(x.size(1)))

    assert analyze(trace(Positions(), torch.randn(2, 5, 6))).existing == []


def test_a_concatenation_that_keeps_the_input_is_an_existing_dense_shortcut():
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(torch.cat([x, torch.relu(self.bn(self.conv(x)))], 1))

    analysis = analyze(trace(Dense(), torch.randn(2, 4, 5, 5)))
    assert analysis.existing == [ExistingShortcut("concat", "cat", "conv", "bn", "identity", ("conv",))]


def test_which_layer_a_dense_shortcut_would_widen():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    analysis = analyze(trace(model, torch.randn(3, 4)))
    out = {layer.name: analysis.node(layer.output) for layer in analysis.layers}
    assert analysis.dense_consumer(out["0"], -1) == ("2", 8)  # '2' gains 8 weights per added feature
    assert (
        analysis.dense_consumer(out["4"], -1) == "the span's output is the model's output: there is no layer to widen"
    )
    assert analysis.dense_consumer(out["0"], 1) == "the consumer '2' is a Linear but the span has channels first"


def test_resifys_own_modules_are_shortcuts_not_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    converted = resify.apply(model, torch.randn(3, 4), gate="rezero")
    analysis = analyze(trace(converted, torch.randn(3, 4)))
    assert [layer.name for layer in analysis.layers] == ["0", "2", "4"]
    assert [(e.node, e.start, e.bypass) for e in analysis.existing] == [
        ("add", "0", "projection"),
        ("add_1", "2", "identity"),
    ]
    names = analysis.taken_names()
    assert names == ["0", "2"] and all(hasattr(converted.get_submodule(NAMESPACE), n) for n in names)


def test_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    analysis = analyze(trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)))
    blocks = [f"layer{stage}.{block}" for stage in (1, 2, 3, 4) for block in (0, 1)]
    downsampled = {"layer2.0", "layer3.0", "layer4.0"}
    expected_layers = ["conv1"]
    for b in blocks:
        expected_layers += [f"{b}.conv1", f"{b}.conv2"] + ([f"{b}.downsample.0"] if b in downsampled else [])
    assert [layer.name for layer in analysis.layers] == expected_layers + ["fc"]
    assert analysis.layers[0].roles == ("norm", "activation", "pool")
    assert analysis.existing == [
        ExistingShortcut(
            "add",
            "add" if i == 0 else f"add_{i}",
            f"{b}.conv1",
            f"{b}.bn2",
            "projection" if b in downsampled else "identity",
            (f"{b}.conv1", f"{b}.conv2") + ((f"{b}.downsample.0",) if b in downsampled else ()),
        )
        for i, b in enumerate(blocks)
    ]


class Normalised(nn.Module):
    """A residual network that normalises its input before the stem."""

    def __init__(self):
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 4, 3, stride=2, padding=1), ResBlock(4, 4)

    def forward(self, x):
        return self.block(torch.relu(self.stem((x - 0.5) / 0.25)))


@pytest.mark.parametrize(
    "make, channels, stem",
    [
        (Net, 3, "x"),  # its blocks have their shortcuts: the stem is left alone
        (Normalised, 3, "x"),
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)), 3, None),
        (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), ResBlock(4, 4)), 4, None),  # keeps the width
    ],
)
def test_the_stem_of_a_residual_network_is_its_convolution_from_the_input_to_its_width(make, channels, stem):
    analysis = analyze(trace(make(), torch.randn(2, channels, 8, 8)))
    assert analysis.stem_input(analysis.layers[0]) == stem
    assert all(analysis.stem_input(layer) is None for layer in analysis.layers[1:])


def test_the_stem_of_resnet18_gets_no_site_and_the_plan_says_why():
    torchvision = pytest.importorskip("torchvision")
    plan = resify.plan(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    assert "conv1" not in [s.start for s in plan.sites]
    (stem,) = [s for s in plan.skipped if s.start == "conv1"]
    assert stem.code == "stem" and "maps the model's input 'x' from 3 to 64 channels" in stem.reason


def test_the_first_linear_of_a_residual_mlp_is_no_stem():
    """The seed's ExampleDeepNeuralNetwork with its own shortcuts: the first layer changes the width
    (10 -> 20) and still gets its projection, as in ImprovedResidualNetwork."""
    from reference import ExampleDeepNeuralNetwork

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", resify.ResifyWarning)  # it branches on shapes: the concrete tracer
        plan = resify.plan(ExampleDeepNeuralNetwork([10, 20, 20, 5, 5, 3], True), torch.randn(4, 10))
    assert [e.start for e in plan.existing] == ["layers.1.0", "layers.3.0"]
    assert [(s.start, s.kind) for s in plan.sites] == [
        ("layers.0.0", "projection"),
        ("layers.2.0", "projection"),
        ("layers.4.0", "projection"),
    ]
