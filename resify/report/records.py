"""The report's records: the gradient flow of one model, the comparison of two, and their JSON.

Frozen dataclasses that ``measure.gradient_flow`` and ``verdicts.compare`` fill in; they print
through ``resify.views.tables`` (and ``plots``) and read back from JSON (the schema is in docs/report.md, "The report
as JSON"; ``null`` is "not measured", infinities and NaN are the strings "inf", "-inf", "nan").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ..constants import (
    ABS_EXPLODING,
    ABS_VANISHING,
    ACTIVATION_GROWTH,
    COLLAPSE_SIMILARITY,
    EXPLODING_RATIO,
    REPORT_SCHEMA_VERSION,
    VANISHING_RATIO,
    VERDICTS,
    Verdict,
)
from ..errors import ResifyError
from ..views import plots, tables

__all__ = ["LayerFlow", "GradientFlow", "LayerChange", "FlowComparison"]


@dataclass(frozen=True)
class LayerFlow:
    """The gradient figures of one parametric layer (or one resify gate)."""

    name: str  # qualified module name, "layers.0.0"; for a gate the parameter's, "layers.0.resify.0.alpha"
    kind: str  # "Linear", "Conv2d", …, or "Gate"
    depth: int  # position in forward order, from 0, counting every record
    added: bool  # inserted by resify (under the "resify." namespace)
    shape: tuple[int, ...]  # of the weight (or gate)
    mean_abs_grad: float | None  # mean |grad| of the weight: the seed's print_gradients figure
    grad_norm: float | None  # L2 norm of the weight gradient
    grad_to_weight: float | None  # grad_norm / L2 norm of the weight (None where the weight is zero)
    input_grad_norm: float | None  # L2 norm of the gradient arriving at the layer's input
    activation_rms: float | None  # root mean square of the layer's output
    verdict: Verdict = "healthy"
    #: how alike the outputs of the batch's examples are, 1: one vector (``figures.activation_figures``)
    activation_similarity: float | None = None

    @property
    def flow(self) -> float | None:
        """The figure the verdict is judged on: ``input_grad_norm``, else ``grad_norm``."""
        return self.input_grad_norm if self.input_grad_norm is not None else self.grad_norm

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "depth": self.depth,
            "added": self.added,
            "shape": list(self.shape),
            "mean_abs_grad": _jnum(self.mean_abs_grad),
            "grad_norm": _jnum(self.grad_norm),
            "grad_to_weight": _jnum(self.grad_to_weight),
            "input_grad_norm": _jnum(self.input_grad_norm),
            "activation_rms": _jnum(self.activation_rms),
            "activation_similarity": _jnum(self.activation_similarity),
            "verdict": self.verdict,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerFlow:
        return cls(
            name=d["name"],
            kind=d["kind"],
            depth=int(d["depth"]),
            added=bool(d["added"]),
            shape=tuple(d["shape"]),
            mean_abs_grad=_pnum(d["mean_abs_grad"]),
            grad_norm=_pnum(d["grad_norm"]),
            grad_to_weight=_pnum(d["grad_to_weight"]),
            input_grad_norm=_pnum(d["input_grad_norm"]),
            activation_rms=_pnum(d["activation_rms"]),
            verdict=_verdict(d["verdict"]),
            activation_similarity=_pnum(d.get("activation_similarity")),  # (schema 1 has none)
        )


@dataclass(frozen=True)
class GradientFlow:
    """How the gradient flows through a model: one :class:`LayerFlow` per layer, and a verdict."""

    model_class: str
    layers: tuple[LayerFlow, ...]
    verdict: Verdict
    reason: str  # one line: the figure the verdict rests on
    recommendation: str | None  # one line, for a verdict other than 'healthy' (None: nothing to try)
    first_to_last: float | None  # flow(first) / flow(last) over the model's own layers
    loss: str  # "mse to zeros", "mse to target", "cross-entropy to target" or "loss_fn"
    loss_value: float
    batches: int = 1
    seed: int = 0
    activation_growth: float | None = None  # the largest activation RMS ÷ the first layer's (own layers)
    output_similarity: float | None = None  # activation_similarity of the last own layer that has one

    @property
    def last_flow(self) -> float | None:
        """The flow every ratio is taken against: the last judged layer's (``judged_layers``), as the
        verdict's first/last, the watch heatmap and the charts read it; None where none has one."""
        judged = judged_layers(self.layers)
        return judged[-1].flow if judged else None

    def layer(self, name: str) -> LayerFlow:
        """The record called ``name``; raises ResifyError listing some names when there is none."""
        for rec in self.layers:
            if rec.name == name:
                return rec
        known = ", ".join(r.name for r in self.layers[:8]) + (", …" if len(self.layers) > 8 else "")
        raise ResifyError(f"no layer named '{name}' in this report; expected one of {known}")

    def to_dict(self) -> dict:
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "kind": "resify.gradient_flow",
            "model_class": self.model_class,
            "loss": self.loss,
            "batches": self.batches,
            "seed": self.seed,
            "loss_value": _jnum(self.loss_value),
            "verdict": self.verdict,
            "reason": self.reason,
            "recommendation": self.recommendation,
            "first_to_last": _jnum(self.first_to_last),
            "activation_growth": _jnum(self.activation_growth),
            "output_similarity": _jnum(self.output_similarity),
            "thresholds": _thresholds(),
            "layers": [r.to_dict() for r in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (schema: docs/report.md, "The report as JSON")."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GradientFlow:
        _check_schema(d, "resify.gradient_flow")
        return cls(
            model_class=d["model_class"],
            layers=tuple(LayerFlow.from_dict(r) for r in d["layers"]),
            verdict=_verdict(d["verdict"]),
            reason=d["reason"],
            recommendation=d["recommendation"],
            first_to_last=_pnum(d["first_to_last"]),
            loss=d["loss"],
            loss_value=float(d["loss_value"]),
            batches=int(d["batches"]),
            seed=int(d["seed"]),
            activation_growth=_pnum(d.get("activation_growth")),
            output_similarity=_pnum(d.get("output_similarity")),
        )

    @classmethod
    def from_json(cls, text: str) -> GradientFlow:
        """Read back what :meth:`to_json` wrote."""
        return cls.from_dict(_loads(text))

    def summary(self) -> str:
        """One line: verdict, why, and what to try."""
        out = f"{self.verdict}: {self.reason}"
        return out + (f"; {self.recommendation}" if self.recommendation else "")

    def to_text(self, width: int = 100) -> str:
        """An aligned table for a terminal, ``width`` columns at most."""
        return tables.flow_text(self, width)

    def to_markdown(self) -> str:
        """A Markdown section: verdict, recommendation and the table with every figure."""
        return tables.flow_markdown(self)

    def plot(self, path: str | Path) -> Path:
        """Draw the flow against depth (log scale, bands shaded) into a .png or .svg file."""
        return plots.plot_flows([("", self)], path, title=f"{self.model_class}: {self.summary()}")

    def to_html(self, page: bool = True) -> str:
        """The verdict, the chart (inline SVG) and every figure: a self-contained HTML page, or a notebook fragment."""
        from ..views.html import flow_html  # html imports these records for typing only

        return flow_html(self, page=page)

    def _repr_html_(self) -> str:
        return self.to_html(page=False)

    def __str__(self) -> str:
        return self.to_text()


@dataclass(frozen=True)
class LayerChange:
    """One layer present before and after: both records and the ratios after ÷ before."""

    before: LayerFlow
    after: LayerFlow

    @property
    def name(self) -> str:
        return self.after.name

    @property
    def ratio(self) -> float | None:
        """after ÷ before of ``mean_abs_grad`` (None where it is undefined)."""
        return _ratio(self.after.mean_abs_grad, self.before.mean_abs_grad)

    @property
    def input_ratio(self) -> float | None:
        """after ÷ before of ``input_grad_norm``."""
        return _ratio(self.after.input_grad_norm, self.before.input_grad_norm)

    @property
    def activation_ratio(self) -> float | None:
        """after ÷ before of ``activation_rms``."""
        return _ratio(self.after.activation_rms, self.before.activation_rms)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.after.kind,
            "before_mean_abs_grad": _jnum(self.before.mean_abs_grad),
            "after_mean_abs_grad": _jnum(self.after.mean_abs_grad),
            "ratio": _jnum(self.ratio),
            "before_input_grad_norm": _jnum(self.before.input_grad_norm),
            "after_input_grad_norm": _jnum(self.after.input_grad_norm),
            "input_ratio": _jnum(self.input_ratio),
        }


