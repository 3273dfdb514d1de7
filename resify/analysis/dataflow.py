"""Part of stage 2 (analyze): which values are computed from which of the model's inputs.

The data-flow graph of a traced model (values computed from its inputs' values, not from their
shapes), the inputs each value is computed from, and the backward walks that the analyze stage and
its gate finder share. A model with a second input (a diffusion model's time step, a class label, a
cross-attention context, FiLM's conditioning vector) joins projections of it into its main path in
every block; judged on the flow of the main input alone, those joins are conditioning, not a second
path of the same signal. It changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import NamedTuple

import networkx as nx
import torch.fx

from ..ops import is_multiply, merge_operands, product_operands

__all__ = [
    "SOURCE",
    "dataflow",
    "input_masks",
    "main_input",
    "MainFlow",
    "main_flow",
    "backward_walk",
    "latest_common_ancestor",
    "conditions",
]

SOURCE = "__resify_source__"
#: The root of the data-flow graph: an edge from it to each of the model's inputs.

_SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda"}
_SHAPE_METHODS = {"size", "dim", "numel", "get_device", "type"}


def _reads_metadata_only(n: torch.fx.Node) -> bool:
    """True for ``x.shape``, ``x.size(1)``, ``x.dim()``: what they give does not flow from x's values."""
    if n.op == "call_function" and n.target is getattr:
        return len(n.args) > 1 and n.args[1] in _SHAPE_ATTRIBUTES
    return n.op == "call_method" and n.target in _SHAPE_METHODS


def input_masks(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    """For every value computed from the model's inputs, the inputs it is computed from: bit i for
    the forward's i-th argument (its placeholders come in argument order).

    Reading a value's shape is not data flow: positions made with ``torch.arange(x.size(1))`` and
    the embeddings of them are not computed from x (so ``x + pos_embedding`` is no shortcut).
    """
    masks: dict[torch.fx.Node, int] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            masks[n] = 1 << len(masks)  # placeholders come first: each one's own bit
        elif not _reads_metadata_only(n):
            mask = 0
            for a in n.all_input_nodes:
                mask |= masks.get(a, 0)
            if mask:
                masks[n] = mask
    return masks


def dataflow(graph: torch.fx.Graph, masks: Mapping[torch.fx.Node, int]) -> nx.DiGraph:
    """The values of ``masks`` (those computed from the model's inputs), with an edge from each input
    of a value to the value, and one from ``SOURCE`` to each placeholder."""
    g = nx.DiGraph()
    g.add_node(SOURCE)
    for n in masks:
        if n.op == "placeholder":
            g.add_edge(SOURCE, n)
            continue
        for a in n.all_input_nodes:
            if a in masks:
                g.add_edge(a, n)
    return g


def main_input(masks: Mapping[torch.fx.Node, int], n: torch.fx.Node) -> int:
    """The bit of ``n``'s main input: the first of the forward's arguments it is computed from.

    From one join alone the main path and a conditioning path can look the same:
    ``relu(l1(h) + p(c))`` with ``h = relu(l0(x) + q(c))`` is, as a graph, a residual block of ``c``
    with ``x`` as its side input. The argument order breaks the tie, as every conditioned model
    orders it: ``forward(x, t)``, ``forward(sample, timestep, encoder_hidden_states)``,
    ``forward(input_ids, attention_mask)``, ``TransformerDecoder(tgt, memory)``.
    """
    mask = masks.get(n, 0)
    return mask & -mask


class MainFlow(NamedTuple):
    """The data flow of one input: the dominators of the values computed from it, and the values
    computed from the model's other inputs only (its conditioning)."""

    idom: Mapping[object, object]
    others: Collection[torch.fx.Node]


def main_flow(
    flow: nx.DiGraph, idom: Mapping[object, object], masks: Mapping[torch.fx.Node, int], bit: int
) -> MainFlow:
    """The :class:`MainFlow` of the input of ``bit``; ``idom``: the whole flow's dominators."""
    others = frozenset(n for n, mask in masks.items() if not mask & bit)
    if not others:  # the model's only input: its flow is the whole flow
        return MainFlow(idom, others)
    live = [n for n, mask in masks.items() if mask & bit]
    return MainFlow(nx.immediate_dominators(flow.subgraph([SOURCE, *live]), SOURCE), others)


def backward_walk(
    starts: list,
    stop: object,
    order: Mapping[object, int],
    weight: Callable[[torch.fx.Node], tuple[int, int, int]] | None = None,
    done: Callable[[list[int]], bool] | None = None,
    blocked: Collection[torch.fx.Node] = (),
) -> tuple[set, list[int]]:
    """Nodes on paths from ``stop`` (excluded) to ``starts`` (included), and their summed weights.

    With ``done``, the walk ends as soon as ``done(weights so far)`` holds: enough to tell a bypass
    from a branch without visiting the whole of a long branch (DenseNet's concatenations take
    every earlier layer's output, so full walks would cost the cube of a block's depth). The walk
    does not enter ``blocked`` (the values of other inputs: conditioning, not this path).
    """
    lo = order.get(stop, -1)
    seen = {n for n in starts if n is not stop}
    stack = list(seen)
    w = [0, 0, 0]
    if weight is not None:
        for n in seen:
            w = [a + b for a, b in zip(w, weight(n))]
    while stack and not (done is not None and done(w)):
        n = stack.pop()
        for a in n.all_input_nodes:
            if a is not stop and a not in seen and order.get(a, -1) > lo and a not in blocked:
                seen.add(a)
                stack.append(a)
                if weight is not None:
                    w = [x + y for x, y in zip(w, weight(a))]
    return seen, w


def latest_common_ancestor(
    operands: list, stop: object, order: Mapping[object, int], blocked: Collection[torch.fx.Node] = ()
) -> torch.fx.Node | None:
    """The latest node (in graph order; ``stop`` at the earliest) that every operand is computed from
    (an operand itself, where the other is computed from it), not counting ``blocked`` ones."""
    common: set | None = None
    for o in operands:
        seen, _ = backward_walk([o], stop, order, blocked=blocked)
        seen.add(stop)
        common = seen if common is None else common & seen
    return max(common or (), key=order.__getitem__, default=None)


def conditions(u: torch.fx.Node, cur: torch.fx.Node, masks: Mapping[torch.fx.Node, int]) -> bool:
    """``u`` adds to the main path's value ``cur``, or scales it by, a value computed from the model's
    other inputs only: conditioning (a time step's or a class embedding, FiLM's
    scale and shift), which a layer passes through to the activation after it, as
    ``act(lin(h) + cond(t))`` does. The main path is that of ``u``'s main input (``main_input``):
    from the conditioning's own layers (FiLM's ``sigmoid(film(c))``), the join is no follower."""
    found = merge_operands(u)
    if found is not None and found[0] == "add":
        ops = found[1]
    elif is_multiply(u):  # (FiLM's scale)
        ops = product_operands(u) or []
    else:
        return False
    if len(ops) != 2 or cur not in ops or ops[0] is ops[1]:
        return False
    other = ops[1] if ops[0] is cur else ops[0]
    bit, theirs = main_input(masks, u), masks.get(other, 0)
    return bool(bit and masks.get(cur, 0) & bit and theirs and not theirs & bit)
