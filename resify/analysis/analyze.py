"""Stage 2 of the pipeline: graph facts about a traced model.

From the traced GraphModule, ``analyze`` finds the layers (a parametric op plus the activation,
norm, dropout and pooling ops that follow it), the shortcuts the model already has (an add or
concat one of whose operands bypasses the layers the other goes through, judged on the flow of the
join's main input: see ``dataflow``), the values computed only to gate another (``gates``), and
answers, for any run of consecutive layers, whether it is a single-entry single-exit region of the
data-flow graph (dominators and post-dominators computed once with networkx). It changes nothing.
"""

from __future__ import annotations

import bisect
import functools
import operator
from dataclasses import dataclass, field

import networkx as nx
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..constants import NAMESPACE
from ..ops import (
    TUPLE_LAYER_MODULES,
    WIDENABLE_MODULES,
    called_module,
    data_input,
    describe,
    follower_role,
    is_elementwise,
    is_layer_node,
    is_nonlinear,
    layer_kind,
    layer_name,
    merge_operands,
)
from ..tracing.trace import TensorInfo, Traced
from .dataflow import (
    SOURCE,
    MainFlow,
    backward_walk,
    conditions,
    dataflow,
    input_masks,
    latest_common_ancestor,
    main_flow,
    main_input,
)
from .gates import gate_branches

__all__ = ["Layer", "ExistingShortcut", "Analysis", "analyze"]


@dataclass(frozen=True)
class Layer:
    """A parametric op and the parameter-free or normalising ops that follow it."""

    name: str  # qualified module name of the parametric op, e.g. "layers.0.0"
    kind: str  # "Linear", "Conv2d", …
    anchor: str  # fx node name of the parametric op
    output: str  # fx node name of the layer's last op
    roles: tuple[str, ...]  # roles of the ops that follow: "activation", "norm", …
    nodes: tuple[str, ...]  # fx node names of the parametric op and its followers
    in_info: TensorInfo | None
    out_info: TensorInfo | None


@dataclass(frozen=True)
class ExistingShortcut:
    """A shortcut the model already has: an add or concat whose one operand bypasses layers."""

    kind: str  # "add" or "concat"
    node: str  # fx node name of the merge
    start: str  # first layer (or parametric module) inside the bypassed region
    end: str  # last one
    bypass: (
        str  # "identity" (the input itself), "projection" (one layer, no activation) or "parameter-free" (pooling, …)
    )
    layers: tuple[str, ...]  # names of the resify layers inside the region

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "node": self.node,
            "start": self.start,
            "end": self.end,
            "bypass": self.bypass,
            "layers": list(self.layers),
        }


