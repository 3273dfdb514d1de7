"""The verdict rules (pure): per-layer and overall verdicts, the advice, ``compare``, and a watched
training step against the first one recorded.

The gradient rules compare the first layer's flow with the last's; the forward rules (``signal``)
follow the activations' scale and how alike the examples' outputs are. The model's ``facts`` say
what it already has: a net whose branch gates are all still 0 is judged through its gates, and the
advice leaves out what the model has. The thresholds live in ``resify.constants``; docs/report.md,
"Reading the report", explains them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..constants import (
    ABS_EXPLODING,
    ABS_VANISHING,
    ACTIVATION_GROWTH,
    DEEP_LAYERS,
    EXPLODING_RATIO,
    LOSS_GROWTH,
    VANISHING_RATIO,
    Verdict,
)
from ..errors import ResifyError
from ..formats import fmt_number, fmt_times
from .facts import ModelFacts, is_branch_gate
from .history import LOSS_SEEN, StepFlow
from .records import FlowComparison, GradientFlow, LayerChange, LayerFlow, judged_layers
from .signal import Signal, own_layers, signal_of

if TYPE_CHECKING:
    from ..planning.policy import Policy
    from ..planning.sites import Site

__all__ = ["judge", "layer_verdict", "Advice", "advice", "recommend", "compare", "judge_step"]


def _not_finite(rec: LayerFlow) -> bool:
    figures = (rec.mean_abs_grad, rec.grad_norm, rec.input_grad_norm, rec.activation_rms)
    return any(x is not None and not math.isfinite(x) for x in figures)


def layer_verdict(rec: LayerFlow, last: float | None, signal: Signal | None = None, *, ratios: bool = True) -> Verdict:
    """One layer's verdict: non-finite figures explode; then its flow ÷ the last layer's against the
    gradient thresholds (the vanishing one only with ``ratios``: not where every branch gate is 0 and
    the branches learn through their gates), and its forward signal (``Signal.layer_verdict``)."""
    if _not_finite(rec):
        return "exploding"
    if rec.kind == "Gate":
        return "healthy"
    flow = rec.flow
    forward = signal.layer_verdict(rec) if signal is not None else None
    if flow is not None and (flow > ABS_EXPLODING or (last and flow / last > EXPLODING_RATIO)):
        return "exploding"
    if forward == "exploding":
        return forward
    if ratios and flow is not None and last and flow / last < VANISHING_RATIO:
        return "vanishing"
    return forward or "healthy"


@dataclass(frozen=True)
class _Gradient:
    """What the gradient rules rest on: the first and the last layer's flow, and where they are."""

    first: float | None  # the first own layer's flow
    last: float | None  # the last own layer's
    peak: float | None  # the largest flow of any layer (resify's included)
    weight_ratio: float | None  # an integer-input first layer's weight gradient ÷ the last layer's
    where: str  # "from 'a' to 'b'", and the integer-input layer's share

    @property
    def ratio(self) -> float | None:
        return self.first / self.last if self.first is not None and self.last else None


def _gradient(records: Sequence[LayerFlow]) -> _Gradient:
    own = judged_layers(records)
    flows = [r.flow for r in records if r.flow is not None and r.kind != "Gate"]
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
    return _Gradient(
        first=own[0].flow if own else None,
        last=own[-1].flow if own else None,
        peak=max(flows) if flows else None,
        weight_ratio=weight_ratio if token_layer is not None else None,
        where=where,
    )


def _overall(records: Sequence[LayerFlow], g: _Gradient, s: Signal, facts: ModelFacts) -> tuple[Verdict, str]:
    """The model's verdict and the one line it rests on, rules in order: explosions, then a net whose
    branch gates are all 0 (judged through them), vanishing gradients, a collapse, else healthy."""
    bad = next((r.name for r in records if _not_finite(r)), None)
    ratio = g.ratio
    if bad is not None:
        return "exploding", f"a gradient or activation is not finite at '{bad}'"
    if ratio is not None and ratio > EXPLODING_RATIO:
        return "exploding", f"input gradient grows {fmt_times(ratio)} (> {EXPLODING_RATIO:g}×) {g.where}"
    if g.peak is not None and g.peak > ABS_EXPLODING:
        return "exploding", f"a gradient norm reaches {fmt_number(g.peak)} (> {ABS_EXPLODING:g})"
    if s.exploding:
        return "exploding", s.growth_reason()
    if facts.gates_at_zero:
        return _through_gates(records, g, s)
    if g.first is not None and g.first < ABS_VANISHING:
        return "vanishing", f"the first layer's input gradient is {fmt_number(g.first)} (< {ABS_VANISHING:g})"
    if ratio is not None and ratio < VANISHING_RATIO:
        return "vanishing", f"input gradient first/last = {fmt_number(ratio)} (< {VANISHING_RATIO:g}) {g.where}"
    if g.weight_ratio is not None and g.weight_ratio < VANISHING_RATIO:
        return "vanishing", f"input gradient first/last = {fmt_number(ratio)} {g.where} (< {VANISHING_RATIO:g})"
    if s.collapsing:
        return "collapsing", s.collapse_reason()
    shown = fmt_number(ratio) if ratio is not None else "n/a"
    return "healthy", f"input gradient first/last = {shown} (within {VANISHING_RATIO:g}…{EXPLODING_RATIO:g}) {g.where}"


