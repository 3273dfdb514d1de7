"""What resify knows about torch ops: which are layers, which follow a layer, which merge branches.

Pure tables and predicates on fx nodes, shared by the analyze stage and the report.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

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
]

#: Parametric modules that make a layer (the seed's nn.Linear, and convolutions).
LAYER_MODULES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYER_FUNCTIONS = {F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d"}

_ACTIVATION_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.PReLU,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.GLU, nn.Threshold, nn.RReLU, nn.Hardshrink,
    nn.Softshrink,
)
_NORM_MODULES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm,
    *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []),  # torch >= 2.4
)
_DROPOUT_MODULES: tuple[type, ...] = (nn.modules.dropout._DropoutNd, nn.Identity)
_POOL_MODULES: tuple[type, ...] = (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
_ACTIVATION_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.selu, F.celu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.mish, F.softplus, F.sigmoid, F.tanh, torch.relu, torch.relu_,
    torch.sigmoid, torch.tanh, torch.selu, F.glu, F.threshold, F.rrelu, F.hardshrink, F.softshrink,
    F.logsigmoid, F.tanhshrink, F.softsign, F.prelu,
}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}


def _module(gm: nn.Module, n: torch.fx.Node) -> nn.Module | None:
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
    m = _module(gm, n)
    if m is not None:
        return isinstance(m, LAYER_MODULES)
    if n.op == "call_function" and n.target in _LAYER_FUNCTIONS:
        w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        return isinstance(w, torch.fx.Node) and w.op == "get_attr"
    return False


def layer_weight(gm: nn.Module, n: torch.fx.Node) -> torch.Tensor:
    """The weight tensor of a layer node (module weight or the get_attr parameter)."""
    m = _module(gm, n)
    if m is not None:
        return m.weight  # type: ignore[return-value]
    w = n.args[1] if len(n.args) > 1 else n.kwargs["weight"]
    obj: Any = gm
    for atom in str(w.target).split("."):  # type: ignore[union-attr]
        obj = getattr(obj, atom)
    return obj


def layer_name(n: torch.fx.Node) -> str:
    """Qualified module name of a layer node ("layers.0.0"); for F.linear the weight's owner."""
    if n.op == "call_module":
        return str(n.target)
    w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
    target = str(getattr(w, "target", n.name))
    return target.rsplit(".", 1)[0] if "." in target else target


def layer_kind(gm: nn.Module, n: torch.fx.Node) -> str:
    """'Linear', 'Conv2d', … for a layer node (functional layers map to the module name)."""
    m = _module(gm, n)
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
    m = _module(gm, n)
    if m is not None:
        for role, types in (
            ("activation", _ACTIVATION_MODULES), ("norm", _NORM_MODULES),
            ("dropout", _DROPOUT_MODULES), ("pool", _POOL_MODULES),
        ):
            if isinstance(m, types):
                return role
        return None
    if n.op == "call_function":
        for role, fns in (
            ("activation", _ACTIVATION_FUNCTIONS), ("norm", _NORM_FUNCTIONS),
            ("dropout", _DROPOUT_FUNCTIONS), ("pool", _POOL_FUNCTIONS),
        ):
            if n.target in fns:
                return role
    if n.op == "call_method" and n.target in _ACTIVATION_METHODS:
        return "activation"
    return None


def describe(gm: nn.Module, n: torch.fx.Node) -> str:
    """A short human name for a node: "'21' (Flatten)", "'view' (Tensor.view)", "'add' (add)"."""
    if n.op == "call_module":
        return f"'{n.target}' ({type(gm.get_submodule(n.target)).__name__})"
    if n.op == "call_method":
        return f"'{n.name}' (Tensor.{n.target})"
    if n.op == "call_function":
        return f"'{n.name}' ({getattr(n.target, '__name__', str(n.target))})"
    return f"'{n.name}'"


def is_activation(gm: nn.Module, n: torch.fx.Node) -> bool:
    return follower_role(gm, n) == "activation"


def merge_operands(n: torch.fx.Node) -> tuple[str, list[torch.fx.Node]] | None:
    """For an add or concat of graph values, ('add'|'concat', operand nodes); else None."""
    if n.op == "call_function" and n.target in _ADD_FUNCTIONS:
        kind, ops = "add", list(n.args[:2])
    elif n.op == "call_method" and n.target in ("add", "add_", "__add__", "__iadd__"):
        kind, ops = "add", list(n.args[:2])
    elif n.op == "call_function" and n.target in _CAT_FUNCTIONS:
        seq = n.args[0] if n.args else n.kwargs.get("tensors", ())
        kind, ops = "concat", list(seq) if isinstance(seq, (list, tuple)) else []
    else:
        return None
    nodes = [o for o in ops if isinstance(o, torch.fx.Node)]
    return (kind, nodes) if len(nodes) >= 2 else None
