"""resify.tracing.shape_rules: an op's output shape and dtype from its meta input, checked against the real op."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resify.tracing.shape_rules import function_rule, method_rule, module_rule


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def real(t):
    """A real tensor of a meta tensor's shape and dtype (the reference runs the op on it)."""
    return torch.randn(t.shape, dtype=t.dtype)


def _same(found, expected):
    assert found is not None and found.is_meta
    assert (tuple(found.shape), found.dtype) == (tuple(expected.shape), expected.dtype)


MODULE_CASES = {
    "linear": (nn.Linear(5, 3), (2, 7, 5)),
    "linear-1d": (nn.Linear(5, 3), (5,)),
    "conv2d": (nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 17, 11)),
    "conv2d-unbatched": (nn.Conv2d(3, 8, 3), (3, 9, 9)),
    "conv1d-dilated": (nn.Conv1d(4, 6, 3, dilation=2, padding=1), (2, 4, 20)),
    "conv2d-same": (nn.Conv2d(3, 4, 5, padding="same"), (1, 3, 10, 12)),
    "conv3d-valid": (nn.Conv3d(2, 2, (1, 2, 3), padding="valid", stride=(1, 2, 1)), (1, 2, 4, 6, 8)),
    "adaptive-avg2d": (nn.AdaptiveAvgPool2d((3, None)), (2, 4, 9, 7)),
    "adaptive-max1d": (nn.AdaptiveMaxPool1d(1), (2, 4, 9)),
    "relu": (nn.ReLU(), (2, 3)),
    "dropout": (nn.Dropout(0.5), (2, 3, 4)),
    "softmax": (nn.Softmax(dim=1), (2, 3)),
    "batchnorm": (nn.BatchNorm2d(3), (2, 3, 4, 4)),
    "layernorm": (nn.LayerNorm((4, 5)), (2, 3, 4, 5)),
    "groupnorm": (nn.GroupNorm(2, 4), (2, 4, 3)),
    "identity": (nn.Identity(), (2, 3)),
}


@pytest.mark.parametrize("module,shape", MODULE_CASES.values(), ids=MODULE_CASES.keys())
def test_module_rule_gives_the_real_ops_shape(module, shape):
    x = meta(*shape)
    with torch.no_grad():
        expected = module(real(x))
    _same(module_rule(module, (x,), {}), expected)


REFUSED = {
    "linear-wrong-features": (nn.Linear(5, 3), meta(2, 4)),
    "conv-wrong-channels": (nn.Conv2d(3, 8, 3), meta(2, 4, 9, 9)),
    "conv-too-small": (nn.Conv2d(3, 8, 5), meta(2, 3, 4, 4)),
    "conv-wrong-rank": (nn.Conv2d(3, 8, 3), meta(3, 9)),
    "transposed-conv": (nn.ConvTranspose2d(3, 8, 3), meta(2, 3, 9, 9)),
    "batchnorm-wrong-features": (nn.BatchNorm2d(3), meta(2, 4, 4, 4)),
    "batchnorm-one-value-in-training": (nn.BatchNorm1d(3), meta(1, 3)),
    "batchnorm-wrong-rank": (nn.BatchNorm2d(3), meta(2, 3)),
    "layernorm-wrong-shape": (nn.LayerNorm(4), meta(2, 5)),
    "groupnorm-wrong-channels": (nn.GroupNorm(2, 4), meta(2, 6, 3)),
    "integer-input": (nn.ReLU(), meta(2, 3, dtype=torch.int64)),
    "dtype-differs": (nn.Linear(5, 3), meta(2, 5, dtype=torch.float64)),
    "adaptive-pool-of-an-empty-side": (nn.AdaptiveAvgPool2d(2), meta(2, 3, 0, 4)),
    "adaptive-pool-with-indices": (nn.AdaptiveMaxPool2d(2, return_indices=True), meta(2, 3, 4, 4)),
    "an-unknown-module": (nn.Upsample(scale_factor=2), meta(1, 1, 4)),
}


@pytest.mark.parametrize("module,x", REFUSED.values(), ids=REFUSED.keys())
def test_module_rule_leaves_to_the_real_op_what_it_cannot_vouch_for(module, x):
    assert module_rule(module, (x,), {}) is None


def test_module_rule_refuses_keywords_several_arguments_and_real_tensors():
    lin = nn.Linear(5, 3)
    assert module_rule(lin, (meta(2, 5),), {"extra": 1}) is None
    assert module_rule(lin, (meta(2, 5), meta(2, 5)), {}) is None
    assert module_rule(lin, (torch.zeros(2, 5),), {}) is None  # values present: the real op runs


def test_a_batchnorm_in_eval_mode_takes_one_value_per_channel():
    bn = nn.BatchNorm1d(3).eval()
    _same(module_rule(bn, (meta(1, 3),), {}), bn(torch.randn(1, 3)))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"need_weights": False}, {"average_attn_weights": False}])
