"""Shape recording (resify/tracing/shapes.py): rules and meta tensors give the shapes a real run gives,
a real run only where values are needed, and a rejected input is named with its layer and shape."""

import operator

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from resify.errors import TraceError
from resify.tracing.shapes import ShapeRecorder, TensorInfo, node_keys, record_shapes, tensor_info


class Attention(nn.Module):
    """Self-attention over (q, kv) with the call's keywords fixed: MultiheadAttention has its own rule."""

    def __init__(self, mha, **call):
        super().__init__()
        self.mha, self.call = mha, call

    def forward(self, q, kv):
        result = self.mha(q, kv, kv, **self.call)
        return result[0], result[1]  # two getitem nodes, each with its shape (None: no weights)


def _graph(fn):
    """A GraphModule of ``fn`` (a torch.nn layer is wrapped so that it stays one call_module node)."""
    return torch.fx.symbolic_trace(nn.Sequential(fn) if type(fn).__module__.startswith("torch.nn") else fn)


def _recorded(gm):
    return {n.name: n.meta["resify"] for n in gm.graph.nodes if n.meta.get("resify") is not None}


def _real(fn, inputs):
    with torch.no_grad():
        out = fn(*inputs)
    return out if isinstance(out, tuple) else (out,)


def _mha(batch_first=False, kdim=None):
    return nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)