@dataclass
class Analysis:
    """What the analyze stage found; ``span_problem`` answers region questions."""

    traced: Traced
    layers: list[Layer]
    existing: list[ExistingShortcut]
    inside_existing: dict[str, str]  # layer name -> merge node of the shortcut it sits in
    gated: dict[str, str] = field(default_factory=dict)  # fx node computed only to gate -> the product it gates
    _order: dict = field(repr=False, default_factory=dict)
    _idom: dict = field(repr=False, default_factory=dict)
    _ipdom: dict = field(repr=False, default_factory=dict)
    _merges: list = field(repr=False, default_factory=list)
    _flow: nx.DiGraph = field(repr=False, default_factory=nx.DiGraph)
    _masks: dict = field(repr=False, default_factory=dict)
    _flows: dict = field(repr=False, default_factory=dict)  # main input's bit -> its MainFlow (main_flow, cached)

    @property
    def module(self) -> nn.Module:
        return self.traced.root

    def node(self, name: str) -> torch.fx.Node:
        return self._nodes[name]

    def __post_init__(self) -> None:
        self._nodes = {n.name: n for n in self.traced.graph.nodes}
        self._layer_at = {layer.anchor: i for i, layer in enumerate(self.layers)}

    def layer_at(self, anchor: str) -> int | None:
        """The index in ``layers`` of the layer whose parametric op is the node ``anchor`` (None: none is)."""
        return self._layer_at.get(anchor)

    def has_batchnorm(self, layer: Layer) -> bool:
        """True when one of the layer's ops is a batch norm (a conv projection then gets one too)."""
        for name in layer.nodes:
            n = self._nodes[name]
            if n.op == "call_module" and isinstance(self.module.get_submodule(n.target), _BatchNorm):
                return True
            if n.op == "call_function" and n.target is F.batch_norm:
                return True
        return False

    def stem_input(self, layer: Layer) -> str | None:
        """The model's input that ``layer`` maps into the network's width, where it is the stem of a
        residual network: a convolution that reads the input (perhaps normalised by element-wise ops
        first) and changes its channels (an image's 3, a signal's 1), in a network that already has
        shortcuts; else None.

        A shortcut around a stem is a 1×1 projection of raw pixels beside it. Where the rest of the
        network already has its shortcuts (ResNet, MobileNetV2, DenseNet, ViT), the stem is the layer
        left over and an expert leaves it alone. Where there are none (VGG, a DCGAN, an autoencoder),
        resify makes the whole network residual and the first layer gets its shortcut like every
        other, as in the seed's ImprovedResidualNetwork, whose first projection is of the input; an
        MLP's first Linear (the seed's) is never a stem.
        """
        src, dst = layer.in_info, layer.out_info
        if not self.existing or not layer.kind.startswith("Conv") or src is None or dst is None:
            return None
        if len(src.shape) < 2 or len(dst.shape) < 2 or src.shape[1] == dst.shape[1]:
            return None
        x = data_input(self._nodes[layer.anchor])
        while isinstance(x, torch.fx.Node) and x.op != "placeholder" and is_elementwise(x):
            x = data_input(x)  # (x - mean) / std
        return x.name if isinstance(x, torch.fx.Node) and x.op == "placeholder" else None

    def taken_names(self) -> list[str]:
        """Names already used under the resify namespace (when resify is applied to its own output)."""
        try:
            ns = self.module.get_submodule(NAMESPACE)
        except AttributeError:
            return []
        return [name for name, _ in ns.named_children()] + [name for name, _ in ns.named_parameters(recurse=False)]

    def dense_consumer(self, exit: torch.fx.Node, channel_dim: int) -> tuple[str, int] | str:
        """The layer that consumes ``exit`` and can be widened, or why not.

        A span ends after the norms and activations that follow its last layer, so what consumes its
        output is the next layer itself (or a reshape, the output, … which cannot be widened).
        Returns (consumer module name, consumer parameters per input channel).
        """
        gm, n = self.module, exit
        users = list(n.users)
        if len(users) != 1:
            return f"the span's output is used in {len(users)} places; only a single consumer can be widened"
        u = users[0]
        if u.op == "output":
            return "the span's output is the model's output: there is no layer to widen"
        m = gm.get_submodule(str(u.target)) if u.op == "call_module" else None
        if isinstance(m, WIDENABLE_MODULES) and data_input(u) is n:
            if isinstance(m, nn.Linear):
                if channel_dim != -1:
                    return f"the consumer '{u.target}' is a Linear but the span has channels first"
                return str(u.target), m.out_features
            assert isinstance(m, nn.modules.conv._ConvNd)
            if m.groups != 1:
                return f"the consumer '{u.target}' is a grouped convolution (groups={m.groups}); cannot widen it"
            if channel_dim != 1:
                return f"the consumer '{u.target}' is a convolution but the span has channels last"
            return str(u.target), m.out_channels * int(m.weight[0, 0].numel())
        return f"the span's output goes to {describe(gm, u)}, which resify cannot widen"

    def span_problem(self, entry: object, exit: torch.fx.Node) -> str | None:
        """Why the region from ``entry`` (the span's input) to ``exit`` cannot take a shortcut; None if it can."""
        if not isinstance(entry, torch.fx.Node) or entry not in self._idom:
            return "the span's input is a constant, not a value computed from the model's input"
        if exit not in self._ipdom:
            return "the span's result does not reach the model's output"
        lo, hi = self._order[entry], self._order[exit]
        # judged on the flow of the result's main input: a value of another input that joins the span
        # (a time step's embedding, FiLM's scale) conditions it; it is not a second way in (and a
        # span that starts on another input than its result's main one has no single entry)
        idom = self.main_flow(exit).idom
        at: object = exit
        while at is not entry and at in idom and self._order.get(at, -1) > lo:
            at = idom[at]
        if at is not entry:
            joiner = self._first_outside_input(entry, exit)
            return f"another value ({joiner}) joins the span between its input and output: not single-entry single-exit"
        n = entry
        while n is not exit and n in self._ipdom and self._order[n] < hi:
            n = self._ipdom[n]
        if n is not exit:
            return f"{self._escaping_value(entry, exit)}: not single-entry single-exit"
        # merges are in graph order: the first one after the entry is the only one to check
        i = bisect.bisect_right(self._merges, lo, key=self._order.__getitem__)
        if i < len(self._merges) and self._order[self._merges[i]] <= hi:
            return f"the span would enclose the existing shortcut at '{self._merges[i].name}'"
        return None

    def main_flow(self, n: torch.fx.Node) -> MainFlow:
        """The data flow of ``n``'s main input (``dataflow.main_flow``, computed once per input)."""
        bit = main_input(self._masks, n)
        if bit not in self._flows:
            self._flows[bit] = main_flow(self._flow, self._idom, self._masks, bit)
        return self._flows[bit]

    def _region(self, entry: torch.fx.Node, exit: torch.fx.Node) -> list[torch.fx.Node]:
        lo, hi = self._order[entry], self._order[exit]
        seen, stack = {entry}, [entry]
        while stack:
            n = stack.pop()
            for u in n.users:
                if u not in seen and lo < self._order.get(u, hi + 1) <= hi:
                    seen.add(u)
                    stack.append(u)
        return sorted(seen, key=self._order.__getitem__)

    def _first_outside_input(self, entry: torch.fx.Node, exit: torch.fx.Node) -> str:
        region = set(self._region(entry, exit))
        for n in sorted(region - {entry}, key=self._order.__getitem__):  # (the entry's own inputs do not join)
            for a in n.all_input_nodes:
                if a not in region and a in self._order:
                    return f"'{a.name}' into '{n.name}'"
        return "a value from outside"

    def _escaping_value(self, entry: torch.fx.Node, exit: torch.fx.Node) -> str:
        region = self._region(entry, exit)
        inside = set(region)
        for n in region:
            if n is exit:
                continue
            for u in n.users:
                if u not in inside:
                    return f"'{n.name}' is also used by '{u.name}' outside the span"
        return "a value inside the span is also used outside it"


