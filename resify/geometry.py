"""Spatial geometry: how a convolution or pool maps an input size to an output size.

Read from the ops' hyperparameters (kernel, stride, padding, dilation, ceil mode), never from the
example's shapes, so that the planner can tell whether a 1×1 strided projection matches a span at
every input size or the shortcut must be pooled to the branch's size at run time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .ops import called_module, follower_role

__all__ = ["Window", "SAME", "size_functions"]


class Window(NamedTuple):
    """A sliding window over one spatial dim (a convolution's or a pool's): calling it maps an input
    size to the output size by torch's formula, None where the op rejects that size. Hashable, so a
    span's geometry is computed once per distinct sequence of windows."""

    kernel: int
    stride: int
    padding: int
    dilation: int
    ceil: bool

    def __call__(self, n: int) -> int | None:
        span = n + 2 * self.padding - self.dilation * (self.kernel - 1) - 1
        if span < 0:
            return None
        out = (-(-span // self.stride) if self.ceil else span // self.stride) + 1
        if self.ceil and (out - 1) * self.stride >= n + self.padding:  # the last window starts inside
            out -= 1
        return out


#: The window that keeps every size (element-wise ops, norms, a 'same'-padded convolution).
SAME = Window(1, 1, 0, 1, False)
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_MAX_POOL_FUNCTIONS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_AVG_POOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}


def _per_dim(v: Any, dims: int) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


def _window(k: int, s: int, p: int, d: int, ceil: bool) -> Window:
    return Window(int(k), int(s), int(p), int(d), bool(ceil))


def _arg(n: torch.fx.Node, i: int, name: str, default: Any) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def size_functions(gm: nn.Module, n: torch.fx.Node, dims: int) -> list[Window] | None:
    """Per spatial dim, the function from input to output size of op ``n`` on [N, C, *spatial].

    Element-wise ops, norms and dropout keep the size; convolutions and pools follow torch's
    formula from their hyperparameters. None where the size does not follow from them (adaptive
    pools, whose output size is fixed, and ops resify does not know).
    """
    m = called_module(gm, n)
    if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
        if m.padding == "same":
            return [SAME] * dims
        pad: tuple[int, ...] = (0,) * dims if m.padding == "valid" else tuple(m.padding)  # type: ignore[arg-type]
        return [_window(k, s, p, d, False) for k, s, p, d in zip(m.kernel_size, m.stride, pad, m.dilation)]
    if isinstance(m, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
        dil = _per_dim(getattr(m, "dilation", 1), dims)
        stride = m.stride if m.stride is not None else m.kernel_size
        return [
            _window(k, s, p, d, bool(m.ceil_mode))
            for k, s, p, d in zip(_per_dim(m.kernel_size, dims), _per_dim(stride, dims), _per_dim(m.padding, dims), dil)
        ]
    if isinstance(m, nn.modules.pooling._LPPoolNd):
        stride = m.stride if m.stride is not None else m.kernel_size
        return [
            _window(k, s, 0, 1, bool(m.ceil_mode))
            for k, s in zip(_per_dim(m.kernel_size, dims), _per_dim(stride, dims))
        ]
    if n.op == "call_function" and n.target in _CONV_FUNCTIONS:
        w = _arg(n, 1, "weight", None)
        info = w.meta.get("resify") if isinstance(w, torch.fx.Node) else None
        padding = _arg(n, 4, "padding", 0)
        if info is None or not isinstance(padding, (int, tuple, list, str)):
            return None
        if padding == "same":
            return [SAME] * dims
        pad = (0,) * dims if padding == "valid" else _per_dim(padding, dims)
        stride, dilation = _per_dim(_arg(n, 3, "stride", 1), dims), _per_dim(_arg(n, 5, "dilation", 1), dims)
        return [_window(k, s, p, d, False) for k, s, p, d in zip(info.shape[2:], stride, pad, dilation)]
    if n.op == "call_function" and (n.target in _MAX_POOL_FUNCTIONS or n.target in _AVG_POOL_FUNCTIONS):
        is_max = n.target in _MAX_POOL_FUNCTIONS
        k = _arg(n, 1, "kernel_size", None)
        s = _arg(n, 2, "stride", None) or k
        p = _arg(n, 3, "padding", 0)
        d = _arg(n, 4, "dilation", 1) if is_max else 1
        ceil = _arg(n, 5 if is_max else 4, "ceil_mode", False)
        values = (k, s, p, d, ceil)
        if any(isinstance(v, torch.fx.Node) for v in values) or k is None:
            return None
        return [
            _window(*a, bool(ceil))
            for a in zip(_per_dim(k, dims), _per_dim(s, dims), _per_dim(p, dims), _per_dim(d, dims))
        ]
    if follower_role(gm, n) in ("activation", "norm", "dropout"):
        return [SAME] * dims
    return None