def _through_gates(records: Sequence[LayerFlow], g: _Gradient, s: Signal) -> tuple[Verdict, str]:
    """A net whose branch gates (α, γ) are all 0, as at initialisation: each branch contributes nothing
    yet and learns through its gate, and the gradient reaches the first layer through the shortcuts
    alone (where projections and pooling scale it): it vanishes only where a gate gets no gradient."""
    gates = [r for r in records if r.kind == "Gate" and is_branch_gate(r.name) and r.mean_abs_grad is not None]
    stuck = next((r for r in gates if r.mean_abs_grad == 0), None)
    if stuck is not None:
        return "vanishing", f"every branch gate is 0 and '{stuck.name}' gets no gradient: its branch cannot start"
    if g.first is not None and g.first < ABS_VANISHING:
        return "vanishing", (
            f"every branch gate is 0, and the first layer's input gradient through the shortcuts is "
            f"{fmt_number(g.first)} (< {ABS_VANISHING:g})"
        )
    if s.collapsing:
        return "collapsing", s.collapse_reason()
    shown = fmt_number(g.ratio) if g.ratio is not None else "n/a"
    return "healthy", (
        f"every branch gate is 0 (as at initialisation) and all {len(gates)} get gradient; "
        f"through the shortcuts, input gradient first/last = {shown} {g.where}"
    )


def judge(records: tuple[LayerFlow, ...], *, facts: ModelFacts | None = None, **fields: Any) -> GradientFlow:
    """Attach per-layer and overall verdicts, the reason and the recommendation.

    ``facts``: what the model has (``facts.model_facts``); ``fields``: the report's other fields.
    """
    facts = facts or ModelFacts()
    g, s = _gradient(records), signal_of(records)
    ratios = not facts.gates_at_zero
    layers = tuple(_with_verdict(r, layer_verdict(r, g.last, s, ratios=ratios)) for r in records)
    verdict, reason = _overall(records, g, s, facts)
    return GradientFlow(
        layers=layers,
        verdict=verdict,
        reason=reason.strip(),
        recommendation=recommend(verdict, layers, facts),
        first_to_last=g.ratio,
        activation_growth=s.growth,
        output_similarity=s.output.activation_similarity if s.output is not None else None,
        **fields,
    )


def _with_verdict(rec: LayerFlow, verdict: Verdict) -> LayerFlow:
    """``replace(rec, verdict=verdict)`` without its checks (~8 µs a layer, a tenth of a report's fixed cost)."""
    if rec.verdict == verdict:
        return rec
    new = object.__new__(LayerFlow)
    new.__dict__.update(rec.__dict__, verdict=verdict)
    return new


@dataclass(frozen=True)
class Advice:
    """One thing to try: keywords of ``resify.apply`` and what they do (or, with no keywords, a change
    to the model itself, in ``effect``).

    The report words it in Python (:meth:`python`); the command line words the same keywords as its
    flags, leaving out those the run already uses (``resify.cli.flags.advice_text``).
    """

    settings: tuple[tuple[str, Any], ...]  # (keyword, value), e.g. (("gate", "rezero"),)
    effect: str  # what the settings do, e.g. "starts every branch at zero"

    def python(self) -> str:
        """E.g. "try gate='rezero': resify.apply(model, gate='rezero') starts every branch at zero"."""
        if not self.settings:
            return self.effect
        keywords = ", ".join(f"{k}={v!r}" for k, v in self.settings)
        return f"try {keywords}: resify.apply(model, {keywords}) {self.effect}"

    def unused(self, policy: Policy, sites: Sequence[Site] = ()) -> tuple[tuple[str, Any], ...]:
        """The settings that a run under ``policy`` does not use already (its defaults included); with
        the ``sites`` it planned, their gate and its start where all agree (gate='auto' chooses them site
        by site)."""
        has: dict[str, Any] = {"gate_init": policy.effective_gate_init}
        for key in ("gate", "gate_init"):
            found = {getattr(site, key) for site in sites}
            if len(found) == 1:
                has[key] = found.pop()
        return tuple((k, v) for k, v in self.settings if has.get(k, getattr(policy, k)) != v)