def _find_layers(traced: Traced, masks: dict[torch.fx.Node, int]) -> list[Layer]:
    gm = traced.root
    layers = []
    for n in traced.graph.nodes:
        if not is_layer_node(gm, n) or NAMESPACE in layer_name(n).split("."):
            continue  # resify's own projections are shortcuts, not layers
        cur, roles, chain = n, [], [n.name]
        if isinstance(called_module(gm, n), TUPLE_LAYER_MODULES):
            first = [u for u in n.users if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0]
            if len(first) != 1:
                continue  # the output tuple is used whole (or not at all): no single value to bridge
            cur = first[0]  # out, state = lstm(x): the layer's value is `out`
            roles.append("select")
            chain.append(cur.name)
        while True:
            if len(cur.users) == 1:
                (u,) = cur.users
                role = follower_role(gm, u)
                if role is not None and data_input(u) is cur and not is_layer_node(gm, u):
                    roles.append(role)
                    chain.append(u.name)
                    cur = u
                    continue
                if conditions(u, cur, masks):
                    roles.append("condition")
                    chain.append(u.name)
                    cur = u
                    continue
            region = _function_activation(cur)
            if not region:
                break
            roles.append("activation")
            chain += [r.name for r in region]
            cur = region[-1]
        x = data_input(n)
        layers.append(
            Layer(
                name=layer_name(n),
                kind=layer_kind(gm, n),
                anchor=n.name,
                output=cur.name,
                roles=tuple(roles),
                nodes=tuple(chain),
                in_info=x.meta.get("resify") if isinstance(x, torch.fx.Node) else None,
                out_info=cur.meta.get("resify"),
            )
        )
    return layers


_MAX_FUNCTION_OPS = 8  # the longest activation written as element-wise ops that is recognised


def _function_activation(start: torch.fx.Node) -> list[torch.fx.Node]:
    """Element-wise ops after ``start`` that only it feeds and that end in one value: an activation
    written as a Python function (``x * torch.sigmoid(x)``, ``x * torch.tanh(F.softplus(x))``).

    Returns the ops in graph order, the last one being the activation's output; empty when the ops
    that follow are not such a closed, nonlinear group.
    """
    region: list[torch.fx.Node] = []
    inside = {start}
    best: list[torch.fx.Node] = []
    n = start.next
    while n.op != "output" and len(region) < _MAX_FUNCTION_OPS:
        if n.all_input_nodes and all(a in inside for a in n.all_input_nodes) and is_elementwise(n):
            region.append(n)
            inside.add(n)
            # closed: every value but the last is used inside the group only
            if all(all(u in inside for u in r.users) for r in (start, *region[:-1])) and any(
                is_nonlinear(r) for r in region
            ):
                best = list(region)
        elif any(a in inside for a in n.all_input_nodes):
            break  # a value of the group goes to something else: the group ends here
        n = n.next
    return best