def test_attention_rule_gives_both_outputs_shapes(batch_first, kwargs):
    m = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=6, vdim=4)
    q, k, v = meta(5, 3, 8), meta(7, 3, 6), meta(7, 3, 4)
    if batch_first:
        q, k, v = meta(3, 5, 8), meta(3, 7, 6), meta(3, 7, 4)
    found = module_rule(m, (q, k, v), kwargs)
    with torch.no_grad():
        out, weights = m(real(q), real(k), real(v), **kwargs)
    _same(found[0], out)
    if weights is None:
        assert found[1] is None
    else:
        _same(found[1], weights)


def test_attention_rule_leaves_masks_and_mismatches_to_the_real_op():
    m = nn.MultiheadAttention(8, 2)
    q = meta(5, 3, 8)
    assert module_rule(m, (q, q, q), {"attn_mask": meta(5, 5)}) is None
    assert module_rule(m, (q, meta(5, 4, 8), meta(5, 4, 8)), {}) is None  # batch sizes differ
    assert module_rule(m, (meta(5, 3, 6), meta(5, 3, 6), meta(5, 3, 6)), {}) is None  # not embed_dim


@pytest.mark.parametrize(
    "fn,args,kwargs",
    [
        (torch.cat, ([meta(2, 3), meta(2, 5)], 1), {}),
        (torch.cat, ([meta(2, 3), meta(4, 3)],), {}),
        (torch.cat, ([meta(2, 3, 4), meta(2, 1, 4)],), {"dim": -2}),
        (F.adaptive_avg_pool2d, (meta(2, 3, 8, 8), (2, 4)), {}),
        (F.relu, (meta(2, 3),), {}),
        (F.gelu, (meta(2, 3),), {"approximate": "tanh"}),
        (operator.add, (meta(2, 3), meta(3)), {}),  # broadcast
        (torch.mul, (meta(4, 1, 3), meta(2, 1)), {}),
        (operator.truediv, (meta(2, 3), 2.0), {}),
        (operator.sub, (1, meta(2, 3)), {}),
    ],
)
def test_function_rule_gives_the_real_ops_shape(fn, args, kwargs):
    def to_real(a):
        if isinstance(a, list):
            return [to_real(t) for t in a]
        return real(a) if isinstance(a, torch.Tensor) else a

    expected = fn(*[to_real(a) for a in args], **kwargs)
    _same(function_rule(fn, args, kwargs), expected)


@pytest.mark.parametrize(
    "fn,args,kwargs",
    [
        (torch.cat, ([meta(2, 3), meta(3, 5)], 1), {}),  # other sizes off the joined dim
        (torch.cat, ([meta(2, 3), meta(2, 3, dtype=torch.float64)],), {}),
        (torch.cat, ([meta(2, 3)], 2), {}),  # dim out of range
        (torch.cat, ([],), {}),
        (torch.cat, ([meta(2, 3)],), {"out": None}),
        (operator.add, (meta(2, 3), meta(4)), {}),  # does not broadcast
        (operator.add, (meta(2, 3), meta(2, 3, dtype=torch.float16)), {}),
        (operator.add, (meta(2, 3), True), {}),  # a bool is not a number here
        (F.relu, (meta(2, 3), meta(2, 3)), {}),  # another tensor among the arguments
        (F.adaptive_avg_pool2d, (meta(2, 3, 8, 8), (2, 2, 2)), {}),
        (torch.exp, (meta(2, 3),), {}),  # no rule
    ],
)
def test_function_rule_refuses(fn, args, kwargs):
    assert function_rule(fn, args, kwargs) is None


def test_method_rule():
    x = meta(2, 3)
    _same(method_rule("relu", (x,), {}), torch.randn(2, 3).relu())
    _same(method_rule("contiguous", (x,), {}), x)
    assert method_rule("view", (x, -1), {}) is None
    assert method_rule("relu", (x,), {"inplace": True}) is None
    assert method_rule("relu", (meta(2, dtype=torch.int32),), {}) is None


def test_attention_rule_refuses_is_causal_without_a_mask():
    m = nn.MultiheadAttention(8, 2)
    x = torch.randn(5, 3, 8)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        m(x, x, x, is_causal=True)  # the real op refuses it
    q = meta(5, 3, 8)
    assert module_rule(m, (q, q, q), {"is_causal": True}) is None


def test_conv_rule_refuses_a_reflect_padding_past_the_input():
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(RuntimeError, match="Padding size should be less than"):
        conv(torch.randn(1, 2, 1, 1))
    assert module_rule(conv, (meta(1, 2, 1, 1),), {}) is None


def test_a_batchnorm_without_running_statistics_needs_two_values_in_eval_mode():
    bn = nn.BatchNorm1d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(torch.randn(1, 3))  # the real op refuses it
    assert module_rule(bn, (meta(1, 3),), {}) is None


@pytest.mark.parametrize("kwargs", [{"add_bias_kv": True}, {"add_zero_attn": True}])
def test_attention_weights_count_the_added_key_positions(kwargs):
    m = nn.MultiheadAttention(8, 2, **kwargs)
    q = meta(5, 3, 8)
    with torch.no_grad():
        _, weights = m(real(q), real(q), real(q))
    assert tuple(weights.shape) == (3, 5, 6)  # one key position more than the 5 given
    _same(module_rule(m, (q, q, q), {})[1], weights)