CASES = {
    "conv2d strided": (nn.Conv2d(3, 5, 3, stride=2, padding=1), (torch.randn(2, 3, 9, 9),)),
    "conv2d valid, dilated": (
        nn.Conv2d(3, 5, (3, 1), stride=(2, 1), dilation=(2, 1), padding="valid"),
        (torch.randn(2, 3, 11, 6),),
    ),
    "conv1d same, unbatched": (nn.Conv1d(4, 6, 5, padding="same", padding_mode="reflect"), (torch.randn(4, 16),)),
    "conv3d": (nn.Conv3d(2, 3, 2, stride=2), (torch.randn(1, 2, 5, 6, 7),)),
    "conv transposed (meta)": (nn.ConvTranspose2d(3, 4, 3, stride=2), (torch.randn(2, 3, 5, 5),)),
    "batchnorm1d on 3-D": (nn.BatchNorm1d(6), (torch.randn(4, 6, 3),)),
    "layernorm": (nn.LayerNorm([4, 5]), (torch.randn(3, 4, 5),)),
    "groupnorm": (nn.GroupNorm(2, 4), (torch.randn(2, 4, 3, 3),)),
    "linear on a vector": (nn.Linear(5, 2), (torch.randn(5),)),
    "max pool (meta)": (nn.MaxPool2d(3, stride=2, ceil_mode=True), (torch.randn(2, 3, 8, 8),)),
    "adaptive avg pool": (nn.AdaptiveAvgPool2d(1), (torch.randn(2, 3, 5, 5),)),
    "adaptive max pool, a None": (nn.AdaptiveMaxPool3d((2, None, 1)), (torch.randn(2, 3, 5, 6, 4),)),
    "embedding (meta)": (nn.Embedding(10, 6), (torch.tensor([[1, 2, 3, 4]]),)),
    "float16 linear": (nn.Linear(4, 3).half(), (torch.randn(2, 4).half(),)),
    "attention": (Attention(_mha()), (torch.randn(7, 3, 8), torch.randn(5, 3, 8))),
    "attention batch first": (Attention(_mha(batch_first=True)), (torch.randn(3, 7, 8), torch.randn(3, 5, 8))),
    "attention batch first, per head": (
        Attention(_mha(batch_first=True), average_attn_weights=False),
        (torch.randn(3, 7, 8), torch.randn(3, 5, 8)),
    ),
    "attention unbatched, no weights": (
        Attention(_mha(), need_weights=False),
        (torch.randn(7, 8), torch.randn(5, 8)),
    ),
    "attention other kdim": (Attention(_mha(kdim=6)), (torch.randn(7, 3, 8), torch.randn(4, 3, 6))),
    "cat on dim 1": (lambda a, b: torch.cat([a, b], 1), (torch.randn(2, 3, 4), torch.randn(2, 5, 4))),
    "cat on dim 0 by default": (lambda a, b: torch.cat([a, b]), (torch.randn(2, 3), torch.randn(1, 3))),
    "cat with dim=-1": (lambda a, b: torch.cat([a, b], dim=-1), (torch.randn(2, 3, 4), torch.randn(2, 3, 1))),
    "adaptive pool function": (lambda x: F.adaptive_avg_pool2d(x, (1, None)), (torch.randn(2, 3, 7, 9),)),
    "adaptive pool 1-D, unbatched": (lambda x: F.adaptive_avg_pool1d(x, 2), (torch.randn(3, 8),)),
    "broadcast add": (lambda a, b: operator.add(a, b), (torch.randn(2, 1, 4), torch.randn(3, 1))),
    "flatten, then a method": (lambda x: torch.flatten(x, 1).relu().contiguous(), (torch.randn(2, 3, 4),)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shapes_found_without_running_equal_those_of_a_real_run(case):
    fn, inputs = CASES[case]
    gm = _graph(fn)
    assert record_shapes(gm, gm.graph, inputs) == "meta"
    without_running = _recorded(gm)
    assert len(without_running) >= len(inputs) + 1
    with torch.no_grad():
        ShapeRecorder(gm, graph=gm.graph).run(*inputs)  # a real run writes them again
    assert _recorded(gm) == without_running
    returned = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    returned = returned if isinstance(returned, tuple) else (returned,)
    assert [n.meta["resify"] for n in returned] == [tensor_info(v) for v in _real(fn, inputs)]


class ScaleByMax(nn.Module):
    def forward(self, x):
        return x / x.abs().max().item()  # a real value: no meta tensor has one


def test_a_model_that_needs_real_values_runs_once_and_keeps_its_statistics_and_rng():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), ScaleByMax()).train()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(5, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    assert record_shapes(gm, gm.graph, (x,)) == "run"
    assert torch.equal(torch.rand(3), expected_next)  # the run's dropout drew from a forked RNG
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm's running statistics were put back
    assert {name: info.shape for name, info in _recorded(gm).items()} == {
        "input_1": (5, 4),
        **{name: (5, 4) for name in ("_0", "_1", "_2", "abs_1", "truediv")},
        "max_1": (),
        "output": (5, 4),
    }


REFUSALS = [
    (nn.Conv2d(3, 5, 3), (torch.randn(2, 4, 9, 9),), r"^layer '0' \(Conv2d\) rejected input of shape \[2, 4, 9, 9\]: "),
    (nn.Conv2d(3, 5, 5), (torch.randn(2, 3, 3, 3),), r"^layer '0' \(Conv2d\) rejected input of shape \[2, 3, 3, 3\]"),
    (nn.Linear(5, 2), (torch.randn(3, 4),), r"^layer '0' \(Linear\) rejected input of shape \[3, 4\]: mat1 and mat2"),
    (nn.BatchNorm2d(6), (torch.randn(4, 6, 3),), r"^layer '0' \(BatchNorm2d\) rejected .* expected 4D input"),
    (nn.BatchNorm1d(6).train(), (torch.randn(1, 6),), r"\[1, 6\]: Expected more than 1 value per channel"),
    (nn.LayerNorm(5), (torch.randn(3, 4),), r"^layer '0' \(LayerNorm\) rejected input of shape \[3, 4\]"),
    (
        lambda a, b: torch.cat([a, b], 1),
        (torch.randn(2, 3, 4), torch.randn(2, 5, 5)),
        r"^operation torch.cat in <lambda>.forward rejected input of shape \[2, 3, 4\], \[2, 5, 5\]: Sizes of",
    ),
    (
        nn.Embedding(10, 4),
        (torch.randn(2, 5),),
        r"^layer '0' \(Embedding\) rejected input of dtype float32: .*token ids: torch.long; CLI: --dtype int64\)$",
    ),
]


@pytest.mark.parametrize("fn, inputs, match", REFUSALS)
def test_an_input_the_real_op_rejects_is_refused_with_the_layer_and_its_shapes(fn, inputs, match):
    gm = _graph(fn)
    with pytest.raises(TraceError, match=match) as e:
        record_shapes(gm, gm.graph, inputs)
    assert "pass an example_input" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises((RuntimeError, ValueError)):  # the real op refuses it too: no rule was too strict
        fn(*inputs)


class _Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return F.max_pool2d(torch.relu(self.conv(x)), 4)


class _Stages(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(_Pooled(), _Pooled())

    def forward(self, x):
        return self.features(x).flatten(1) @ torch.ones(3, 2)


@pytest.mark.parametrize(
    "x, match",
    [
        # too small for the second block's pooling: the op in words, in the forward of the module that calls it
        (torch.randn(1, 3, 8, 8), r"^operation F.max_pool2d in _Pooled.forward of 'features.1' rejected input of "),
        # the root's own op
        (torch.randn(1, 3, 32, 32), r"^operation operator @ in _Stages.forward rejected input of shape \[1, 12\]"),
    ],
)
def test_an_operation_that_rejects_the_input_is_named_in_words_with_its_module(x, match):
    model = _Stages()
    gm = torch.fx.symbolic_trace(model)
    with pytest.raises(TraceError, match=match) as e:
        record_shapes(model, gm.graph, (x,))
    assert "%" not in str(e.value) and "call_function" not in str(e.value) and "num_users" not in str(e.value)


def test_the_forwards_defaults_fill_the_inputs_not_given():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, bias=None, scale=2.0):
            return self.fc(x) * scale

    gm = torch.fx.symbolic_trace(Scaled(), concrete_args={"bias": None})
    assert record_shapes(gm, gm.graph, (torch.randn(6, 4),)) == "meta"
    assert _recorded(gm)["mul"] == TensorInfo((6, 3), torch.float32)


def _known(first: torch.fx.GraphModule, second: torch.fx.GraphModule) -> dict:
    """second's nodes that compute what a node of first computed, with first's recorded shapes."""
    interned: dict = {}
    first_keys, second_keys = node_keys(first.graph, interned), node_keys(second.graph, interned)
    shapes = {k: n.meta["resify"] for n, k in first_keys.items() if n.meta.get("resify") is not None}
    return {n: shapes[k] for n, k in second_keys.items() if k in shapes}


def test_known_shapes_are_taken_from_another_graph_with_the_same_node_keys():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    first, second = torch.fx.symbolic_trace(model), torch.fx.symbolic_trace(model)
    interned: dict = {}
    assert list(node_keys(first.graph, interned).values()) == list(node_keys(second.graph, interned).values())
    planted = TensorInfo((9, 9), torch.float64)  # a shape no run gives: it can only come from `known`
    known = {n: planted for n in second.graph.nodes if n.name == "_0"}
    assert record_shapes(second, second.graph, (torch.randn(2, 4),), known) == "meta"
    assert _recorded(second)["_0"] == planted


def test_node_keys_tell_a_changed_constant():
    a = torch.fx.symbolic_trace(lambda x: torch.relu(x + 1) * 2)
    b = torch.fx.symbolic_trace(lambda x: torch.relu(x + 2) * 2)
    interned: dict = {}
    same = [ka == kb for ka, kb in zip(node_keys(a.graph, interned).values(), node_keys(b.graph, interned).values())]
    assert same == [True, False, False, False, False]  # x; then add(x, 1) against add(x, 2) and all after it


def test_a_node_after_a_differing_one_takes_no_shape_from_the_other_graph():
    """Once a bug: keys numbered per graph made relu(flatten(x, 1)) and relu(flatten(x, 2)) equal."""
    a = torch.fx.symbolic_trace(lambda x: torch.relu(torch.flatten(x, 1)))
    b = torch.fx.symbolic_trace(lambda x: torch.relu(torch.flatten(x, 2)))
    x = torch.randn(2, 3, 4, 5)
    record_shapes(a, a.graph, (x,))
    known = _known(a, b)
    assert [n.name for n in known] == ["x"]  # the input only: flatten and everything after it differ
    record_shapes(b, b.graph, (x,), known)
    assert _recorded(b)["relu"].shape == tuple(b(x).shape) == (2, 3, 20)


def test_tensor_info():
    assert tensor_info(torch.zeros(2, 3, dtype=torch.int64)) == TensorInfo((2, 3), torch.int64)
    assert tensor_info((torch.zeros(1),)) is None and tensor_info(3) is None
    assert not TensorInfo((1,), torch.int64).is_float and TensorInfo((1,), torch.bfloat16).is_float
