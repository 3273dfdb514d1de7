"""Step 1 of shape recording: rules that give an op's output shape and dtype from its input's.

``Linear`` → ``(*x.shape[:-1], out_features)``, an activation or norm keeps the shape, a
concatenation adds the sizes, … Each rule checks what the real op would check and returns None
otherwise, which leaves the op to the next step in ``shapes`` (meta tensors, then a real run).
The rules see meta tensors: no values, no arithmetic.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import (
    ACTIVATION_METHODS,
    CAT_FUNCTIONS,
    DROPOUT_FUNCTIONS,
    DROPOUT_MODULES,
    SHAPE_KEEPING_ACTIVATION_FUNCTIONS,
    SHAPE_KEEPING_ACTIVATION_MODULES,
)

__all__ = ["module_rule", "function_rule", "method_rule"]


# the shape-keeping ops come from ops' tables (one list of torch's activations); softmax keeps the
# shape too but is not an activation a layer ends with
_SAME_SHAPE_MODULES: tuple[type, ...] = (
    *SHAPE_KEEPING_ACTIVATION_MODULES,
    *DROPOUT_MODULES,
    nn.Softmax,
    nn.LogSoftmax,
)
_SAME_SHAPE_FUNCTIONS = SHAPE_KEEPING_ACTIVATION_FUNCTIONS | DROPOUT_FUNCTIONS
_SAME_SHAPE_METHODS = ACTIVATION_METHODS | {"contiguous"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}


def _meta_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_meta and x.dtype.is_floating_point


def _like(x: torch.Tensor, shape: Any = None) -> torch.Tensor:
    return torch.empty(x.shape if shape is None else shape, dtype=x.dtype, device="meta")


def _weight_dtype_matches(m: nn.Module, x: torch.Tensor) -> bool:
    return all(p.dtype == x.dtype for p in m._parameters.values() if p is not None)


def _attention_rule(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Any:
    names = (
        "query",
        "key",
        "value",
        "key_padding_mask",
        "need_weights",
        "attn_mask",
        "average_attn_weights",
        "is_causal",
    )
    bound = {**dict(zip(names, args)), **kwargs}
    q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
    if set(bound) - set(names) or bound.get("key_padding_mask") is not None or bound.get("attn_mask") is not None:
        return None  # masks are checked against the shapes by the real op: let it
    if bound.get("is_causal"):
        return None  # the real op needs a mask with it: let it say so
    if not (_meta_float(q) and _meta_float(k) and _meta_float(v)):
        return None
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    if not _weight_dtype_matches(m, q):
        return None
    batched = q.dim() == 3
    if q.dim() not in (2, 3) or k.dim() != q.dim() or v.dim() != q.dim() or q.shape[-1] != m.embed_dim:
        return None
    if k.shape[-1] != m.kdim or v.shape[-1] != m.vdim or k.shape[:-1] != v.shape[:-1]:
        return None
    seq = 1 if batched and m.batch_first else 0
    if batched and q.shape[1 - seq] != k.shape[1 - seq]:
        return None  # batch sizes differ
    if not bound.get("need_weights", True):
        return _like(q), None
    lead = (q.shape[1 - seq],) if batched else ()
    heads = () if bound.get("average_attn_weights", True) else (m.num_heads,)
    keys = k.shape[seq] + (m.bias_k is not None) + bool(m.add_zero_attn)  # each adds a key position
    return _like(q), _like(q, (*lead, *heads, q.shape[seq], keys))


def module_rule(m: nn.Module, args: tuple, kwargs: dict) -> Any:
    if isinstance(m, nn.MultiheadAttention):
        return _attention_rule(m, args, kwargs)
    if kwargs or len(args) != 1 or not _meta_float(args[0]) or not _weight_dtype_matches(m, args[0]):
        return None
    x = args[0]
    t = type(m)
    if t is nn.Identity:
        return x
    if isinstance(m, nn.Linear):
        if x.dim() >= 1 and x.shape[-1] == m.in_features:
            return _like(x, (*x.shape[:-1], m.out_features))
        return None
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
        return _conv_rule(m, x)
    if type(m) in _ADAPTIVE_POOLS and not getattr(m, "return_indices", False):
        return _adaptive_pool_rule(x, m.output_size, _ADAPTIVE_POOLS[type(m)])
    if isinstance(m, _SAME_SHAPE_MODULES):
        return _like(x)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        try:
            m._check_input_dim(x)
        except ValueError:
            return None
        one_value = x.numel() // max(x.shape[1], 1) <= 1
        batch_stats = m.training or m.running_mean is None  # without running statistics, in eval too
        if x.shape[1] != m.num_features or (batch_stats and one_value):
            return None  # the real op raises: let it
        return _like(x)
    if isinstance(m, nn.LayerNorm):
        ns = tuple(m.normalized_shape)
        return _like(x) if tuple(x.shape[x.dim() - len(ns) :]) == ns and x.dim() >= len(ns) else None
    if isinstance(m, nn.GroupNorm):
        return _like(x) if x.dim() >= 2 and x.shape[1] == m.num_channels else None
    return None


def _conv_rule(m: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor | None:
    n = len(m.kernel_size)
    if x.dim() not in (n + 1, n + 2) or x.shape[-n - 1] != m.in_channels:
        return None
    if m.padding_mode != "zeros":
        return None  # reflect and replicate padding must fit the input: the real op checks it
    if m.padding == "same":
        spatial = list(x.shape[-n:])
    else:
        pad = cast(tuple[int, ...], (0,) * n if m.padding == "valid" else m.padding)
        spatial = [
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(x.shape[-n:], pad, m.dilation, m.kernel_size, m.stride)
        ]
        if any(o <= 0 for o in spatial):
            return None
    return _like(x, (*x.shape[: -n - 1], m.out_channels, *spatial))


_ADAPTIVE_POOLS: dict[type, int] = {
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}
_ADAPTIVE_POOL_FUNCTIONS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}


def _adaptive_pool_rule(x: torch.Tensor, output_size: Any, n: int) -> torch.Tensor | None:
    if x.dim() not in (n + 1, n + 2) or any(s == 0 for s in x.shape[-n - 1 :]):
        return None
    size = (output_size,) * n if isinstance(output_size, int) else tuple(output_size)
    if len(size) != n or any(o is not None and (not isinstance(o, int) or o < 0) for o in size):
        return None
    spatial = [x.shape[-n + i] if o is None else o for i, o in enumerate(size)]
    return _like(x, (*x.shape[:-n], *spatial))


def _cat_rule(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if not args or len(args) + len(kwargs) > 2 or set(kwargs) - {"dim"}:
        return None
    tensors, dim = args[0], (args[1] if len(args) > 1 else kwargs.get("dim", 0))
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
        return None
    first = tensors[0]
    if not all(_meta_float(t) and t.dtype == first.dtype and t.dim() == first.dim() for t in tensors):
        return None
    if first.dim() == 0 or not -first.dim() <= dim < first.dim():
        return None
    dim %= first.dim()
    if any(t.shape[:dim] != first.shape[:dim] or t.shape[dim + 1 :] != first.shape[dim + 1 :] for t in tensors):
        return None
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return _like(first, shape)


def function_rule(fn: Callable, args: tuple, kwargs: dict) -> torch.Tensor | None:
    if fn in CAT_FUNCTIONS:
        return _cat_rule(args, kwargs)
    if fn in _ADAPTIVE_POOL_FUNCTIONS:
        if len(args) == 2 and not kwargs and _meta_float(args[0]):
            return _adaptive_pool_rule(args[0], args[1], _ADAPTIVE_POOL_FUNCTIONS[fn])
        return None
    if fn in _SAME_SHAPE_FUNCTIONS:
        if (
            args
            and _meta_float(args[0])
            and all(not isinstance(a, torch.Tensor) for a in (*args[1:], *kwargs.values()))
        ):
            return _like(args[0])
        return None
    if fn in _BINARY and len(args) == 2 and not kwargs:
        a, b = args
        if _meta_float(a) and _meta_float(b) and a.dtype == b.dtype:
            if a.shape == b.shape:
                return _like(a)
            try:
                return _like(a, torch.broadcast_shapes(a.shape, b.shape))
            except RuntimeError:
                return None
        for t, s in ((a, b), (b, a)):
            if _meta_float(t) and isinstance(s, (int, float)) and not isinstance(s, bool):
                return _like(t)
    return None


def method_rule(name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    if name in _SAME_SHAPE_METHODS and len(args) == 1 and not kwargs and _meta_float(args[0]):
        return _like(args[0])
    return None
