"""Spatial geometry: how a convolution or pool maps an input size to an output size.

Read from the ops' hyperparameters (kernel, stride, padding, dilation, ceil mode), never from the
example's shapes, so that the planner can tell whether a 1×1 strided projection matches a span at
every input size or the shortcut must be pooled to the branch's size at run time.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..analysis.analyze import Analysis, Layer
from ..ops import called_module, data_input, follower_role, is_elementwise
from ..tracing.shapes import TensorInfo

__all__ = [
    "Window",
    "SAME",
    "size_functions",
    "span_geometry",
    "size_rule",
    "stride_of",
    "norm_sees",
    "span_norm",
    "before_trailing_pool",
]


class Window(NamedTuple):
    """A sliding window over one spatial dim (a convolution's or a pool's): calling it maps an input
    size to the output size by torch's formula, None where the op rejects that size. Hashable, so a
    span's geometry is computed once per distinct sequence of windows."""

    kernel: int
    stride: int
    padding: int
    dilation: int
    ceil: bool
    min_size: int = 1  # the smallest input accepted (avg_pool3d refuses an input smaller than its kernel)

    def __call__(self, n: int) -> int | None:
        span = n + 2 * self.padding - self.dilation * (self.kernel - 1) - 1
        # torch's formula; in ceil mode a window that starts inside the input counts even where it
        # runs past the padded end (a 1-wide input gives one output of MaxPool(2, ceil_mode=True))
        out = (-(-span // self.stride) if self.ceil else span // self.stride) + 1
        if self.ceil and (out - 1) * self.stride >= n + self.padding:  # the last window starts inside
            out -= 1
        return out if out >= 1 and n >= self.min_size else None


#: The window that keeps every size (element-wise ops, norms, a 'same'-padded convolution).
SAME = Window(1, 1, 0, 1, False)
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_MAX_POOL_FUNCTIONS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_AVG_POOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}


def _per_dim(v: Any, dims: int) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


def _window(k: int, s: int, p: int, d: int, ceil: bool, min_size: int = 1) -> Window:
    return Window(int(k), int(s), int(p), int(d), bool(ceil), int(min_size))


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
    if isinstance(m, nn.modules.conv._ConvTransposeNd):  # out = (in - 1)·s - 2p + d(k - 1) + op + 1
        pads = cast(tuple[int, ...], m.padding)  # (a transposed convolution has no 'same' padding)
        keeps = all(
            s == 1 and d * (k - 1) + op - 2 * p == 0
            for k, s, p, d, op in zip(m.kernel_size, m.stride, pads, m.dilation, m.output_padding)
        )
        return [SAME] * dims if keeps else None  # a growing map: resampled at run time
    if isinstance(m, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
        dil = _per_dim(getattr(m, "dilation", 1), dims)
        stride = m.stride if m.stride is not None else m.kernel_size
        avg3d = isinstance(m, nn.AvgPool3d)
        return [
            _window(k, s, p, d, bool(m.ceil_mode), k if avg3d else 1)
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
        avg3d = n.target is F.avg_pool3d
        return [
            _window(*a, bool(ceil), a[0] if avg3d else 1)
            for a in zip(_per_dim(k, dims), _per_dim(s, dims), _per_dim(p, dims), _per_dim(d, dims))
        ]
    if follower_role(gm, n) in ("activation", "norm", "dropout") or is_elementwise(n):
        return [SAME] * dims  # (an activation written as arithmetic, x * sigmoid(x), too)
    return None


# ---------------------------------------------------------------------------------------------
# a span's geometry, composed from its ops' windows


#: Input sizes on which a span's geometry is compared with its shortcut's (every size the span
#: accepts up to this bound: the formulas are periodic in the stride, so this covers all sizes).
PROBE_SIZES = range(1, 257)


def span_geometry(layers: Sequence[Layer], analysis: Analysis, dims: int) -> tuple[str, tuple[int, ...]]:
    """How a conv span's spatial size follows its input's, from its ops' hyperparameters.

    ``("same", ())``: every size is kept; ``("stride", S)``: out = ceil(in / S) on every size the span
    accepts, what a 1×1 conv of stride S gives; ``("match", ())``: anything else (a pool, whose
    windows the shortcut averages over; an adaptive pool; a valid convolution), where the shortcut
    is average-pooled to the branch's own output size at run time.
    """
    nodes = [analysis.node(name) for layer in layers for name in layer.nodes]
    found = size_rule(nodes, analysis, dims)
    if found is None:
        return "match", ()
    strides, pooled = found
    if all(s == 1 for s in strides):
        return "same", ()
    return ("match", ()) if pooled else ("stride", tuple(strides))


def size_rule(nodes: Sequence, analysis: Analysis, dims: int) -> tuple[list[int], bool] | None:
    """Per spatial dim the stride S with out = ceil(in / S) for every size the ops accept, and whether
    one of them pools; None where the ops' sizes follow no such rule (or cannot be told)."""
    per_dim: list[list[Window]] = [[] for _ in range(dims)]
    pooled = False
    for n in nodes:
        fns = size_functions(analysis.module, n, dims)
        if fns is None:
            return None
        pooled = pooled or follower_role(analysis.module, n) == "pool"
        for d, fn in enumerate(fns):
            if fn != SAME:
                per_dim[d].append(fn)
    strides = [stride_of(tuple(windows)) for windows in per_dim]
    if any(s is None for s in strides):
        return None
    return strides, pooled  # type: ignore[return-value]


@functools.lru_cache(maxsize=4096)
def stride_of(windows: tuple[Window, ...]) -> int | None:
    """S with ceil(in / S) == the windows' output for every input size they accept, or None."""
    if not windows:
        return 1
    sizes = {}
    for size in PROBE_SIZES:
        out: int | None = size
        for window in windows:
            out = window(out) if out is not None and out >= 1 else None
        if out is not None and out >= 1:
            sizes[size] = out
    if not sizes:
        return None
    top = max(sizes)
    stride = max(1, round(top / sizes[top]))
    if any(-(-i // stride) != o for i, o in sizes.items()):
        return None
    return stride


def norm_sees(layers: Sequence[Layer], analysis: Analysis, dims: int) -> str | None:
    """Which size the span's first norm sees at every input size: "input", "output" or None.

    A BatchNorm on the shortcut goes where it sees that same size, so that it accepts every batch
    the span's own does (one sample of 1×1 maps is refused in training).
    """
    nodes = [analysis.node(name) for layer in layers for name in layer.nodes]
    first = next((i for i, n in enumerate(nodes) if follower_role(analysis.module, n) == "norm"), None)
    if first is None:
        return None
    before, after = size_rule(nodes[:first], analysis, dims), size_rule(nodes[first:], analysis, dims)
    if before is not None and all(s == 1 for s in before[0]):
        return "input"
    if after is not None and all(s == 1 for s in after[0]):
        return "output"
    return None


def span_norm(layers: Sequence[Layer], analysis: Analysis, dims: int) -> str | None:
    """The BatchNorm type a conv projection gets: one where the span has a batch norm."""
    return next(
        (f"BatchNorm{dims}d" for layer in layers for r in layer.roles if r == "norm" and analysis.has_batchnorm(layer)),
        None,
    )


def before_trailing_pool(layers: Sequence[Layer], analysis: Analysis, src: TensorInfo, dims: int) -> str | None:
    """The node before the span's trailing pools where the shape is still the input's at every size
    (conv → norm → act → pool: the act), or None."""
    nodes = [analysis.node(name) for layer in layers for name in layer.nodes]
    kept = list(nodes)
    while kept and follower_role(analysis.module, kept[-1]) == "pool":
        kept.pop()
    if not dims or not kept or len(kept) == len(nodes):
        return None
    info = kept[-1].meta.get("resify")
    rule = size_rule(kept, analysis, dims)
    if info is None or info.shape != src.shape or rule is None or any(s != 1 for s in rule[0]):
        return None
    if analysis.span_problem(data_input(analysis.node(layers[0].anchor)), kept[-1]):
        return None
    return str(kept[-1].name)
