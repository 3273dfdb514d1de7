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
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..constants import NAMESPACE
from ..errors import RewriteError
from ..ops import data_input, layer_weight
from ..planning.sites import Dense, Plan, Projection, Site
from ..tracing.trace import TensorInfo, Traced
from .modules import GATE_PARAMETERS, DualGraphModule, Shortcut

__all__ = ["rewrite", "build_site", "insert_site", "own_tensors"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_BATCHNORM = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d, "BatchNorm3d": nn.BatchNorm3d}


def _container(gm: nn.Module, path: str, site: Site | None = None) -> nn.Module:
    """The module at ``path`` under gm, creating empty containers where missing (a Shortcut for a site)."""
    mod: nn.Module = gm
    atoms = path.split(".")
    for i, atom in enumerate(atoms):
        child = getattr(mod, atom, None)
        if child is None:
            last = i == len(atoms) - 1
            child = (
                Shortcut(site.gate_init if site is not None and site.gate else None) if last and site else nn.Module()
            )
            child.training = gm.training
            mod.add_module(atom, child)
        elif not isinstance(child, nn.Module):
            raise RewriteError(
                f"cannot add shortcut modules under '{path}': the model already has a non-module "
                f"attribute '{atom}' there; rename it or exclude that layer"
            )
        mod = child
    return mod


def _projection(form: Projection, factory: dict) -> list[tuple[str, nn.Module]]:
    """The shortcut's modules in the order they apply (the run-time pool is a graph op, not here)."""
    cin, cout = form.channels
    if form.op == "linear":
        return [("proj", nn.Linear(cin, cout, bias=True, **factory))]
    if form.op in ("pool", "pad"):
        return []
    stride: int | tuple[int, ...] = form.stride or 1
    conv = _CONV[form.dims](cin, cout, 1, stride=stride, groups=form.groups, bias=False, **factory)  # type: ignore[arg-type]
    mods: list[tuple[str, nn.Module]] = [("proj", conv)]
    if form.norm:
        mods.append(("norm", _BATCHNORM[form.norm](cout, **factory)))
    return mods


def _gate_parameter(site: Site, factory: dict) -> torch.Tensor:
    """α (rezero): shape (1,) — FSDP2 shards no scalar; γ (layerscale): one value per channel."""
    init = float(site.gate_init if site.gate_init is not None else 0.0)
    if site.gate == "rezero":
        return torch.full((1,), init, **factory)
    channels = site.out_shape[site.channel_dim]
    ones = (1,) * (len(site.out_shape) - 2) if site.channel_dim == 1 else ()
    return torch.full((channels, *ones), init, **factory)


def _site_factory(gm: nn.Module, nodes: dict[str, torch.fx.Node], site: Site) -> dict:
    """Device and dtype of the layer a site bridges; a RewriteError where the plan names a node this graph lacks."""
    try:
        anchor = nodes[site.anchor]
        nodes[site.exit]
    except KeyError as e:
        raise RewriteError(
            f"the plan names node {e} that is not in this graph; make the plan from the same model"
        ) from e
    weight = layer_weight(gm, anchor)
    return {"device": weight.device, "dtype": weight.dtype}


def build_site(gm: nn.Module, nodes: dict[str, torch.fx.Node], site: Site) -> None:
    """Create the site's modules and parameters under ``resify.<site>`` (once, whatever the graphs)."""
    factory = _site_factory(gm, nodes, site)
    form = site.shortcut
    if isinstance(form, Dense):
        _replace_module(gm, form.consumer, _widened_layer(gm.get_submodule(form.consumer), form.extra_channels))
        return
    modules = _projection(form, factory) if isinstance(form, Projection) else []
    if not modules and not site.preserve_output and site.gate is None:
        return  # an identity or a parameter-free pool: nothing to hold
    holder = _container(gm, f"{NAMESPACE}.{site.name}", site)
    for attr, mod in modules:
        mod.train(gm.training)
        holder.add_module(attr, mod)
    if site.preserve_output:
        holder.register_parameter("beta", nn.Parameter(torch.zeros((1,), **factory)))
    if site.gate is not None:
        holder.register_parameter(GATE_PARAMETERS[site.gate], nn.Parameter(_gate_parameter(site, factory)))


def _pool_to(
    graph: torch.fx.Graph, x: torch.fx.Node, like: torch.fx.Node, dims: int, up: bool = False
) -> torch.fx.Node:
    """Nodes that average-pool (``up``: upsample, nearest) ``x`` to ``like``'s spatial size, read at run time."""
    sizes = [graph.call_method("size", (like, d)) for d in range(2, 2 + dims)]
    for n in sizes:
        n.meta["resify"] = None
    if up:
        return graph.call_function(F.interpolate, (x,), {"size": sizes, "mode": "nearest"})
    return graph.call_function(_ADAPTIVE_AVG_POOL[dims], (x, sizes))


