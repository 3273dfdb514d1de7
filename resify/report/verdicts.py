"""The verdict rules (pure): per-layer and overall verdicts, the recommendation, and ``compare``.

The thresholds live in ``resify.constants``; the README's "Reading the report" explains them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..constants import ABS_EXPLODING, ABS_VANISHING, DEEP_LAYERS, EXPLODING_RATIO, VANISHING_RATIO, Verdict
from ..errors import ResifyError
from ..formats import fmt_number, fmt_times
from .records import FlowComparison, GradientFlow, LayerChange, LayerFlow

__all__ = ["judge", "layer_verdict", "recommend", "compare"]


def layer_verdict(rec: LayerFlow, last: float | None) -> Verdict:
    """One layer's verdict: its flow ÷ the last layer's against the thresholds; non-finite figures explode."""
    figures = [rec.mean_abs_grad, rec.grad_norm, rec.input_grad_norm, rec.activation_rms]
    if any(x is not None and not math.isfinite(x) for x in figures):
        return "exploding"
    flow = rec.flow
    if rec.kind == "Gate" or flow is None:
        return "healthy"
    if flow > ABS_EXPLODING or (last and flow / last > EXPLODING_RATIO):
        return "exploding"
    if last and flow / last < VANISHING_RATIO:
        return "vanishing"
    return "healthy"


def judge(records: tuple[LayerFlow, ...], **fields: Any) -> GradientFlow:
    """Attach per-layer and overall verdicts, the reason and the recommendation."""
    own = [r for r in records if not r.added and r.kind != "Gate" and r.input_grad_norm is not None]
    if not own:  # no layer input carries a gradient (token ids into embeddings only): weight gradients
        own = [r for r in records if not r.added and r.kind != "Gate" and r.flow is not None]
    last = own[-1].flow if own else None
    layers = tuple(replace(r, verdict=layer_verdict(r, last)) for r in records)
    first = own[0].flow if own else None
    ratio = first / last if first is not None and last else None
    figures = [
        x for r in records for x in (r.mean_abs_grad, r.grad_norm, r.input_grad_norm, r.activation_rms) if x is not None
    ]
    flows = [r.flow for r in records if r.flow is not None and r.kind != "Gate"]
    verdict: Verdict
    # a first layer that takes integers (an embedding of token ids) has no input gradient: its weight
    # gradient, against the last layer's, says whether the gradient reaches it
    entry = next((r for r in records if not r.added and r.kind != "Gate" and r.flow is not None), None)
    token_layer = entry if entry is not None and own and entry.input_grad_norm is None else None
    head = own[-1].grad_norm if own else None
    weight_ratio = token_layer.grad_norm / head if token_layer and token_layer.grad_norm is not None and head else None
    where = f"from '{own[0].name}' to '{own[-1].name}'" if own else ""
    if token_layer is not None and weight_ratio is not None:
        where += (
            f"; '{token_layer.name}' before it (integer input) gets {fmt_number(weight_ratio)} of the last "
            "layer's weight gradient"
        )
    if any(not math.isfinite(x) for x in figures):
        bad = next(
            r.name
            for r in records
            if any(
                x is not None and not math.isfinite(x)
                for x in (r.mean_abs_grad, r.grad_norm, r.input_grad_norm, r.activation_rms)
            )
        )
        verdict, reason = "exploding", f"a gradient or activation is not finite at '{bad}'"
    elif ratio is not None and ratio > EXPLODING_RATIO:
        verdict, reason = "exploding", f"input gradient grows {fmt_times(ratio)} (> {EXPLODING_RATIO:g}×) {where}"
    elif flows and max(flows) > ABS_EXPLODING:
        verdict, reason = "exploding", f"a gradient norm reaches {fmt_number(max(flows))} (> {ABS_EXPLODING:g})"
    elif first is not None and first < ABS_VANISHING:
        verdict, reason = "vanishing", f"the first layer's input gradient is {fmt_number(first)} (< {ABS_VANISHING:g})"
    elif ratio is not None and ratio < VANISHING_RATIO:
        verdict, reason = (
            "vanishing",
            f"input gradient first/last = {fmt_number(ratio)} (< {VANISHING_RATIO:g}) {where}",
        )
    elif weight_ratio is not None and token_layer is not None and weight_ratio < VANISHING_RATIO:
        verdict, reason = (
            "vanishing",
            f"input gradient first/last = {fmt_number(ratio)} {where} (< {VANISHING_RATIO:g})",
        )
    else:
        shown = fmt_number(ratio) if ratio is not None else "n/a"
        verdict, reason = (
            "healthy",
            (f"input gradient first/last = {shown} (within {VANISHING_RATIO:g}…{EXPLODING_RATIO:g}) {where}"),
        )
    return GradientFlow(
        layers=layers,
        verdict=verdict,
        reason=reason.strip(),
        recommendation=recommend(verdict, layers),
        first_to_last=ratio,
        **fields,
    )


def recommend(verdict: Verdict, layers: Sequence[LayerFlow]) -> str | None:
    """What to try for a 'vanishing' or 'exploding' network (None when healthy)."""
    shortcuts = any(r.added for r in layers)
    gated = any(r.kind == "Gate" for r in layers)
    if verdict == "vanishing":
        depth = sum(1 for r in layers if not r.added and r.kind != "Gate")
        if not shortcuts and depth >= DEEP_LAYERS:
            return (
                f"try gate='rezero': resify.apply(model, gate='rezero') adds a shortcut around every layer "
                f"and starts each branch at zero, which trains {depth} layers in series more reliably "
                "than ungated shortcuts"
            )
        if not shortcuts:
            return "try shortcut='auto': resify.apply(model, shortcut='auto') adds a shortcut around every layer"
        return "try shortcut='auto' with group=1 so that every layer, not only some, gets a shortcut"
    if verdict == "exploding":
        if gated:
            return "try a smaller gate_init (gate='rezero' with gate_init=0 starts every branch at zero)"
        return "try gate='rezero': resify.apply(model, gate='rezero') starts every branch at zero"
    return None


def compare(before: GradientFlow, after: GradientFlow) -> FlowComparison:
    """Match the layers of two reports by name; ratios are after ÷ before.

    The headline compares the first layer the two share: its ``mean_abs_grad`` (the seed's
    figure), or its input-gradient norm where a weight gradient is zero (a gate at zero).
    """
    if not isinstance(before, GradientFlow) or not isinstance(after, GradientFlow):
        raise ResifyError(
            f"compare takes two GradientFlow reports, found {type(before).__name__} and "
            f"{type(after).__name__}; make them with resify.gradient_flow(model, x)"
        )
    by_name = {r.name: r for r in after.layers}
    changes = tuple(LayerChange(r, by_name[r.name]) for r in before.layers if r.name in by_name)
    seen = {r.name for r in before.layers}
    added = tuple(r for r in after.layers if r.name not in seen)
    removed = tuple(r.name for r in before.layers if r.name not in by_name)
    first = next((c for c in changes if c.before.kind != "Gate"), None)
    ratio = first.ratio if first is not None else None
    verdicts = f"verdict {before.verdict} → {after.verdict}"
    if first is None:
        headline = f"no layer in common; {verdicts}"
    elif ratio is not None and ratio > 0 and math.isfinite(ratio):
        headline = f"first layer: {_change(ratio)} gradient; {verdicts}"
    elif first.input_ratio is not None and first.input_ratio > 0 and math.isfinite(first.input_ratio):
        headline = f"first layer: {_change(first.input_ratio)} input gradient; {verdicts}"
    else:
        b, a = first.before.mean_abs_grad, first.after.mean_abs_grad
        headline = f"first layer: mean |grad| {fmt_number(b)} → {fmt_number(a)}; {verdicts}"
    return FlowComparison(
        before=before,
        after=after,
        layers=changes,
        added=added,
        removed=removed,
        headline=headline,
        first_layer_ratio=ratio,
    )


def _change(ratio: float) -> str:
    if ratio >= 1:
        return f"{fmt_times(ratio)} more"
    return f"{fmt_times(1 / ratio)} less"
