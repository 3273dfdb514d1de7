"""Part of stage 2 (analyze): gates, the branches computed only to scale another value.

Squeeze-excitation's ``x * hardsigmoid(fc2(relu(fc1(pool(x)))))``, a GLU's ``a * sigmoid(b)``,
attention's ``softmax(q @ k.T) @ v``: a value in a range (a bounded activation's output) that
multiplies another value of the main path. The layers that compute it only steer that value: an
expert puts no shortcut around them (it would add to the gate, not to the signal the gate scales),
and the planner skips them with the code ``gate_branch``. It changes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping

import torch.fx
from torch import nn

from ..ops import data_input, follower_role, is_elementwise, product_operands
from .bounds import is_bounded_activation, is_shape_op
from .dataflow import backward_walk, main_input

__all__ = ["gate_branches"]


def gate_branches(
    gm: nn.Module,
    graph: torch.fx.Graph,
    ipdom: Mapping[object, object],
    masks: Mapping[torch.fx.Node, int],
    order: Mapping[object, int],
) -> dict[str, str]:
    """Every value computed only to gate another, and the product it gates (fx node names).

    A value is in a gate's branch where every path from it to the output goes through the gate (the
    gate post-dominates it): SE's pooling and both its convolutions, not the feature map it scales.
    ``ipdom``: the immediate post-dominators of the data flow; ``masks``: ``dataflow.input_masks``.
    """
    below: defaultdict[object, list] = defaultdict(list)  # the post-dominator tree, top down
    for n, parent in ipdom.items():
        if parent is not n:
            below[parent].append(n)
    found: dict[str, str] = {}
    for m in graph.nodes:
        operands = product_operands(m)
        if operands is None:
            continue
        for gate, value in (operands, operands[::-1]):
            if _gates(gm, gate, value, m, ipdom, masks, order):
                for v in _subtree(below, gate):
                    found.setdefault(v.name, m.name)
    return found


def _gates(
    gm: nn.Module,
    gate: torch.fx.Node,
    value: torch.fx.Node,
    product: torch.fx.Node,
    ipdom: Mapping[object, object],
    masks: Mapping[torch.fx.Node, int],
    order: Mapping[object, int],
) -> bool:
    """True where ``gate`` only scales ``value`` at ``product``: it is bounded, it reaches the output
    only through the product, and ``value`` is another value of the product's main input (a FiLM
    scale computed from a conditioning input gates the main path; the main path does not gate it)."""
    if gate not in masks or not masks.get(value, 0) & main_input(masks, product):
        return False
    if ipdom.get(gate) is not product or not _bounded(gm, gate, masks):
        return False
    return not _computed_from(value, gate, order)


def _bounded(gm: nn.Module, n: torch.fx.Node, masks: Mapping[torch.fx.Node, int]) -> bool:
    """True for a bounded activation's output, perhaps reshaped, dropped out or scaled after it (by
    numbers or by sizes read from a shape: ``s.view(b, c, 1, 1)``; not ``sigmoid(x) + h``)."""
    while True:
        if is_bounded_activation(gm, n):
            return True
        if is_shape_op(gm, n) or follower_role(gm, n) == "dropout":
            x = data_input(n)  # (the other arguments are sizes: s.expand_as(x) reads x's shape only)
        else:
            inputs = [a for a in n.all_input_nodes if a in masks]
            x = inputs[0] if is_elementwise(n) and len(inputs) == 1 else None
        if not isinstance(x, torch.fx.Node):
            return False
        n = x


def _computed_from(value: torch.fx.Node, gate: torch.fx.Node, order: Mapping[object, int]) -> bool:
    """True when ``value`` is computed from ``gate`` (then it is the gate's own input, x * sigmoid(x))."""
    if order[value] < order[gate]:
        return False
    seen, _ = backward_walk([value], gate, order)
    return any(gate in n.all_input_nodes for n in seen)


def _subtree(below: Mapping[object, list], top: torch.fx.Node) -> Iterator[torch.fx.Node]:
    """``top`` and every node below it in the post-dominator tree."""
    stack = [top]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(below.get(n, ()))