@dataclass(frozen=True)
class FlowComparison:
    """Two gradient-flow reports side by side, layers matched by name."""

    before: GradientFlow
    after: GradientFlow
    layers: tuple[LayerChange, ...]  # in the order of ``before``
    added: tuple[LayerFlow, ...]  # only in ``after`` (resify's projections and gates)
    removed: tuple[str, ...]  # only in ``before``
    headline: str  # "first layer: 412× more gradient; verdict vanishing → healthy"
    first_layer_ratio: float | None = field(default=None)  # mean_abs_grad after ÷ before, first layer

    @property
    def output_change(self) -> LayerChange | None:
        """The last of the model's own layers whose activation RMS both reports measured: the output."""
        own = [c for c in self.layers if not c.after.added and c.after.kind != "Gate"]
        return next((c for c in reversed(own) if c.activation_ratio is not None), None)

    @property
    def output_ratio(self) -> float | None:
        """How the output's scale changed: its activation RMS after ÷ before (``output_change``)."""
        change = self.output_change
        return None if change is None else change.activation_ratio

    def to_dict(self) -> dict:
        change = self.output_change
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "kind": "resify.flow_comparison",
            "headline": self.headline,
            "first_layer_ratio": _jnum(self.first_layer_ratio),
            "output_layer": None if change is None else change.name,
            "output_ratio": _jnum(self.output_ratio),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "layers": [c.to_dict() for c in self.layers],
            "added": [r.name for r in self.added],
            "removed": list(self.removed),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The comparison as JSON (schema: docs/report.md, "The report as JSON")."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> FlowComparison:
        """Read back what :meth:`to_json` wrote."""
        d = _loads(text)
        _check_schema(d, "resify.flow_comparison")
        before, after = GradientFlow.from_dict(d["before"]), GradientFlow.from_dict(d["after"])
        return cls(
            before=before,
            after=after,
            layers=tuple(LayerChange(before.layer(c["name"]), after.layer(c["name"])) for c in d["layers"]),
            added=tuple(after.layer(name) for name in d["added"]),
            removed=tuple(d["removed"]),
            headline=d["headline"],
            first_layer_ratio=_pnum(d["first_layer_ratio"]),
        )

    def to_text(self, width: int = 100) -> str:
        """Headline, both verdicts, and before/after/ratio per layer, ``width`` columns at most."""
        return tables.comparison_text(self, width)

    def to_markdown(self) -> str:
        return tables.comparison_markdown(self)

    def plot(self, path: str | Path) -> Path:
        """Draw both flows against depth (log scale, bands shaded) into a .png or .svg file."""
        return plots.plot_flows(
            [("before", self.before), ("after", self.after)], path, title=f"{self.before.model_class}: {self.headline}"
        )

    def to_html(self, page: bool = True) -> str:
        """Headline, verdicts, chart (inline SVG) and before/after per layer: an HTML page, or a notebook fragment."""
        from ..views.html import comparison_html  # html imports these records for typing only

        return comparison_html(self, page=page)

    def _repr_html_(self) -> str:
        return self.to_html(page=False)

    def __str__(self) -> str:
        return self.to_text()


