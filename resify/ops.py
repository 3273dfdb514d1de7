"""What resify knows about torch ops: which are layers, which follow a layer, which merge branches.

Pure tables and predicates on fx nodes, shared by the analyze stage and the report.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "LAYER_MODULES",
    "WIDENABLE_MODULES",
    "TUPLE_LAYER_MODULES",
    "UPSAMPLE_FUNCTIONS",
    "is_layer_node",
    "layer_name",
    "layer_kind",
    "data_input",
    "layer_weight",
    "follower_role",
    "merge_operands",
    "product_operands",
    "is_multiply",
    "describe",
    "is_elementwise",
    "is_nonlinear",
    "called_module",
    "stored_weight",
    "module_kind",
    "parametrized_originals",
    "fetch",
    "CAT_FUNCTIONS",
    "SHAPE_KEEPING_ACTIVATION_MODULES",
    "SHAPE_KEEPING_ACTIVATION_FUNCTIONS",
    "ACTIVATION_METHODS",
    "DROPOUT_MODULES",
    "DROPOUT_FUNCTIONS",
]

#: Parametric modules that make a layer (the seed's nn.Linear, and convolutions).
#: Layers whose weights a dense shortcut can widen (the consumer of a concatenation).
WIDENABLE_MODULES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Layers that return a tuple whose first item is the layer's output (the sequence, the attention
#: output); the rest (hidden states, attention weights) is left alone.
TUPLE_LAYER_MODULES: tuple[type, ...] = (nn.RNNBase, nn.MultiheadAttention)
LAYER_MODULES: tuple[type, ...] = (
    *WIDENABLE_MODULES,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    *TUPLE_LAYER_MODULES,
)
_LAYER_FUNCTIONS = {F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d"}

#: Activations that keep their input's shape (the shape rules read these too); with GLU, every one.
SHAPE_KEEPING_ACTIVATION_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Mish,
    nn.Softplus,
    nn.PReLU,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
    nn.RReLU,
    nn.Hardshrink,
    nn.Softshrink,
)
_ACTIVATION_MODULES: tuple[type, ...] = (*SHAPE_KEEPING_ACTIVATION_MODULES, nn.GLU)
_NORM_MODULES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
    *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []),  # torch >= 2.4
)
DROPOUT_MODULES: tuple[type, ...] = (nn.modules.dropout._DropoutNd, nn.Identity)
_POOL_MODULES: tuple[type, ...] = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
SHAPE_KEEPING_ACTIVATION_FUNCTIONS = frozenset(
    {
        F.relu,
        F.relu_,
        F.relu6,
        F.gelu,
        F.silu,
        F.leaky_relu,
        F.elu,
        F.selu,
        F.celu,
        F.hardswish,
        F.hardsigmoid,
        F.hardtanh,
        F.mish,
        F.softplus,
        F.sigmoid,
        F.tanh,
        torch.relu,
        torch.relu_,
        torch.sigmoid,
        torch.tanh,
        torch.selu,
        F.threshold,
        F.rrelu,
        F.hardshrink,
        F.softshrink,
        F.logsigmoid,
        F.tanhshrink,
        F.softsign,
        F.prelu,
    }
)
_ACTIVATION_FUNCTIONS = SHAPE_KEEPING_ACTIVATION_FUNCTIONS | {F.glu}
ACTIVATION_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"})
_NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm}
DROPOUT_FUNCTIONS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout})
_POOL_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
#: Upsampling: a follower of a layer (a decoder's conv → upsample), resampled like a pool.
_UPSAMPLE_MODULES: tuple[type, ...] = (nn.Upsample,)
UPSAMPLE_FUNCTIONS = frozenset({F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear})
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}


def fetch(root: nn.Module, target: str) -> Any:
    """The attribute at a dotted ``target`` under ``root`` (a get_attr node's value); AttributeError if absent."""
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def called_module(gm: nn.Module, n: torch.fx.Node) -> nn.Module | None:
    """The module a call_module node calls (None for other nodes)."""
    if n.op != "call_module":
        return None
    mod = gm
    try:  # a walk down _modules: get_submodule's checks cost more than the analysis itself
        for atom in n.target.split("."):  # type: ignore[union-attr]
            mod = mod._modules[atom]  # type: ignore[assignment]
    except KeyError:
        return gm.get_submodule(n.target)  # type: ignore[arg-type]  # raises its own clear error
    return mod


def is_layer_node(gm: nn.Module, n: torch.fx.Node) -> bool:
    """True for a parametric layer op: a Linear/ConvNd module, or F.linear/F.convNd on a parameter."""
    m = called_module(gm, n)
    if m is not None:
        return isinstance(m, LAYER_MODULES)
    if n.op == "call_function" and n.target in _LAYER_FUNCTIONS:
        w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        return isinstance(w, torch.fx.Node) and w.op == "get_attr"
    return False


def parametrized_originals(m: nn.Module, name: str = "weight") -> Iterator[nn.Parameter]:
    """The stored tensors from which a parametrized module computes its ``name`` tensor."""
    parametrizations = cast(nn.ModuleDict, m.parametrizations)
    return parametrizations[name].parameters()


#: Where a layer keeps its (first) weight: most layers, recurrent layers, attention, and an
#: old-style weight_norm / spectral_norm layer's stored tensor.
_WEIGHT_NAMES = ("weight", "weight_ih_l0", "in_proj_weight", "q_proj_weight", "weight_orig", "weight_v")


def stored_weight(m: nn.Module) -> torch.Tensor | None:
    """The parameter that holds a module's weight, if it has one of two or more dimensions: ``weight``,
    a recurrent layer's ``weight_ih_l0``, attention's ``in_proj_weight``; where the weight is computed
    (a parametrization, old-style ``weight_norm``/``spectral_norm``) the tensor it is computed from.

    >>> [tuple(stored_weight(m).shape) for m in (nn.Linear(3, 2), nn.LSTM(3, 4), nn.Embedding(5, 2))]
    [(2, 3), (16, 3), (5, 2)]
    """
    w: torch.Tensor | None = None
    if "parametrizations" in m._modules and parametrize.is_parametrized(m, "weight"):  # (no failing getattr)
        w = max(parametrized_originals(m), key=lambda p: (p.dim(), p.numel()), default=None)
    else:
        w = next((p for p in map(m._parameters.get, _WEIGHT_NAMES) if p is not None), None)
    if isinstance(w, torch.Tensor) and w.dim() >= 2 and w.is_floating_point():
        return w
    return None


def layer_weight(gm: nn.Module, n: torch.fx.Node) -> torch.Tensor:
    """The weight tensor of a layer node (module weight or the get_attr parameter)."""
    m = called_module(gm, n)
    if m is not None:
        # a stored tensor (its device and dtype): computing a parametrized weight would step a spectral norm
        weight = stored_weight(m)
        assert weight is not None, f"{type(m).__name__} has none of {_WEIGHT_NAMES}"
        return weight
    w = n.args[1] if len(n.args) > 1 else n.kwargs["weight"]
    return fetch(gm, str(w.target))  # type: ignore[union-attr]


def layer_name(n: torch.fx.Node) -> str:
    """Qualified module name of a layer node ("layers.0.0"); for F.linear the weight's owner."""
    if n.op == "call_module":
        return str(n.target)
    w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
    target = str(getattr(w, "target", n.name))
    return target.rsplit(".", 1)[0] if "." in target else target


def module_kind(m: nn.Module) -> str:
    """A module's class name; a parametrized one's original ('Linear' for a weight_norm Linear)."""
    cls = type(m)
    return cls.__bases__[0].__name__ if parametrize.is_parametrized(m) and cls.__bases__ else cls.__name__


def layer_kind(gm: nn.Module, n: torch.fx.Node) -> str:
    """'Linear', 'Conv2d', … for a layer node (functional layers map to the module name)."""
    m = called_module(gm, n)
    if m is not None:
        return module_kind(m)
    return {"linear": "Linear", "conv1d": "Conv1d", "conv2d": "Conv2d", "conv3d": "Conv3d"}[
        _LAYER_FUNCTIONS[n.target]  # type: ignore[index]
    ]


def data_input(n: torch.fx.Node) -> Any:
    """The first (data) argument of an op."""
    if n.args:
        return n.args[0]
    return next(iter(n.kwargs.values()), None)


def follower_role(gm: nn.Module, n: torch.fx.Node) -> str | None:
    """'activation', 'norm', 'dropout' or 'pool' when ``n`` may follow a layer inside it, else None."""
    m = called_module(gm, n)
    if m is not None:
        for role, types in (
            ("activation", _ACTIVATION_MODULES),
            ("norm", _NORM_MODULES),
            ("dropout", DROPOUT_MODULES),
            ("pool", (*_POOL_MODULES, *_UPSAMPLE_MODULES)),
        ):
            if isinstance(m, types):
                return role
        return None
    if n.op == "call_function":
        for role, fns in (
            ("activation", _ACTIVATION_FUNCTIONS),
            ("norm", _NORM_FUNCTIONS),
            ("dropout", DROPOUT_FUNCTIONS),
            ("pool", _POOL_FUNCTIONS | UPSAMPLE_FUNCTIONS),
        ):
            if n.target in fns:
                return role
    if n.op == "call_method" and n.target in ACTIVATION_METHODS:
        return "activation"
    return None


def describe(gm: nn.Module, n: torch.fx.Node) -> str:
    """A short human name for a node: "'21' (Flatten)", "'view' (Tensor.view)", "'add' (add)"."""
    if n.op == "call_module":
        return f"'{n.target}' ({type(gm.get_submodule(str(n.target))).__name__})"
    if n.op == "call_method":
        return f"'{n.name}' (Tensor.{n.target})"
    if n.op == "call_function":
        return f"'{n.name}' ({getattr(n.target, '__name__', str(n.target))})"
    return f"'{n.name}'"


def is_activation(gm: nn.Module, n: torch.fx.Node) -> bool:
    return follower_role(gm, n) == "activation"


def merge_operands(n: torch.fx.Node) -> tuple[str, list[torch.fx.Node]] | None:
    """For an add or concat of graph values, ('add'|'concat', operand nodes); else None."""
    if (
        n.op == "call_function"
        and n.target in _ADD_FUNCTIONS
        or n.op == "call_method"
        and n.target in ("add", "add_", "__add__", "__iadd__")
    ):
        kind, ops = "add", list(n.args[:2])
    elif n.op == "call_function" and n.target in CAT_FUNCTIONS:
        seq = n.args[0] if n.args else n.kwargs.get("tensors", ())
        kind, ops = "concat", list(seq) if isinstance(seq, (list, tuple)) else []
    else:
        return None
    nodes = [o for o in ops if isinstance(o, torch.fx.Node)]
    return (kind, nodes) if len(nodes) >= 2 else None


# ---------------------------------------------------------------------------------------------
# element-wise ops: an activation written as a Python function (x * sigmoid(x), a mish helper)

# torch's math functions beside the activations (one table of those, above)
_MATH_FUNCTIONS = {torch.exp, torch.erf, torch.log1p, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.clamp}
_UNARY_FUNCTIONS = (
    SHAPE_KEEPING_ACTIVATION_FUNCTIONS | _MATH_FUNCTIONS | {torch.square, torch.sin, torch.cos, torch.pow}
)
_ARITHMETIC = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.pow,
    operator.neg,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
}
_ARITHMETIC_METHODS = {"mul", "add", "sub", "div", "neg", "abs"}
_MATH_METHODS = {"exp", "erf", "sqrt", "rsqrt", "clamp", "pow", "square", "softplus", "log1p"}
_ELEMENTWISE_METHODS = ACTIVATION_METHODS | _MATH_METHODS | _ARITHMETIC_METHODS
#: the ops that make such a chain nonlinear (a chain of adds and multiplies by constants is linear)
_NONLINEAR = (_UNARY_FUNCTIONS - {torch.neg, torch.abs}) | {operator.pow}
_NONLINEAR_METHODS = _ELEMENTWISE_METHODS - _ARITHMETIC_METHODS