def _weight(gm: torch.fx.GraphModule, n: torch.fx.Node, anchors: set) -> tuple[int, int, int]:
    """(layers, parametric modules, activations) of one node, to compare merge operands."""
    if n in anchors:
        return 1, 1, 0
    act = 1 if follower_role(gm, n) == "activation" else 0
    params = 0
    if n.op == "call_module":
        params = int(any(True for _ in gm.get_submodule(str(n.target)).parameters()))
    return 0, params, act


def _find_existing(
    gm, graph, order, flow, idom, masks, layers, flows: dict[int, MainFlow]
) -> tuple[list[ExistingShortcut], dict[str, str], list]:
    anchors = {n for n in graph.nodes if is_layer_node(gm, n)}
    layer_by_anchor = {layer.anchor: layer for layer in layers}
    existing: list[ExistingShortcut] = []
    inside: dict[str, str] = {}
    merges: list = []
    weight = functools.lru_cache(maxsize=None)(lambda n: _weight(gm, n, anchors))  # once per node
    not_a_bypass = lambda w: w[2] > 0 or w[0] > 1
    for m in graph.nodes:
        found = merge_operands(m)
        if found is None or m not in idom:
            continue
        kind, operands = found
        bit = main_input(masks, m)
        if bit not in flows:
            flows[bit] = main_flow(flow, idom, masks, bit)
        main = flows[bit]
        # judged on the flow of the join's main input: a value of the model's other inputs only (a
        # time or class embedding, FiLM's shift, a context) or of parameters joins the main path as
        # conditioning, not as a second path of its signal
        operands = [o for o in operands if o in main.idom]
        if len(operands) < 2:
            continue
        # side inputs that join a branch (RoPE's cos/sin, a shared mask) move the immediate dominator
        # above the value that forks; the fork is the latest value both operands are computed from
        # (where the dominator is an operand, every operand is computed from it: it is the fork)
        dom = main.idom[m]
        fork = dom if dom in operands else latest_common_ancestor(operands, dom, order, main.others)
        if not isinstance(fork, torch.fx.Node):
            continue  # the operands come from separate inputs: a join of inputs, not a shortcut
        walk = functools.partial(backward_walk, stop=fork, order=order, blocked=main.others)
        walks = [walk([o], weight=weight, done=not_a_bypass) for o in operands]
        bypass = [i for i, (_, w) in enumerate(walks) if not not_a_bypass(w)]
        if not bypass:
            continue
        b = min(bypass, key=lambda i: sum(walks[i][1]))
        light = sum(walks[b][1])
        heavy = lambda w, light=light: (w[0] + w[1]) > 0 and sum(w) > light
        if not any(heavy(walk([o], weight=weight, done=heavy)[1]) for i, o in enumerate(operands) if i != b):
            continue
        region, _ = walk(operands)
        members = sorted((n for n in region if n in anchors or weight(n)[1]), key=order.__getitem__)
        bypass_nodes, bypass_weight = walks[b]
        # start and end name the branch the shortcut goes around, not its bypass (a downsample)
        branch = [n for n in members if n not in bypass_nodes] or members
        names = [
            layer_by_anchor[n.name].name if n.name in layer_by_anchor else str(n.target)
            for n in branch
            if NAMESPACE not in str(n.target).split(".")
        ] or [m.name]
        inner = tuple(layer_by_anchor[n.name].name for n in members if n.name in layer_by_anchor)
        for name in inner:
            inside.setdefault(name, m.name)
        merges.append(m)
        existing.append(
            ExistingShortcut(
                kind=kind,
                node=m.name,
                start=names[0],
                end=names[-1],
                bypass="identity" if not bypass_nodes else "projection" if bypass_weight[0] else "parameter-free",
                layers=inner,
            )
        )
    return existing, inside, merges


def analyze(traced: Traced) -> Analysis:
    """Find layers, existing shortcuts and the dominator trees of a traced model."""
    gm = traced.root
    graph = traced.graph
    order: dict = {n: i for i, n in enumerate(graph.nodes)}
    order[SOURCE] = -1
    masks = input_masks(graph)
    flow = dataflow(graph, masks)
    idom = nx.immediate_dominators(flow, SOURCE)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    ipdom = nx.immediate_dominators(flow.reverse(copy=False), output) if output in flow else {}
    layers = _find_layers(traced, masks)
    flows: dict[int, MainFlow] = {}
    existing, inside, merges = _find_existing(gm, graph, order, flow, idom, masks, layers, flows)
    gated = gate_branches(gm, graph, ipdom, masks, order)
    return Analysis(traced, layers, existing, inside, gated, order, idom, ipdom, merges, flow, masks, flows)
