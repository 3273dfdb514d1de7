"""The records of ``resify.watch``: the gradient flow at each recorded step, and the verdicts over time.

Frozen dataclasses beside ``records.py``: a :class:`StepFlow` holds one recorded backward as the
very :class:`GradientFlow` that ``gradient_flow`` returns (the same fields, built and judged by the
same code), the gates' values and the GradScaler's scale; :class:`FlowHistory` holds the steps
and turns them into a dict of lists or JSON; :class:`VerdictTimeline` says which verdict held
from which step on, and in which layers. Plots go through ``resify.views.history_plot``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..constants import REPORT_SCHEMA_VERSION, Verdict
from ..errors import ResifyError
from ..views import history_plot
from .records import GradientFlow, _jnum
from .signal import own_layers

__all__ = ["StepFlow", "VerdictChange", "VerdictTimeline", "FlowHistory", "FIELDS", "LOSS_SEEN", "LOSS_NOT_SEEN"]

#: the per-layer figures of a LayerFlow, in the order ``FlowHistory.to_dict`` writes them.
FIELDS = (
    "mean_abs_grad",
    "grad_norm",
    "grad_to_weight",
    "input_grad_norm",
    "activation_rms",
    "activation_similarity",
)
#: a recorded step's ``flow.loss``: the loss given to ``Watch.record_loss`` (its value in ``loss_value``) ...
LOSS_SEEN = "training loss"
#: ... or none given (``loss_value`` is NaN)
LOSS_NOT_SEEN = "training loss (not seen)"


@dataclass(frozen=True)
class StepFlow:
    """One recorded backward: its step, its gradient flow, and the gates' values in its forward."""

    step: int  # the backward's number since the watch began, from 0
    flow: GradientFlow  # the figures and verdicts, as gradient_flow gives them
    gates: Mapping[str, tuple[float, ...]]  # gate name -> its values (α: one, γ: one per channel)
    scale: float = 1.0  # the GradScaler's scale that the gradient figures were divided by
    overflow: bool = False  # under a GradScaler, a gradient was not finite: the scaler skips the step

    @property
    def verdict(self) -> Verdict:
        return self.flow.verdict


@dataclass(frozen=True)
class VerdictChange:
    """The step from which a verdict held, with the reason and the layers that carry it."""

    step: int
    verdict: Verdict
    before: Verdict | None  # None at the first recorded step
    reason: str
    positions: tuple[int, ...]  # of the layers whose own verdict is ``verdict`` (0: nearest the input)
    layers: tuple[str, ...]  # their names; both empty when the verdict is 'healthy'
    recommendation: str | None = None  # the step's, as gradient_flow gives it (None when healthy)

    def __str__(self) -> str:
        where = ""
        if self.positions:
            n = len(self.positions)
            names = f"'{self.layers[0]}'" if n == 1 else f"'{self.layers[0]}' … '{self.layers[-1]}'"
            where = f" in {n} layer{'s' if n > 1 else ''}, {_ranges(self.positions)} ({names})"
        advice = f"; {self.recommendation}" if self.recommendation else ""
        return f"from step {self.step}: {self.verdict}{where}; {self.reason}{advice}"


@dataclass(frozen=True)
class VerdictTimeline:
    """The verdict at every recorded step, and the steps at which it changed."""

    steps: tuple[int, ...]
    verdicts: tuple[Verdict, ...]
    changes: tuple[VerdictChange, ...]  # the first record, then each step whose verdict differs
    skipped: tuple[int, ...] = ()  # steps left out: a GradScaler overflow (the scaler skips them)

    def at(self, step: int) -> Verdict | None:
        """The verdict of the last recorded step at or before ``step`` (None before the first)."""
        found: Verdict | None = None
        for s, v in zip(self.steps, self.verdicts):
            if s > step:
                break
            found = v
        return found

    @property
    def last(self) -> Verdict | None:
        return self.verdicts[-1] if self.verdicts else None

    def summary(self) -> str:
        """One line per change: 'from step 300: vanishing in 8 layers, 2–9 (…); why; what to try'."""
        if not self.changes:
            return "no step recorded"
        lines = [str(c) for c in self.changes]
        if self.skipped:
            lines.append(f"left out: {len(self.skipped)} step(s) whose gradients overflowed under the GradScaler")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True)