def _insert_site(gm: nn.Module, graph: torch.fx.Graph, nodes: dict[str, torch.fx.Node], site: Site) -> None:
    """Insert ``out = gate·F(x) + S(x)`` after the span's output in ``graph`` (modules already built)."""
    factory = _site_factory(gm, nodes, site)
    anchor, exit = nodes[site.anchor], nodes[site.exit]
    entry = data_input(anchor)
    prefix = f"{NAMESPACE}.{site.name}"
    holder = _submodule_or_none(gm, prefix)
    info = TensorInfo(tuple(site.out_shape), factory["dtype"])
    new: set[torch.fx.Node] = set()

    def made(n: torch.fx.Node, meta: TensorInfo | None = info) -> torch.fx.Node:
        n.meta["resify"] = meta
        new.add(n)
        new.update(n.all_input_nodes)
        new.discard(exit)
        new.discard(entry)
        return n

    dims = len(site.in_shape) - 2
    form = site.shortcut
    pool = isinstance(form, Projection) and form.pool
    pool_last = isinstance(form, Projection) and form.pool_last
    up = isinstance(form, Projection) and form.upsample
    with graph.inserting_before(exit.next):
        shortcut = entry
        if pool and not pool_last:
            shortcut = made(_pool_to(graph, shortcut, exit, dims, up))
        for attr in ("proj", "norm"):
            if holder is not None and attr in holder._modules:
                shortcut = made(graph.call_module(f"{prefix}.{attr}", (shortcut,)))
        if pool and pool_last:
            shortcut = made(_pool_to(graph, shortcut, exit, dims, up))
        if isinstance(form, Projection) and form.op == "pad":
            shortcut = _padded(graph, shortcut, form, site.channel_dim, made)
        if site.preserve_output:
            shortcut = made(graph.call_function(operator.mul, (shortcut, made(graph.get_attr(f"{prefix}.beta"), None))))
        branch = exit
        if site.gate is not None:
            scale = made(graph.get_attr(f"{prefix}.{GATE_PARAMETERS[site.gate]}"), None)
            branch = made(graph.call_function(operator.mul, (exit, scale)))
        out = made(graph.call_function(operator.add, (branch, shortcut)))
    exit.replace_all_uses_with(out, delete_user_cb=lambda user: user not in new)


def insert_site(gm: nn.Module, graph: torch.fx.Graph, nodes: dict[str, torch.fx.Node], site: Site) -> None:
    """Insert the site's shortcut into ``graph`` (its modules already built under ``gm`` by ``build_site``)."""
    (_insert_dense if site.kind == "dense" else _insert_site)(gm, graph, nodes, site)


def _padded(
    graph: torch.fx.Graph, x: torch.fx.Node, form: Projection, channel_dim: int, made: Callable
) -> torch.fx.Node:
    """Nodes for a parameter-free projection: the size strided, the channels zero-padded or sliced."""
    if form.stride and any(s > 1 for s in form.stride):  # a 1×1 conv of stride s keeps every s-th position
        index = (slice(None), slice(None), *(slice(None, None, s) for s in form.stride))
        x = made(graph.call_function(operator.getitem, (x, index)), None)
    cin, cout = form.channels
    if cout > cin:
        zeros = [0, 0] * (form.dims if channel_dim == 1 else 0) + [0, cout - cin]  # (last dim first)
        x = made(graph.call_function(F.pad, (x, zeros)))
    elif cout < cin:
        x = made(graph.call_method("narrow", (x, channel_dim, 0, cout)))
    return x


def _submodule_or_none(gm: nn.Module, path: str) -> nn.Module | None:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