def is_elementwise(n: torch.fx.Node) -> bool:
    """True for an element-wise math op (unary functions, arithmetic) that keeps its input's shape
    when its other operands are numbers or values of the same shape."""
    if n.op == "call_function":
        return n.target in _UNARY_FUNCTIONS or n.target in _ARITHMETIC
    return n.op == "call_method" and n.target in _ELEMENTWISE_METHODS


_MULTIPLIES = {operator.mul, torch.mul}
_PRODUCTS = _MULTIPLIES | {operator.truediv, torch.div}
#: products that scale one value by another: element-wise, and attention's weights @ values
_SCALING_FUNCTIONS = _MULTIPLIES | {operator.matmul, torch.matmul, torch.bmm}
_SCALING_METHODS = {"mul", "mul_", "__mul__", "matmul", "bmm"}


def is_multiply(n: torch.fx.Node) -> bool:
    """An element-wise product (``x * g``, ``torch.mul``, ``x.mul(g)``), not a matrix product."""
    if n.op == "call_function":
        return n.target in _MULTIPLIES
    return n.op == "call_method" and n.target in ("mul", "mul_", "__mul__")


def product_operands(n: torch.fx.Node) -> list[torch.fx.Node] | None:
    """For a product of two graph values (``x * g``, ``weights @ v``), its two operands; else None."""
    if (n.op == "call_function" and n.target in _SCALING_FUNCTIONS) or (
        n.op == "call_method" and n.target in _SCALING_METHODS
    ):
        ops = [a for a in n.args[:2] if isinstance(a, torch.fx.Node)]
        return ops if len(ops) == 2 and ops[0] is not ops[1] else None
    return None


def is_nonlinear(n: torch.fx.Node) -> bool:
    """True for an element-wise op that makes a chain nonlinear: an activation, a math function, or
    a product of two computed values (x * sigmoid(x)); sums and scalings (x + y, 2 * x) are linear."""
    if n.op == "call_function":
        if n.target in _PRODUCTS:
            return sum(isinstance(a, torch.fx.Node) for a in n.args) > 1
        return n.target in _NONLINEAR  # (x ** 2 among them; sums and negations are not)
    if n.op == "call_method":
        if n.target in ("mul", "div"):
            return sum(isinstance(a, torch.fx.Node) for a in n.args) > 1
        return n.target in _NONLINEAR_METHODS
    return False
