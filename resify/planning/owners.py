"""Stage 3, across modules: who owns each site, and one plan for a model planned in units.

A site's owner is the smallest module whose forward contains the whole span (every op of its
layers, its exit and, for a dense site, the layer it widens), read from the ``nn_module_stack``
torch.fx records on each node. ``place`` fills in each site's ``owner`` and ``exit_step`` (where the
span's output is among its layers' ops, so that the site can be found again in the owner's own
graph) and makes every name relative to the model's root; ``merge`` joins the units' plans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch.fx
from torch import nn

from ..analysis.analyze import Analysis, ExistingShortcut
from ..constants import NAMESPACE
from ..errors import PlanError
from ..tracing.units import WholeModule
from .policy import Policy
from .sites import Dense, Plan, Site, Skipped

__all__ = ["place", "settle", "merge", "qualified", "span_nodes", "aliases"]


def qualified(prefix: str, name: str) -> str:
    """``name`` (relative to the module at ``prefix``) relative to the root."""
    if not prefix:
        return name
    return f"{prefix}.{name}" if name else prefix


def _relative(prefix: str, name: str) -> str:
    if not prefix:
        return name
    if name == prefix:
        return ""
    if not name.startswith(prefix + "."):
        raise PlanError(f"'{name}' is not inside '{prefix}'")
    return name[len(prefix) + 1 :]


def _stack(n: torch.fx.Node) -> list[str]:
    """The modules whose forward ``n`` runs in, outermost first (the leaf a call_module calls left out)."""
    paths = [path for path, _ in (n.meta.get("nn_module_stack") or {}).values()]
    if n.op == "call_module" and paths and paths[-1] == n.target:
        paths = paths[:-1]
    return [str(p) for p in paths]


def span_nodes(site: Site, analysis: Analysis) -> list[str] | None:
    """The node names of the span's layers in order, or None where the site's layers are not consecutive."""
    i, k = analysis.layer_at(site.anchor), len(site.layers)
    span = analysis.layers[i : i + k] if i is not None else []
    if tuple(layer.name for layer in span) != site.layers:
        return None
    return [n for layer in span for n in layer.nodes]


def _owner(site: Site, analysis: Analysis) -> tuple[str, int]:
    """The site's owner (relative to the unit) and its exit's position among the span's ops (negative)."""
    nodes = span_nodes(site, analysis)
    if nodes is None or site.exit not in nodes:
        raise PlanError(f"the site at '{site.start}' does not run along its layers' ops; please report this")
    exit_step = nodes.index(site.exit) - len(nodes)
    members = [analysis.node(n) for n in nodes]
    if isinstance(site.shortcut, Dense):
        members += [
            m
            for layer in analysis.layers
            if layer.name == site.shortcut.consumer
            for m in [analysis.node(layer.anchor)]
        ]
    stacks = [_stack(n) for n in members]
    common: list[str] = []
    for level in zip(*stacks):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return (common[-1] if common else ""), exit_step


def _unique_name(base: str, taken: set[str]) -> str:
    name, i = base or "layer", 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def place(plan: Plan, analysis: Analysis, unit: str) -> Plan:
    """``plan`` (made on the unit at ``unit``) with each site's owner and exit_step filled in, and
    every layer name made relative to the model's root (``settle`` then names the sites)."""
    sites = []
    for site in plan.sites:
        owner, exit_step = _owner(site, analysis)
        sites.append(_qualify_site(replace(site, owner=qualified(unit, owner), exit_step=exit_step), unit))
    other = None
    if plan.other_mode_sites is not None:
        names = {(s.start, s.end): s for s in sites}
        other = tuple(
            replace(_qualify_site(s, unit), owner=t.owner, exit_step=t.exit_step)
            for s in plan.other_mode_sites
            for t in [names[(qualified(unit, s.start), qualified(unit, s.end))]]
        )
    return replace(
        plan,
        sites=tuple(sites),
        other_mode_sites=other,
        skipped=tuple(replace(k, start=qualified(unit, k.start), end=qualified(unit, k.end)) for k in plan.skipped),
        existing=tuple(
            replace(
                e,
                start=qualified(unit, e.start),
                end=qualified(unit, e.end),
                layers=tuple(qualified(unit, n) for n in e.layers),
            )
            for e in plan.existing
        ),
        layers=tuple(qualified(unit, n) for n in plan.layers),
    )


def aliases(model: nn.Module) -> dict[str, set[str]]:
    """Every qualified module name -> all the names of that module (CoaT's ``cpe1`` is also
    ``serial_blocks1.0.cpe``; torch.fx names it by the first, wherever it is called)."""
    names: dict[int, set[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), set()).add(name)
    return {name: group for group in names.values() for name in group}


