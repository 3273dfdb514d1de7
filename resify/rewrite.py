"""Stage 4 of the pipeline: execute a Plan on the traced private copy and return the new GraphModule.

For each Site it inserts, right after the span's output, ``out = gate·F(x) + S(x)`` where S is
the identity or a learned projection (nn.Linear; or a 1×1 strided ConvNd, with a BatchNorm when
the span has one; where the span pools, an average pool, followed by a 1×1 ConvNd if the
channels change) and the gate, when asked for, is a learnable scalar (rezero) or per-channel
vector (layerscale). Everything new lives under the ``resify`` namespace, on the device and
dtype of the layer it bridges. Original layers keep their qualified names.
"""
from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from .analyze import NAMESPACE
from .errors import RewriteError
from .ops import data_input, layer_weight
from .planner import Plan, Site
from .trace import TensorInfo, Traced

__all__ = ["rewrite"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_BATCHNORM = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d, "BatchNorm3d": nn.BatchNorm3d}


def _container(gm: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` under gm, creating empty containers where missing."""
    mod: nn.Module = gm
    for atom in path.split("."):
        child = getattr(mod, atom, None)
        if child is None:
            child = nn.Module()
            child.training = gm.training
            mod.add_module(atom, child)
        elif not isinstance(child, nn.Module):
            raise RewriteError(
                f"cannot add shortcut modules under '{path}': the model already has a non-module "
                f"attribute '{atom}' there; rename it or exclude that layer"
            )
        mod = child
    return mod


def _projection(site: Site, factory: dict) -> list[tuple[str, nn.Module]]:
    cin, cout = site.channels
    if not site.stride:
        return [("proj", nn.Linear(cin, cout, bias=True, **factory))]
    mods: list[tuple[str, nn.Module]] = []
    if site.pool:  # ceil_mode: a last, partial window, as the span's own pooling may have
        mods.append(("pool", _AVGPOOL[len(site.stride)](site.stride, site.stride, ceil_mode=True)))
        if cin == cout:
            return mods
    stride = 1 if site.pool else site.stride
    mods.append(("proj", _CONV[len(site.stride)](cin, cout, kernel_size=1, stride=stride, bias=False, **factory)))
    if site.norm:
        mods.append(("norm", _BATCHNORM[site.norm](cout, **factory)))
    return mods


def _gate_parameter(site: Site, factory: dict) -> torch.Tensor:
    init = float(site.gate_init if site.gate_init is not None else 0.0)
    if site.gate == "rezero":
        return torch.full((), init, **factory)
    channels = site.channels[1]
    ones = (1,) * (len(site.out_shape) - 2) if site.channel_dim == 1 else ()
    return torch.full((channels, *ones), init, **factory)


def _insert_site(gm: nn.Module, graph: torch.fx.Graph, nodes: dict[str, torch.fx.Node], site: Site) -> None:
    try:
        anchor, exit = nodes[site.anchor], nodes[site.exit]
    except KeyError as e:
        raise RewriteError(f"the plan names node {e} that is not in this graph; make the plan from the same model") from e
    entry = data_input(anchor)
    weight = layer_weight(gm, anchor)
    factory = {"device": weight.device, "dtype": weight.dtype}
    prefix = f"{NAMESPACE}.{site.name}"
    info = TensorInfo(tuple(site.out_shape), weight.dtype)
    new: set[torch.fx.Node] = set()

    def made(n: torch.fx.Node) -> torch.fx.Node:
        n.meta["resify"] = info
        new.add(n)
        return n

    with graph.inserting_before(exit.next):
        shortcut = entry
        if site.kind == "projection":
            for attr, mod in _projection(site, factory):
                mod.train(gm.training)
                _container(gm, prefix).add_module(attr, mod)
                shortcut = made(graph.call_module(f"{prefix}.{attr}", (shortcut,)))
        if site.preserve_output:
            beta = nn.Parameter(torch.zeros((), **factory))
            _container(gm, prefix).register_parameter("beta", beta)
            b = graph.get_attr(f"{prefix}.beta")
            b.meta["resify"] = None
            new.add(b)
            shortcut = made(graph.call_function(operator.mul, (shortcut, b)))
        branch = exit
        if site.gate is not None:
            param = nn.Parameter(_gate_parameter(site, factory))
            attr = "alpha" if site.gate == "rezero" else "gamma"
            _container(gm, prefix).register_parameter(attr, param)
            scale = graph.get_attr(f"{prefix}.{attr}")
            scale.meta["resify"] = None
            new.add(scale)
            branch = made(graph.call_function(operator.mul, (exit, scale)))
        out = made(graph.call_function(operator.add, (branch, shortcut)))
    exit.replace_all_uses_with(out, delete_user_cb=lambda user: user not in new)


def _replace_module(gm: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    new.train(getattr(owner, attr).training)
    setattr(owner, attr, new)


@torch.no_grad()
def _widened_layer(m: nn.Module, extra: int) -> nn.Module:
    """A copy of Linear/ConvNd ``m`` taking ``extra`` more inputs first, with zero weights for them."""
    w = m.weight
    zeros = torch.zeros(w.shape[0], extra, *w.shape[2:], device=w.device, dtype=w.dtype)
    if isinstance(m, nn.Linear):
        new: nn.Module = nn.Linear(m.in_features + extra, m.out_features, bias=m.bias is not None,
                                   device=w.device, dtype=w.dtype)
    else:
        new = type(m)(m.in_channels + extra, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                      dilation=m.dilation, groups=1, bias=m.bias is not None, padding_mode=m.padding_mode,
                      device=w.device, dtype=w.dtype)
    new.weight.copy_(torch.cat([zeros, w], dim=1))
    if m.bias is not None:
        new.bias.copy_(m.bias)
    return new


def _insert_dense(gm: nn.Module, graph: torch.fx.Graph, nodes: dict[str, torch.fx.Node], site: Site) -> None:
    anchor, exit = nodes[site.anchor], nodes[site.exit]
    entry = data_input(anchor)
    new: set[torch.fx.Node] = set()
    shortcut = entry
    with graph.inserting_before(exit.next):
        if site.stride:
            pool = _AVGPOOL[len(site.stride)](kernel_size=site.stride, stride=site.stride, ceil_mode=True,
                                              count_include_pad=False)
            pool.train(gm.training)
            _container(gm, f"{NAMESPACE}.{site.name}").add_module("pool", pool)
            shortcut = graph.call_module(f"{NAMESPACE}.{site.name}.pool", (entry,))
            new.add(shortcut)
        cat = graph.call_function(torch.cat, ([shortcut, exit],), {"dim": site.channel_dim})
        cat.meta["resify"] = None
        new.add(cat)
    exit.replace_all_uses_with(cat, delete_user_cb=lambda user: user not in new)
    assert site.consumer is not None
    _replace_module(gm, site.consumer, _widened_layer(gm.get_submodule(site.consumer), site.extra_channels))


_LAZY_CLONE = getattr(torch, "_lazy_clone", None)


def _lazy_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that shares its memory until either side is written (copy-on-write, where
    this torch has it): converting costs no copy, and ``model = resify.apply(model)`` never copies."""
    t = t.detach()
    if _LAZY_CLONE is not None:
        try:
            return _LAZY_CLONE(t)
        except (RuntimeError, NotImplementedError):  # a storage that cannot be shared lazily: copy it now
            pass
    return t.clone()


def _own_tensors(root: nn.Module) -> None:
    """Give the private module tree its own parameters and buffers (tied weights stay tied)."""
    memo: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for m in root.modules():
            for key, p in m._parameters.items():
                if p is not None:
                    if id(p) not in memo:
                        memo[id(p)] = nn.Parameter(_lazy_copy(p), requires_grad=p.requires_grad)
                    m._parameters[key] = memo[id(p)]
            for key, b in m._buffers.items():
                if b is not None:
                    if id(b) not in memo:
                        memo[id(b)] = _lazy_copy(b)
                    m._buffers[key] = memo[id(b)]


def _copy_training_flags(gm: torch.fx.GraphModule, source: nn.Module) -> None:
    """Containers that GraphModule creates start in training mode; give each its source's flag."""
    flags = {name: m.training for name, m in source.named_modules()}
    for name, m in gm.named_modules():
        flag = flags.get(name, source.training)
        if m.training != flag:
            m.__dict__["training"] = flag  # a plain attribute: skip Module.__setattr__'s checks


def rewrite(traced: Traced, plan: Plan) -> torch.fx.GraphModule:
    """Insert the plan's shortcuts into the traced graph and return a new GraphModule.

    The result has its own parameters and buffers: training it never touches the user's model.

    Raises:
        RewriteError: the plan does not fit this graph, or the result fails ``graph.lint()``.
    """
    root, graph = traced.root, traced.graph
    _own_tensors(root)
    nodes = {n.name: n for n in graph.nodes}
    for site in plan.sites:
        (_insert_dense if site.kind == "dense" else _insert_site)(root, graph, nodes, site)
    try:
        graph.lint()
    except Exception as e:  # pragma: no cover - a bug in resify, not in the user's model
        raise RewriteError(f"the rewritten graph is invalid ({e}); please report this with the model") from e
    gm = torch.fx.GraphModule(root, graph, traced.model_class)
    _copy_training_flags(gm, root)
    gm.meta["resify_plan"] = plan
    return gm