def _replace_module(gm: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    new.train(getattr(owner, attr).training)
    setattr(owner, attr, new)


@torch.no_grad()
def _widened_layer(m: nn.Module, extra: int) -> nn.Module:
    """A copy of Linear/ConvNd ``m`` taking ``extra`` more inputs first, with zero weights for them."""
    assert isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))  # the planner widens only these
    w = m.weight
    zeros = torch.zeros(w.shape[0], extra, *w.shape[2:], device=w.device, dtype=w.dtype)
    if isinstance(m, nn.Linear):
        new: nn.Module = nn.Linear(
            m.in_features + extra, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype
        )
    else:
        new = type(m)(  # type: ignore[call-arg]
            m.in_channels + extra,
            m.out_channels,
            m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=1,
            bias=m.bias is not None,
            padding_mode=m.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
    new_weight, new_bias = new.weight, new.bias
    assert isinstance(new_weight, torch.Tensor)
    new_weight.copy_(torch.cat([zeros, w], dim=1))
    if m.bias is not None and isinstance(new_bias, torch.Tensor):
        new_bias.copy_(m.bias)
    return new


def _insert_dense(gm: nn.Module, graph: torch.fx.Graph, nodes: dict[str, torch.fx.Node], site: Site) -> None:
    """Insert ``cat([S(x), F(x)])`` after the span's output (the consumer is widened by ``build_site``)."""
    _site_factory(gm, nodes, site)
    anchor, exit = nodes[site.anchor], nodes[site.exit]
    entry = data_input(anchor)
    new: set[torch.fx.Node] = set()
    shortcut = entry
    with graph.inserting_before(exit.next):
        if isinstance(site.shortcut, Dense) and site.shortcut.pool:
            shortcut = _pool_to(graph, entry, exit, len(site.in_shape) - 2)
            new.update(shortcut.all_input_nodes)
            new.add(shortcut)
            new.discard(exit)
            new.discard(entry)
        cat = graph.call_function(torch.cat, ([shortcut, exit],), {"dim": site.channel_dim})
        cat.meta["resify"] = None
        new.add(cat)
    exit.replace_all_uses_with(cat, delete_user_cb=lambda user: user not in new)


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


def own_tensors(root: nn.Module) -> None:
    """Give the private module tree its own parameters and buffers (tied weights stay tied)."""
    memo: dict[int, Any] = {}  # id -> the copy (a Parameter for a parameter)
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


def _keep_aliases(gm: nn.Module, root: nn.Module) -> None:
    """Register a module the graph calls under every name the model gave it (CoaT's ``cpe1`` is also
    ``serial_blocks1.0.cpe``): GraphModule keeps only the name torch.fx called it by, and the
    user's state_dict keys would lose the others."""
    names: dict[int, list[str]] = {}
    for name, m in root.named_modules(remove_duplicate=False):
        if name:
            names.setdefault(id(m), []).append(name)
    kept = {id(m): m for _, m in gm.named_modules()}
    for key, paths in names.items():
        if len(paths) < 2 or key not in kept:
            continue
        for path in paths:
            parent, _, attr = path.rpartition(".")
            owner = _container(gm, parent) if parent else gm
            if owner._modules.get(attr) is None:
                owner._modules[attr] = kept[key]


def rewrite(traced: Traced, plan: Plan) -> torch.fx.GraphModule:
    """Insert the plan's shortcuts into the traced graph and return a new GraphModule.

    Where the model's forward reads ``self.training`` (the plan has ``other_mode_sites``), both
    modes' graphs get the same shortcuts, made of the same modules, and the result is a
    :class:`~resify.rewriting.modules.DualGraphModule` that switches graphs with ``train()``/``eval()``.
    The result has its own parameters and buffers: training it never touches the user's model.

    Raises:
        RewriteError: the plan does not fit this graph, or the result fails ``graph.lint()``.
    """
    root, graph = traced.root, traced.graph
    own_tensors(root)
    graphs = [(graph, plan.sites)]
    if traced.other_graph is not None:
        if plan.other_mode_sites is None:
            raise RewriteError(
                "the plan was made for one mode of a model whose forward reads self.training; "
                "make the plan with resify.plan on the same model"
            )
        graphs.append((traced.other_graph, plan.other_mode_sites))
    nodes = {n.name: n for n in graph.nodes}
    for site in plan.sites:
        build_site(root, nodes, site)
    for g, sites in graphs:
        nodes = {n.name: n for n in g.nodes}
        for site in sites:
            insert_site(root, g, nodes, site)
        try:
            g.lint()
        except Exception as e:  # pragma: no cover - a bug in resify, not in the user's model
            raise RewriteError(f"the rewritten graph is invalid ({e}); please report this with the model") from e
    if traced.other_graph is None:
        gm: torch.fx.GraphModule = torch.fx.GraphModule(root, graph, traced.model_class)
    else:
        train_graph, eval_graph = (graph, traced.other_graph) if traced.training else (traced.other_graph, graph)
        gm = DualGraphModule(root, train_graph, eval_graph, traced.model_class)
    _keep_aliases(gm, root)
    if NAMESPACE in root._modules and NAMESPACE in gm._modules:
        # GraphModule rebuilds the containers on the way to each target as plain nn.Modules:
        # put resify's own back (each Shortcut, with its reset_parameters)
        gm._modules[NAMESPACE] = root._modules[NAMESPACE]
    _copy_training_flags(gm, root)
    gm.meta["resify_plan"] = plan
    return gm
