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
    "is_layer_node",
    "layer_name",
    "layer_kind",
    "data_input",
    "layer_weight",
    "follower_role",
    "merge_operands",
    "describe",
    "is_bounded_activation",
    "is_elementwise",
    "is_nonlinear",
    "reaches_output_unchanged",
    "called_module",
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
LAYER_MODULES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
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


def layer_weight(gm: nn.Module, n: torch.fx.Node) -> torch.Tensor:
    """The weight tensor of a layer node (module weight or the get_attr parameter)."""
    m = called_module(gm, n)
    if m is not None:
        if parametrize.is_parametrized(m, "weight"):  # a stored tensor (its device and dtype): computing
            return next(parametrized_originals(m))  # the weight would step a spectral norm
        weight = m.weight
        assert isinstance(weight, torch.Tensor)
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


def layer_kind(gm: nn.Module, n: torch.fx.Node) -> str:
    """'Linear', 'Conv2d', … for a layer node (functional layers map to the module name)."""
    m = called_module(gm, n)
    if m is not None:
        return type(m).__name__
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
            ("pool", _POOL_MODULES),
        ):
            if isinstance(m, types):
                return role
        return None
    if n.op == "call_function":
        for role, fns in (
            ("activation", _ACTIVATION_FUNCTIONS),
            ("norm", _NORM_FUNCTIONS),
            ("dropout", DROPOUT_FUNCTIONS),
            ("pool", _POOL_FUNCTIONS),
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
# bounded outputs: a shortcut across these would take the model's output out of its range

_BOUNDED_MODULES: tuple[type, ...] = (
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softmax2d,
    nn.Softmin,  # nn.ReLU6 is a Hardtanh
)
_BOUNDED_FUNCTIONS = {
    F.sigmoid,
    torch.sigmoid,
    F.tanh,
    torch.tanh,
    F.hardtanh,
    F.relu6,
    F.hardsigmoid,
    F.softsign,
    F.logsigmoid,
    F.softmax,
    F.log_softmax,
    F.softmin,
    torch.softmax,
    torch.log_softmax,
}
_BOUNDED_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax"}
_SHAPE_MODULES: tuple[type, ...] = (nn.Flatten, nn.Unflatten, nn.Identity)
_SHAPE_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.permute,
    torch.transpose,
    operator.getitem,
}
_SHAPE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "squeeze",
    "unsqueeze",
    "permute",
    "transpose",
    "contiguous",
    "view_as",
    "reshape_as",
    "unflatten",
    "movedim",
}


def is_bounded_activation(gm: nn.Module, n: torch.fx.Node) -> bool:
    """True for an activation whose output lies in a range (Sigmoid, Tanh, Softmax, Hardtanh, …)."""
    m = called_module(gm, n)
    if m is not None:
        return isinstance(m, _BOUNDED_MODULES)
    if n.op == "call_function":
        return n.target in _BOUNDED_FUNCTIONS
    return n.op == "call_method" and n.target in _BOUNDED_METHODS


def reaches_output_unchanged(gm: nn.Module, n: torch.fx.Node) -> bool:
    """True when ``n``'s value goes to the graph's output through nothing but shape ops."""
    todo, seen = [n], set()
    while todo:
        cur = todo.pop()
        for u in cur.users:
            if u in seen:
                continue
            seen.add(u)
            if u.op == "output":
                return True
            m = called_module(gm, u)
            if (
                isinstance(m, _SHAPE_MODULES)
                or (u.op == "call_function" and u.target in _SHAPE_FUNCTIONS)
                or (u.op == "call_method" and u.target in _SHAPE_METHODS)
            ):
                todo.append(u)
    return False


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


def is_nonlinear(n: torch.fx.Node) -> bool:
    if n.op == "call_function":
        if n.target in _ARITHMETIC and n.target is not operator.pow:
            # x * y where both come from the layer (x * sigmoid(x)) is nonlinear; x * 2 is not
            return sum(isinstance(a, torch.fx.Node) for a in n.args) > 1
        return n.target in _NONLINEAR
    if n.op == "call_method":
        if n.target in ("mul", "div"):
            return sum(isinstance(a, torch.fx.Node) for a in n.args) > 1
        return n.target in _NONLINEAR_METHODS
    return False
