"""The forward signal (pure): how the activations' scale grows with depth, and whether the examples'
representations collapse into one.

``verdicts.judge`` reads a :class:`Signal` beside the gradient figures: a signal that grows by orders
of magnitude is 'exploding' (an un-gated conversion of a deep un-normalised net), one whose examples
all map to nearly the same vector is 'collapsing' (a deep stack without shortcuts or normalisation).
The thresholds are ``ACTIVATION_GROWTH`` and ``COLLAPSE_SIMILARITY`` in ``resify.constants``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..constants import ACTIVATION_GROWTH, COLLAPSE_SIMILARITY, Verdict
from ..formats import fmt_similarity, fmt_times
from .records import LayerFlow

__all__ = ["Signal", "signal_of", "own_layers"]


def own_layers(records: Sequence[LayerFlow]) -> list[LayerFlow]:
    """The model's own layers (not resify's projections, not gates), in forward order."""
    return [r for r in records if not r.added and r.kind != "Gate"]


@dataclass(frozen=True)
class Signal:
    """What the forward verdicts rest on, over the model's own layers (None: not measured)."""

    first: LayerFlow | None  # the first layer with an activation RMS above 0: the reference scale
    peak: LayerFlow | None  # the layer with the largest activation RMS
    entry: LayerFlow | None  # the first layer with an activation similarity
    output: LayerFlow | None  # the last layer with an activation similarity

    @property
    def growth(self) -> float | None:
        """The largest activation RMS ÷ the first layer's."""
        if self.first is None or self.peak is None:
            return None
        return self.peak.activation_rms / self.first.activation_rms  # type: ignore[operator]

    @property
    def exploding(self) -> bool:
        growth = self.growth
        return growth is not None and growth > ACTIVATION_GROWTH

    @property
    def collapsing(self) -> bool:
        """The output's examples are nearly one vector, where the first layer's were not."""
        return self.output is not None and self.layer_collapsed(self.output)

    def layer_collapsed(self, rec: LayerFlow) -> bool:
        sim, entry = rec.activation_similarity, self.entry
        if sim is None or entry is None or entry.activation_similarity is None:
            return False
        return sim > COLLAPSE_SIMILARITY >= entry.activation_similarity

    def layer_verdict(self, rec: LayerFlow) -> Verdict | None:
        """A layer's forward verdict: 'exploding' past the growth bound, 'collapsing', or None."""
        rms, first = rec.activation_rms, self.first
        if rms is not None and first is not None and rms / first.activation_rms > ACTIVATION_GROWTH:  # type: ignore[operator]
            return "exploding"
        return "collapsing" if self.layer_collapsed(rec) else None

    def growth_reason(self) -> str:
        """E.g. "activation RMS grows 333× (> 100×) from 'features.0' to 'classifier.0'"."""
        first, peak = self.first, self.peak
        where = f"from '{first.name}' to '{peak.name}'" if first and peak else ""
        return f"activation RMS grows {fmt_times(self.growth)} (> {ACTIVATION_GROWTH:g}×) {where}".strip()

    def collapse_reason(self) -> str:
        """E.g. "the examples' outputs are nearly one vector at 'head': mean cosine similarity 1 − 2.0e-09 …"."""
        out, entry = self.output, self.entry
        if out is None or entry is None:
            return ""
        return (
            f"the examples' outputs are nearly one vector at '{out.name}': mean cosine similarity "
            f"{fmt_similarity(out.activation_similarity)} (> {COLLAPSE_SIMILARITY:g}; "
            f"{fmt_similarity(entry.activation_similarity)} at '{entry.name}')"
        )


def signal_of(records: Sequence[LayerFlow]) -> Signal:
    """The forward figures of a report's records (its own layers only)."""
    own = own_layers(records)
    scaled = [r for r in own if r.activation_rms is not None and r.activation_rms > 0]
    similar = [r for r in own if r.activation_similarity is not None]
    return Signal(
        first=scaled[0] if scaled else None,
        peak=max(scaled, key=lambda r: r.activation_rms or 0.0) if scaled else None,
        entry=similar[0] if similar else None,
        output=similar[-1] if similar else None,
    )