_EVERY_LAYER = "adds a shortcut around every layer"
_REZERO = Advice((("gate", "rezero"),), "starts every branch at zero")
_TRAINING = Advice((), "lower the learning rate, or clip the gradient norm (torch.nn.utils.clip_grad_norm_)")
_TRAIN_MODE = Advice(
    (),
    "if it is untrained, measure it in train mode (model.train()): in eval mode its BatchNorm layers "
    "use running statistics, which do not normalise an untrained model",
)


def advice(verdict: Verdict, layers: Sequence[LayerFlow], facts: ModelFacts | None = None) -> tuple[Advice, ...]:
    """What to try for a network that is not 'healthy', best first; with ``facts`` (the model's plan,
    its normalisation), nothing the model has already."""
    facts = facts or ModelFacts()
    found = _collapse_advice(layers, facts) if verdict == "collapsing" else _gradient_advice(verdict, layers, facts)
    if facts.batch_norm_eval and verdict != "healthy":  # at initialisation, most likely the cause
        found = (_TRAIN_MODE, *found)
    plan = facts.plan
    return found if plan is None else tuple(a for a in found if not a.settings or a.unused(plan.policy, plan.sites))


def _gradient_advice(verdict: Verdict, layers: Sequence[LayerFlow], facts: ModelFacts) -> tuple[Advice, ...]:
    shortcuts = facts.shortcuts or any(r.added for r in layers)
    gated = any(r.kind == "Gate" for r in layers)
    if facts.gates_at_zero:  # every branch starts at zero already: nothing of resify's left to try
        return ()
    if verdict == "vanishing":
        depth = sum(1 for r in layers if not r.added and r.kind != "Gate")
        if not shortcuts and depth >= DEEP_LAYERS:
            effect = (
                f"{_EVERY_LAYER} and starts each branch at zero, which trains {depth} layers in series more "
                "reliably than ungated shortcuts"
            )
            return (Advice((("gate", "rezero"),), effect),)
        if not shortcuts:
            return (Advice((("shortcut", "auto"),), _EVERY_LAYER),)
        return (Advice((("shortcut", "auto"), ("group", 1)), "gives every layer, not only some, a shortcut"), _REZERO)
    if verdict == "exploding":
        if gated:
            return (Advice((("gate", "rezero"), ("gate_init", 0.0)), "starts every branch at zero"),)
        return (_REZERO,)
    return ()


def _collapse_advice(layers: Sequence[LayerFlow], facts: ModelFacts) -> tuple[Advice, ...]:
    found: list[Advice] = []
    if not (facts.shortcuts or any(r.added for r in layers)):
        found.append(
            Advice((("gate", "rezero"),), f"{_EVERY_LAYER}, which carries each example's own signal past the layers")
        )
    if not facts.normalised:
        found.append(Advice((), "add normalisation (LayerNorm or BatchNorm) inside its blocks"))
    return tuple(found)


def recommend(verdict: Verdict, layers: Sequence[LayerFlow], facts: ModelFacts | None = None) -> str | None:
    """What to try, in Python (None when healthy, or when the model has everything advice would add)."""
    found = advice(verdict, layers, facts)
    return found[0].python() if found else None


