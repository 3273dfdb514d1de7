"""Stage 4, in the user's model: carry out a plan inside a copy of the model, owner by owner.

The result is a copy of the user's model (same class, attributes, methods, hooks, modes; its own
tensors). For each owner of sites (the smallest module whose forward holds a span, see
``owners.py``) it traces that module on the inputs it received in one run of the example, finds each
of its sites again in that graph (by the site's layers, in order), builds the site's modules under
``<owner>.resify.<site>``, inserts the shortcuts, and installs the graph's code as that module's
forward (:class:`~resify.rewriting.modules.OwnerForward`, on the instance). Every other module runs its own
code: the owner's trace keeps whole each child that no span enters.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx
from torch import nn

from ..analysis.analyze import Analysis, analyze
from ..constants import NAMESPACE
from ..errors import RewriteError, TraceError
from ..formats import first_line
from ..ops import fetch
from ..planning.owners import aliases, qualified
from ..planning.sites import Dense, Plan, Site
from ..tracing.calls import Call, as_call, record_calls, record_calls_on_meta
from ..tracing.copying import structural_copy
from ..tracing.trace import Traced, trace
from ..tracing.units import relative_leaves
from .modules import OwnerForward, call_key, graph_code, install_forward
from .rewrite import build_site, insert_site, own_tensors

__all__ = ["install", "applied_plan", "example_spec", "PLAN_ATTRIBUTE", "EXAMPLE_ATTRIBUTE"]

#: The attribute of a converted model that holds the plan carried out (``resify.applied_plan``).
PLAN_ATTRIBUTE = "resify_plan"
#: ... and the one that holds the example input's shapes and dtypes (``resify.save`` writes them).
EXAMPLE_ATTRIBUTE = "resify_example"


def example_spec(inputs: Sequence[Any]) -> list[dict[str, Any]]:
    """The shape and dtype of each tensor input (what ``resify.load`` rebuilds an example from)."""
    return [
        {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for t in inputs
        if isinstance(t, torch.Tensor)
    ]


def applied_plan(model: nn.Module) -> Plan | None:
    """The plan ``resify.apply`` carried out on ``model`` (None for a model resify did not convert)."""
    found = model.__dict__.get(PLAN_ATTRIBUTE)
    meta = model.__dict__.get("meta")
    if found is None and isinstance(meta, dict):  # apply(..., graph_module=True): a GraphModule's meta
        found = meta.get("resify_plan")
    return found if isinstance(found, Plan) else None


def _relative(owner: str, name: str) -> str:
    if not owner:
        return name
    return name[len(owner) + 1 :] if name.startswith(owner + ".") else name


def _touched(sites: Sequence[Site], also: dict[str, set[str]]) -> set[str]:
    names = {n for s in sites for n in s.layers}
    names |= {s.shortcut.consumer for s in sites if isinstance(s.shortcut, Dense)}
    return {a for n in names for a in also.get(n, {n})}


def _untouched_subtrees(module: nn.Module, owner: str, touched: set[str]) -> list[str]:
    """The largest submodules of ``module`` (names relative to it) that hold no layer of its sites:
    traced as leaves, they run their own forward."""
    inside = {_relative(owner, n) for n in touched}
    out: list[str] = []

    def visit(m: nn.Module, path: str) -> None:
        for name, child in m.named_children():
            cpath = f"{path}.{name}" if path else name
            if name == NAMESPACE:
                out.append(cpath)
            elif any(t == cpath or t.startswith(cpath + ".") for t in inside):
                visit(child, cpath)
            else:
                out.append(cpath)

    visit(module, "")
    return out


class _NeedsValues(Exception):
    """The owner's trace read the input's values: it must see the example's own."""


