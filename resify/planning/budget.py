"""What shortcuts cost, and what a plan may spend on them (part of stage 3, planning).

A learned projection may cost at most ``projection_cost`` × the parameters of the span it bridges,
and all of a plan's learned projections together at most ``max_added`` × the model's parameters
(at least ``MIN_BUDGET``), taken cheapest per bridged layer first. Under ``projection='auto'`` a
projection past either limit becomes parameter-free (ResNet's option A) with a note in the plan;
under ``projection='conv'`` its span is skipped with the code ``projection_cost`` or ``over_budget``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ..analysis.analyze import Analysis, Layer
from ..constants import MIN_BUDGET
from ..ops import called_module, layer_weight
from .policy import Policy
from .sites import Projection, Site, Skipped

__all__ = ["within_cost", "within_budget", "span_params", "span_groups"]


def _span_modules(layers: Sequence[Layer], analysis: Analysis) -> list[nn.Module]:
    return [
        m
        for layer in layers
        for name in layer.nodes
        if (m := called_module(analysis.module, analysis.node(name))) is not None
    ]


def span_groups(layers: Sequence[Layer], analysis: Analysis) -> int:
    """The groups every convolution of the span shares (their greatest common divisor)."""
    groups = [m.groups for m in _span_modules(layers, analysis) if isinstance(m, nn.modules.conv._ConvNd)]
    return math.gcd(*groups) if groups else 1


def span_params(layers: Sequence[Layer], analysis: Analysis) -> int:
    """The parameters of the span's own layers (their modules, or a functional layer's weight)."""
    tensors: dict[int, torch.Tensor] = {id(p): p for m in _span_modules(layers, analysis) for p in m.parameters()}
    for layer in layers:
        anchor = analysis.node(layer.anchor)
        if anchor.op != "call_module":
            w = layer_weight(analysis.module, anchor)
            tensors[id(w)] = w
    return sum(t.numel() for t in tensors.values())


def _parameter_free(site: Site) -> Site:
    """The site with ResNet's option A in place of its learned projection (channels padded or sliced)."""
    form = site.shortcut
    assert isinstance(form, Projection)
    pad = form.parameter_free()
    return replace(site, shortcut=pad, added_params=site.added_params - form.params)


def _learned_instead(site: Site, why: str, keyword: str) -> str:
    return (
        f"'{site.start}': a parameter-free shortcut ({_parameter_free(site).projection}) in place of {why}; "
        f"pass {keyword} to learn it, or projection='conv' to leave the span without a shortcut"
    )


def within_cost(site: Site, layers: Sequence[Layer], analysis: Analysis, policy: Policy) -> tuple[Site | Skipped, str]:
    """The site, unless its learned projection costs more than projection_cost × its span's own
    parameters (a 1×1 convolution beside a depthwise one): then, with projection='auto', the
    parameter-free form (and a note); with projection='conv', a Skipped record."""
    form = site.shortcut
    if not isinstance(form, Projection) or not form.params or policy.projection_cost is None:
        return site, ""
    own = span_params(layers, analysis)
    if form.params <= policy.projection_cost * own:
        return site, ""
    why = (
        f"a {form.label} projection of {form.params:,} parameters, more than {policy.projection_cost:g}× "
        f"the span's own {own:,} (projection_cost={policy.projection_cost:g})"
    )
    if policy.projection == "auto":
        return _parameter_free(site), _learned_instead(site, why, "projection_cost=None")
    return (
        Skipped(
            site.start,
            site.end,
            "projection_cost",
            f"{why}; pass projection_cost=None to add it, or projection='pad' for a parameter-free shortcut",
        ),
        "",
    )


def within_budget(sites: list[Site], policy: Policy, params_before: int) -> tuple[list[Site], list[Skipped], list[str]]:
    """The sites within ``max_added``, and the projections left out for it.

    Identity and parameter-free shortcuts cost nothing and always stay. Learned projections are
    taken by value per parameter (the layers a shortcut lets the gradient skip, per parameter it
    adds), cheapest first, while their sum stays within max(max_added × the model's parameters,
    MIN_BUDGET): the cheap projections where a stage changes its width come before the one beside a
    100-million-parameter classifier layer.
    """
    if policy.max_added is None or policy.shortcut != "auto":
        return sites, [], []
    budget = max(policy.max_added * params_before, MIN_BUDGET)
    paid = [s for s in sites if isinstance(s.shortcut, Projection) and s.shortcut.params]
    spent, dropped = 0, set()
    for s in sorted(paid, key=lambda s: s.shortcut.params / len(s.layers)):  # type: ignore[union-attr]
        cost = s.shortcut.params  # type: ignore[union-attr]
        if spent + cost <= budget:
            spent += cost
        else:
            dropped.add(s.name)
    budget_text = (
        f"max_added={policy.max_added:g}: {budget:,.0f} parameters, {policy.max_added:.0%} of the model's "
        f"{params_before:,} and at least {MIN_BUDGET:,}"
    )
    if policy.projection == "auto":
        kept = [_parameter_free(s) if s.name in dropped else s for s in sites]
        notes = [
            _learned_instead(
                s,
                f"its {s.projection} ({s.shortcut.params:,} parameters) beyond the budget "  # type: ignore[union-attr]
                f"({budget_text})",
                "max_added=None",
            )
            for s in sites
            if s.name in dropped
        ]
        return kept, [], notes
    over = [
        Skipped(
            s.start,
            s.end,
            "over_budget",
            f"its {s.projection} would add {s.added_params:,} parameters; the budget ({budget_text}) went to "
            "projections that bridge more layers per parameter; pass max_added=None (or a larger share) to add it",
        )
        for s in sites
        if s.name in dropped
    ]
    return [s for s in sites if s.name not in dropped], over, []
