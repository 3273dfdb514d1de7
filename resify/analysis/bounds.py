"""Bounded outputs: where a shortcut would take the model's output out of its range.

A span that ends in a Sigmoid, Tanh, Softmax, Hardtanh, … whose value reaches the model's output
unchanged (through nothing but reshapes) gets no shortcut: the planner asks these two predicates.
The analyze stage's gate finder asks them too (a gate is a bounded value that scales another).
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..ops import called_module

__all__ = ["is_bounded_activation", "is_shape_op", "reaches_output_unchanged"]


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
    "expand",
    "expand_as",
    # casts and copies keep the values (and their range): a model that ends in `probs.float()`
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type",
    "type_as",
    "clone",
    "detach",
    "cpu",
    "cuda",
}


def is_bounded_activation(gm: nn.Module, n: torch.fx.Node) -> bool:
    """True for an activation whose output lies in a range (Sigmoid, Tanh, Softmax, Hardtanh, …)."""
    m = called_module(gm, n)
    if m is not None:
        return isinstance(m, _BOUNDED_MODULES)
    if n.op == "call_function":
        return n.target in _BOUNDED_FUNCTIONS
    return n.op == "call_method" and n.target in _BOUNDED_METHODS


def is_shape_op(gm: nn.Module, n: torch.fx.Node) -> bool:
    """True for an op that only moves, reshapes, casts or copies its input's values (view, flatten,
    getitem, .float(), .clone(), …)."""
    return (
        isinstance(called_module(gm, n), _SHAPE_MODULES)
        or (n.op == "call_function" and n.target in _SHAPE_FUNCTIONS)
        or (n.op == "call_method" and n.target in _SHAPE_METHODS)
    )


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
            if is_shape_op(gm, u):
                todo.append(u)
    return False