# JSON


def judged_layers(records: Sequence[LayerFlow]) -> list[LayerFlow]:
    """The layers the gradient verdict compares, in forward order: the model's own (not resify's, not
    a gate) with an input gradient; where no layer input carries one (token ids into embeddings
    only), those with a weight gradient."""
    own = [r for r in records if not r.added and r.kind != "Gate" and r.input_grad_norm is not None]
    return own or [r for r in records if not r.added and r.kind != "Gate" and r.flow is not None]


def _ratio(a: float | None, b: float | None) -> float | None:
    """a ÷ b, or None where either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def _jnum(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _pnum(x: Any) -> float | None:
    return None if x is None else float(x)


def _thresholds() -> dict[str, float]:
    return {
        "vanishing_ratio": VANISHING_RATIO,
        "exploding_ratio": EXPLODING_RATIO,
        "abs_vanishing": ABS_VANISHING,
        "abs_exploding": ABS_EXPLODING,
        "activation_growth": ACTIVATION_GROWTH,
        "collapse_similarity": COLLAPSE_SIMILARITY,
    }


def _loads(text: str) -> dict:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResifyError(f"expected a resify report in JSON, found invalid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ResifyError(f"expected a JSON object, found {type(d).__name__}")
    return d


def _check_schema(d: Mapping[str, Any], kind: str) -> None:
    """A report of ``kind`` and of this schema or an older one (whose missing figures read as None)."""
    version = d.get("schema_version")
    if d.get("kind") == kind and isinstance(version, int) and version > REPORT_SCHEMA_VERSION:
        raise ResifyError(
            f"expected a '{kind}' report of schema_version {REPORT_SCHEMA_VERSION} or older, found {version}: "
            f"it was written by a newer resify; upgrade resify to one that reads schema {version}"
        )
    if d.get("kind") != kind or isinstance(version, bool) or version not in range(1, REPORT_SCHEMA_VERSION + 1):
        raise ResifyError(
            f"expected a '{kind}' report of schema_version 1 to {REPORT_SCHEMA_VERSION}, found "
            f"kind={d.get('kind')!r} schema_version={version!r}; re-create it with this resify"
        )


def _verdict(value: Any) -> Verdict:
    if value not in VERDICTS:
        raise ResifyError(f"expected a verdict among {', '.join(VERDICTS)}, found {value!r}; re-create the report")
    return cast(Verdict, value)