@dataclass
class _Maker:
    """Traces an owner and inserts its sites: at install, and again for a call whose optional
    arguments the first trace specialised (``OwnerForward`` calls it then)."""

    owner: str  # qualified name in the model
    sites: tuple[Site, ...]  # names qualified in the model
    leaves: tuple[type | str, ...]  # relative to the owner
    also: dict[str, set[str]]  # module name -> all its names in the model
    checked: bool = False  # record shapes and check each site's widths (a plan made for another model)

    def traced(self, module: nn.Module, call: Call) -> tuple[Traced, list[tuple[torch.fx.Graph, list[Site]]]]:
        try:
            traced = trace(
                module,
                call.args,
                example_kwargs=call.kwargs,
                leaf_modules=self.leaves,
                original=True,
                shapes=self.checked,
            )
        except TraceError as e:
            raise RewriteError(
                f"could not trace '{self.owner or 'the root'}' to put its shortcuts in: {first_line(e)}"
            ) from e
        graphs = [(traced.graph, self._mapped(traced))]
        other = traced.other_mode()
        if other is not None:
            graphs.append((other.graph, self._mapped(other)))
        return traced, graphs

    def _mapped(self, traced: Traced) -> list[Site]:
        analysis = analyze(traced)
        out = []
        for site in self.sites:
            found = find_site(site, analysis, self.owner, self.also)
            if isinstance(found, str):
                raise RewriteError(found)
            out.append(replace(found, layers=site.layers))
        return out

    def build(self, module: nn.Module, call: Call, modules: bool, values: bool = True) -> dict[bool, tuple[str, str]]:
        """Trace the owner, insert the sites (building their modules first if ``modules``), and
        return the source of its forward per mode. ``values``: the call holds the example's values
        (else zeros of their shapes: a trace that specialised on values raises _NeedsValues)."""
        traced, graphs = self.traced(module, call)
        if not values and traced.tracer == "concrete":
            raise _NeedsValues
        if modules:
            nodes = {n.name: n for n in graphs[0][0].nodes}
            for site in graphs[0][1]:
                build_site(module, nodes, site)
        codes: dict[bool, tuple[str, str]] = {}
        for k, (graph, sites) in enumerate(graphs):
            nodes = {n.name: n for n in graph.nodes}
            for site in sites:
                insert_site(module, graph, nodes, site)
            try:
                graph.lint()
            except Exception as e:  # pragma: no cover - a bug in resify, not in the user's model
                raise RewriteError(f"the rewritten graph is invalid ({e}); please report this with the model") from e
            _copy_constants(traced.root, module, graph)
            codes[traced.training if k == 0 else not traced.training] = graph_code(graph)
        return codes

    def __call__(self, owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[bool, tuple[str, str]]:
        return self.build(owner, as_call(owner, args, kwargs), modules=False)


def find_site(site: Site, analysis: Analysis, owner: str, also: dict[str, set[str]] | None = None) -> Site | str:
    """``site`` with the anchor and exit nodes of ``analysis``'s graph (of the module at ``owner``),
    or why it is not there (the layers missing, in another order, or of another width). ``also``:
    each module name's other names (a layer is found under any of them)."""
    layers = analysis.layers
    also = also or {}
    wanted = {n: min(also.get(n, {n})) for n in site.layers}
    names = [qualified(owner, layer.name) for layer in layers]
    names = [min(also.get(n, {n})) for n in names]
    site = replace(site, layers=tuple(wanted[n] for n in site.layers))
    k = len(site.layers)
    where = f"'{owner}'" if owner else "the model"
    for i in range(len(names) - k + 1):
        if tuple(names[i : i + k]) != site.layers:
            continue
        first, last = layers[i], layers[i + k - 1]
        for layer, shape, side in ((first, site.in_shape, "input"), (last, site.out_shape, "output")):
            info = layer.in_info if side == "input" else layer.out_info
            c = site.channel_dim
            if (
                info is not None
                and shape
                and info.shape
                and len(info.shape) == len(shape)
                and info.shape[c] != shape[c]
            ):
                return (
                    f"the plan's site at '{site.start}' expects {shape[c]} {side} channels at "
                    f"'{qualified(owner, layer.name)}', found {info.shape[c]}; make the plan from this model"
                )
        nodes = [n for layer in layers[i : i + k] for n in layer.nodes]
        if site.exit_step == 0:  # a schema 1 or 2 plan: node names of the whole model's graph
            if site.exit not in nodes:
                return f"the plan's site at '{site.start}' ends at node '{site.exit}', not found in {where}"
            exit = site.exit
        elif -site.exit_step > len(nodes):
            return (
                f"the plan's site at '{site.start}' ends outside its layers in {where}; make the plan from this model"
            )
        else:
            exit = nodes[site.exit_step]
        shortcut = site.shortcut
        if isinstance(shortcut, Dense):
            shortcut = replace(shortcut, consumer=_relative(owner, shortcut.consumer))
        return replace(site, anchor=first.anchor, exit=exit, shortcut=shortcut)
    missing = [n for n in site.layers if n not in names]
    if missing:
        return (
            f"the plan's site at '{site.start}' needs layer '{missing[0]}', which {where} does not run "
            "as a layer; make the plan from this model (resify.plan) or pass the model the plan was made for"
        )
    return (
        f"the plan's site at '{site.start}' needs the layers {', '.join(site.layers)} to run one after the "
        f"other, and in {where} they do not; make the plan from this model"
    )


def _copy_constants(source: nn.Module, module: nn.Module, graph: torch.fx.Graph) -> None:
    """Attributes the tracer set on its copy (tensor constants) that the graph reads: onto the module."""
    for n in graph.nodes:
        if n.op != "get_attr":
            continue
        target = str(n.target)
        try:
            fetch(module, target)
        except AttributeError:
            parent, _, attr = target.rpartition(".")
            value = fetch(source, target)
            holder = module.get_submodule(parent) if parent else module
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                holder.register_buffer(attr, value, persistent=False)
            else:
                setattr(holder, attr, value)


def _owners(plan: Plan) -> dict[str, list[Site]]:
    by_owner: dict[str, list[Site]] = {}
    for site in plan.sites:
        by_owner.setdefault(site.owner, []).append(site)
    return by_owner


def install(
    model: nn.Module,
    plan: Plan,
    inputs: tuple[Any, ...],
    kwargs: dict[str, Any],
    leaf_modules: Sequence[type | str] = (),
    recorded: dict[str, Call] | None = None,
    graph: torch.fx.Graph | None = None,
    checked: bool = False,
) -> nn.Module:
    """A copy of ``model`` with ``plan``'s shortcuts in the forwards of their owners. ``recorded``:
    what each module received in a run of the example on ``model`` (planning's, where it ran one);
    ``graph``: the whole model's traced graph, where planning traced it (owners' inputs read off it);
    ``checked``: check each site's widths against the model (a saved plan, not one made from it).

    Raises:
        RewriteError: the plan does not fit this model (the message names the first mismatch).
    """
    result = structural_copy(model)
    own_tensors(result)
    by_owner = _owners(plan)
    also = aliases(result)
    names = dict(result.named_modules())
    for owner in by_owner:
        if owner not in names:
            raise RewriteError(
                f"the plan puts shortcuts in '{owner}', which {type(model).__name__} does not have; "
                "make the plan from this model"
            )
    calls: dict[str, Call] = {"": as_call(result, inputs, kwargs)}
    deeper = set(by_owner) - {""}
    valued = {""}  # owners whose recorded inputs hold the example's values (not only its shapes)
    if deeper and recorded and deeper <= set(recorded):  # the same weights: the same inputs
        calls.update({k: v for k, v in recorded.items() if k})
        valued |= deeper
    elif deeper:
        if graph is not None:
            calls.update(calls_from_graph(graph, result, deeper))
        rest = deeper - set(calls)
        on_meta = record_calls_on_meta(result, inputs, kwargs, rest) if rest else {}
        if on_meta is None:
            calls.update(record_calls(result, inputs, kwargs, rest))
            valued |= rest
        else:
            calls.update(on_meta)
    for owner in sorted(by_owner, key=lambda p: p.count(".") + bool(p), reverse=True):  # deepest first
        module = names[owner]
        call = calls.get(owner)
        if call is None:
            raise RewriteError(
                f"the example run did not call '{owner}', which owns shortcuts in the plan; "
                "pass the example input the plan was made with"
            )
        sites = tuple(by_owner[owner])
        user_leaves = tuple(relative_leaves(leaf_modules, owner))
        codes = None
        errors = []
        # the second way is made only where the first fails (every owner's name: long in a deep net)
        ways = (
            functools.partial(_untouched_subtrees, module, owner, _touched(sites, also)),
            functools.partial(_nested, owner, by_owner),
        )
        for way in ways:
            maker = _Maker(owner, sites, user_leaves + tuple(way()), also, checked)
            try:
                codes = maker.build(module, call, modules=True, values=owner in valued)
                break
            except _NeedsValues:  # traced on the example's values, not on tensors of its shapes: run it
                calls.update(record_calls(result, inputs, kwargs, {owner}))
                valued.add(owner)
                codes = maker.build(module, calls[owner], modules=True, values=True)
                break
            except RewriteError as e:  # raised before anything is built: try the next way to trace it
                errors.append(e)
        if codes is None:
            raise errors[-1]
        install_forward(module, OwnerForward({call_key(call.args, call.kwargs): codes}, maker))
    result.__dict__[PLAN_ATTRIBUTE] = plan
    result.__dict__[EXAMPLE_ATTRIBUTE] = example_spec(inputs)
    return result


def calls_from_graph(graph: torch.fx.Graph, model: nn.Module, owners: set[str]) -> dict[str, Call]:
    """What each owner of one tensor input receives, read off the whole model's traced graph (the
    shape and dtype torch.fx recorded for the one value its ops read from outside it): no run. An
    owner called twice, or taking more than one value, is left out (its inputs are recorded)."""
    modules = dict(model.named_modules())
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None and first.device.type != "meta" else torch.device("cpu")
    regions: dict[str, list[torch.fx.Node]] = {o: [] for o in owners}
    for n in graph.nodes:
        for path, _ in (n.meta.get("nn_module_stack") or {}).values():
            if path in regions:
                regions[str(path)].append(n)
    out: dict[str, Call] = {}
    for owner, nodes in regions.items():
        if not nodes or not _one_tensor_input(modules[owner]):
            continue
        inside = set(nodes)
        outside = list(
            dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr")
        )
        info = outside[0].meta.get("resify") if len(outside) == 1 else None
        if info is not None and hasattr(info, "shape"):
            out[owner] = Call((torch.empty(info.shape, dtype=info.dtype, device=device),), {})
    return out


def _one_tensor_input(module: nn.Module) -> bool:
    """True where forward takes one input (by position) and every other parameter has a default."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    P = inspect.Parameter
    required = [p for p in params if p.default is P.empty and p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)]
    return len(required) == 1 and required[0].kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)


def _nested(owner: str, by_owner: dict[str, list[Site]]) -> list[str]:
    """Other owners inside ``owner`` (names relative to it): leaves of its trace, with forwards of their own."""
    return [_relative(owner, o) for o in by_owner if o != owner and (not owner or o.startswith(owner + "."))]