def settle(plan: Plan, model: nn.Module) -> Plan:
    """The owners made final, and each site named under its owner.

    An owner whose span enters another owner takes that one's sites too (its forward inlines the
    other's, so both are inserted in one graph); then each site is named by its first layer relative
    to its owner (``<owner>.resify.<name>``), past the names the owner's namespace already holds.
    """
    sites = list(plan.sites)
    also = aliases(model)
    changed = True
    while changed:
        changed = False
        touched: dict[str, set[str]] = {}
        for s in sites:
            names = set(s.layers) | ({s.shortcut.consumer} if isinstance(s.shortcut, Dense) else set())
            touched.setdefault(s.owner, set()).update(a for n in names for a in also.get(n, {n}))
        for outer, names in touched.items():
            inner = _entered_owner(outer, names, touched)
            if inner is not None:
                sites = [replace(s, owner=outer) if s.owner == inner else s for s in sites]
                changed = True
                break
    taken: dict[str, set[str]] = {}
    named = []
    seen: set[tuple[str, str, str]] = set()
    for s in sites:
        if (s.owner, s.start, s.end) in seen:
            continue  # a module called more than once (a loop, a shared block): one set of shortcuts
        seen.add((s.owner, s.start, s.end))
        if s.owner not in taken:
            taken[s.owner] = _namespace_names(model, s.owner)
        inside = sorted(a for a in also.get(s.start, {s.start}) if _inside(a, s.owner))
        base = (_relative(s.owner, inside[0]) if inside else s.start).replace(".", "_")
        named.append(replace(s, name=_unique_name(base, taken[s.owner])))
    by_key = {(s.start, s.end): s for s in named}
    other = None
    if plan.other_mode_sites is not None:
        other = tuple(
            replace(o, owner=t.owner, name=t.name) for o in plan.other_mode_sites for t in [by_key[(o.start, o.end)]]
        )
    return replace(plan, sites=tuple(named), other_mode_sites=other)


def _entered_owner(outer: str, names: set[str], owners: Mapping[str, object]) -> str | None:
    """Another owner inside ``outer`` that one of ``names`` (the layers ``outer``'s spans touch) lies
    in, or None: each name's dotted prefixes looked up, not every pair of owners (a net of 10,000
    blocks has 10,000 owners)."""
    for n in sorted(names):
        parts = n.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if prefix != outer and prefix in owners and _inside(prefix, outer):
                return prefix
    return None


def _inside(inner: str, outer: str) -> bool:
    return not outer or inner.startswith(outer + ".")


def _namespace_names(model: nn.Module, owner: str) -> set[str]:
    """Names already under ``<owner>.resify`` (a model resify converted before)."""
    try:
        ns = model.get_submodule(qualified(owner, NAMESPACE))
    except AttributeError:
        return set()
    return {name for name, _ in ns.named_children()} | {name for name, _ in ns.named_parameters(recurse=False)}


def _qualify_site(site: Site, unit: str) -> Site:
    if not unit:
        return site
    shortcut = site.shortcut
    if isinstance(shortcut, Dense):
        shortcut = replace(shortcut, consumer=qualified(unit, shortcut.consumer))
    return replace(
        site,
        start=qualified(unit, site.start),
        end=qualified(unit, site.end),
        layers=tuple(qualified(unit, n) for n in site.layers),
        shortcut=shortcut,
    )


def merge(
    model_class: str, parts: Sequence[Plan], whole: Sequence[WholeModule], policy: Policy, params_before: int
) -> Plan:
    """One plan from the units' placed plans (in forward order) and the modules kept whole."""
    if len(parts) == 1 and not whole:
        return parts[0]
    sites: list[Site] = []
    skipped: list[Skipped] = []
    existing: list[ExistingShortcut] = []
    notes: list[str] = []
    layers: list[str] = []
    for p in parts:
        sites += p.sites
        skipped += p.skipped
        existing += p.existing
        notes += [n for n in p.notes if n not in notes]
        layers += p.layers
    return Plan(
        model_class=model_class,
        tracer="concrete" if any(p.tracer == "concrete" for p in parts) else "symbolic",
        policy=policy,
        n_layers=len(layers),
        params_before=params_before,
        sites=tuple(sites),
        skipped=tuple(skipped),
        existing=tuple(existing),
        notes=tuple(notes),
        other_mode_sites=None,
        layers=tuple(layers),
        whole=tuple(whole),
    )