def judge_step(flow: GradientFlow, start: StepFlow | None) -> GradientFlow:
    """A watched training step judged against the first step recorded (``start``) too: 'exploding'
    where its loss is not finite or above ``LOSS_GROWTH``× the first's, or where a layer's activation
    RMS is above ``ACTIVATION_GROWTH``× what it was then (the layers marked)."""
    if flow.verdict == "exploding":
        return flow
    if flow.loss == LOSS_SEEN and not math.isfinite(flow.loss_value):
        reason = f"the training loss is {flow.loss_value}"
        return replace(flow, verdict="exploding", reason=reason, recommendation=_TRAINING.python())
    if start is None:
        return flow
    first = start.flow
    if flow.loss == first.loss == LOSS_SEEN and first.loss_value > 0:
        growth = flow.loss_value / first.loss_value
        if growth > LOSS_GROWTH:
            reason = (
                f"the training loss {fmt_number(flow.loss_value)} is {fmt_times(growth)} step {start.step}'s "
                f"(> {LOSS_GROWTH:g}×)"
            )
            return replace(flow, verdict="exploding", reason=reason, recommendation=_TRAINING.python())
    then = {r.name: r.activation_rms for r in own_layers(first.layers) if r.activation_rms}
    grown = {
        r.name: r.activation_rms / then[r.name]
        for r in own_layers(flow.layers)
        if r.activation_rms is not None and then.get(r.name) and r.activation_rms / then[r.name] > ACTIVATION_GROWTH
    }
    if not grown:
        return flow
    worst = max(grown, key=grown.__getitem__)
    reason = (
        f"the activation RMS of '{worst}' is {fmt_times(grown[worst])} step {start.step}'s "
        f"(> {ACTIVATION_GROWTH:g}×; {len(grown)} layer(s) past it)"
    )
    layers = tuple(replace(r, verdict="exploding") if r.name in grown else r for r in flow.layers)
    return replace(flow, layers=layers, verdict="exploding", reason=reason, recommendation=_TRAINING.python())


def compare(before: GradientFlow, after: GradientFlow) -> FlowComparison:
    """Match the layers of two reports by name; ratios are after ÷ before.

    The headline compares the first layer the two share: its ``mean_abs_grad`` (the seed's
    figure), or its input-gradient norm where a weight gradient is zero (a gate at zero). Where the
    output's activation RMS grew past ``ACTIVATION_GROWTH``× the original's (and past the converted
    model's own first layer's), the ``after`` report is judged 'exploding'.
    """
    if not isinstance(before, GradientFlow) or not isinstance(after, GradientFlow):
        raise ResifyError(
            f"compare takes two GradientFlow reports, found {type(before).__name__} and "
            f"{type(after).__name__}; make them with resify.gradient_flow(model, x)"
        )
    by_name = {r.name: r for r in after.layers}
    changes = tuple(LayerChange(r, by_name[r.name]) for r in before.layers if r.name in by_name)
    seen = {r.name for r in before.layers}
    first = next((c for c in changes if c.before.kind != "Gate"), None)
    c = FlowComparison(
        before=before,
        after=after,
        layers=changes,
        added=tuple(r for r in after.layers if r.name not in seen),
        removed=tuple(r.name for r in before.layers if r.name not in by_name),
        headline="",
        first_layer_ratio=first.ratio if first is not None else None,
    )
    after = _against_original(c)
    return replace(c, after=after, headline=_headline(first, f"verdict {before.verdict} → {after.verdict}"))


def _against_original(c: FlowComparison) -> GradientFlow:
    """``c.after``, judged 'exploding' where its output's scale grew past ``ACTIVATION_GROWTH``× the
    original's and past its own first layer's (a conversion that restores a signal the original lost
    is not an explosion)."""
    after, change, ratio = c.after, c.output_change, c.output_ratio
    if change is None or ratio is None or ratio <= ACTIVATION_GROWTH or after.verdict == "exploding":
        return after
    first = signal_of(after.layers).first
    if first is None or (change.after.activation_rms or 0.0) <= (first.activation_rms or 0.0):
        return after
    reason = f"the output's activation RMS at '{change.name}' is {fmt_times(ratio)} the original's (> {ACTIVATION_GROWTH:g}×)"
    return replace(after, verdict="exploding", reason=reason, recommendation=recommend("exploding", after.layers))


def _headline(first: LayerChange | None, verdicts: str) -> str:
    if first is None:
        return f"no layer in common; {verdicts}"
    ratio = first.ratio
    if ratio is not None and ratio > 0 and math.isfinite(ratio):
        return f"first layer: {_change(ratio)} gradient; {verdicts}"
    if first.input_ratio is not None and first.input_ratio > 0 and math.isfinite(first.input_ratio):
        return f"first layer: {_change(first.input_ratio)} input gradient; {verdicts}"
    b, a = first.before.mean_abs_grad, first.after.mean_abs_grad
    return f"first layer: mean |grad| {fmt_number(b)} → {fmt_number(a)}; {verdicts}"


def _change(ratio: float) -> str:
    if ratio >= 1:
        return f"{fmt_times(ratio)} more"
    return f"{fmt_times(1 / ratio)} less"