class FlowHistory:
    """What ``resify.watch`` recorded: one :class:`StepFlow` per recorded step."""

    model_class: str
    label: str  # the name plots and summaries give the run
    every: int
    records: tuple[StepFlow, ...]

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(r.step for r in self.records)

    @property
    def layers(self) -> tuple[str, ...]:
        """Every layer and gate name that some record holds, in forward order of first appearance."""
        names: dict[str, None] = {}
        for r in self.records:
            names.update((lf.name, None) for lf in r.flow.layers)
        return tuple(names)

    def series(self, layer: str, field: str = "input_grad_norm") -> list[float | None]:
        """One figure of one layer (a LayerFlow field) at every recorded step (None where absent)."""
        if field not in FIELDS:
            raise ResifyError(f"expected a figure among {', '.join(FIELDS)}, found {field!r}")
        out: list[float | None] = []
        for r in self.records:
            rec = next((lf for lf in r.flow.layers if lf.name == layer), None)
            out.append(None if rec is None else getattr(rec, field))
        return out

    @property
    def verdicts(self) -> VerdictTimeline:
        """The verdict per recorded step and the first step of each change (overflow steps left out)."""
        kept = [r for r in self.records if not r.overflow]
        changes: list[VerdictChange] = []
        for r in kept:
            before = changes[-1].verdict if changes else None
            if r.verdict == before:
                continue
            own = own_layers(r.flow.layers)
            carry = [(i, lf.name) for i, lf in enumerate(own) if r.verdict != "healthy" and lf.verdict == r.verdict]
            changes.append(
                VerdictChange(
                    step=r.step,
                    verdict=r.verdict,
                    before=before,
                    reason=r.flow.reason,
                    positions=tuple(i for i, _ in carry),
                    layers=tuple(n for _, n in carry),
                    recommendation=r.flow.recommendation,
                )
            )
        return VerdictTimeline(
            steps=tuple(r.step for r in kept),
            verdicts=tuple(r.verdict for r in kept),
            changes=tuple(changes),
            skipped=tuple(r.step for r in self.records if r.overflow),
        )

    def to_dict(self) -> dict[str, list]:
        """A dict of equal-length lists, one row per step × layer (``pandas.DataFrame(h.to_dict())``).

        Columns: step, layer, kind, depth, added, the figures of ``FIELDS``, verdict (the layer's),
        step_verdict, scale, overflow, and gate_value (a gate's value, the mean of γ's; None for layers).
        """
        columns = ["step", "layer", "kind", "depth", "added", *FIELDS, "verdict", "step_verdict", "scale", "overflow"]
        out: dict[str, list] = {c: [] for c in [*columns, "gate_value"]}
        for r in self.records:
            for lf in r.flow.layers:
                row = [r.step, lf.name, lf.kind, lf.depth, lf.added, *(getattr(lf, f) for f in FIELDS)]
                row += [lf.verdict, r.verdict, r.scale, r.overflow]
                for c, v in zip(columns, row):
                    out[c].append(v)
                values = r.gates.get(lf.name)
                out["gate_value"].append(sum(values) / len(values) if values else None)
        return out

    def to_json(self, indent: int | None = None) -> str:
        """The history as JSON: the table of ``to_dict`` and every gate's full values per step.

        ``{"schema_version": 2, "kind": "resify.watch", "model_class", "label", "every",
        "steps": [int], "verdicts": [str], "table": {column: [...]}, "gates": {name: [[float]]}}``;
        infinities and NaN are the strings "inf", "-inf", "nan", as in the report's JSON.
        """
        doc = {
            "schema_version": REPORT_SCHEMA_VERSION,
            "kind": "resify.watch",
            "model_class": self.model_class,
            "label": self.label,
            "every": self.every,
            "steps": list(self.steps),
            "verdicts": [r.verdict for r in self.records],
            "table": {k: [_jnum(v) if isinstance(v, float) else v for v in vs] for k, vs in self.to_dict().items()},
            "gates": {
                name: [[_jnum(v) for v in r.gates.get(name, ())] for r in self.records]
                for name in dict.fromkeys(n for r in self.records for n in r.gates)
            },
        }
        return json.dumps(doc, indent=indent, ensure_ascii=False, allow_nan=False)

    def plot(self, path: str | Path, beside: Sequence[FlowHistory] = ()) -> Path:
        """Draw a heatmap of layers × steps (log scale), the verdict band and the gates over time.

        ``beside``: other histories drawn to the right, on the same colour scale.
        """
        histories = [self, *beside]
        title = " | ".join(f"{h.label}: {h.verdicts.last or 'no step recorded'}" for h in histories)
        return history_plot.plot_histories(histories, path, title=f"gradient flow while training — {title}")

    def summary(self) -> str:
        """What was recorded and the verdict timeline."""
        steps = self.steps
        span = f"steps {steps[0]}–{steps[-1]}" if len(steps) > 1 else (f"step {steps[0]}" if steps else "no step")
        name = self.label if self.label == self.model_class else f"{self.label} ({self.model_class})"
        head = f"{name}: {len(steps)} record(s) every {self.every} backward(s), {span}"
        return head + "\n" + self.verdicts.summary()

    def __str__(self) -> str:
        return self.summary()


def _ranges(positions: Sequence[int]) -> str:
    """(2, 3, 4, 9) -> '2–4, 9'."""
    parts: list[str] = []
    start = prev = positions[0]
    for p in [*positions[1:], None]:
        if p is not None and p == prev + 1:
            prev = p
            continue
        parts.append(str(start) if start == prev else f"{start}–{prev}")
        if p is not None:
            start = prev = p
    return ", ".join(parts)
