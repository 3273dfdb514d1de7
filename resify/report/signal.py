"""The forward signal (pure): how the activations' scale grows with depth, and whether the examples'
representations collapse into one.

``verdicts.judge`` reads a :class:`Signal` beside the gradient figures: a signal that grows by orders
of magnitude is 'exploding' (an un-gated conversion of a deep un-normalised net), one that maps all
the examples, or all the positions of a sequence, to nearly the same vector at some layer is
'collapsing' (a deep stack without shortcuts: a Transformer's rank collapse).
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
    loudest: LayerFlow | None  # the layer with the largest activation RMS
    entry: LayerFlow | None  # the first layer with an activation similarity: the reference
    output: LayerFlow | None  # the last layer with an activation similarity
    #: the layers from which on, to the output, the outputs stay nearly one vector (empty: no collapse)
    collapsed: tuple[str, ...] = ()

    @property
    def growth(self) -> float | None:
        """The largest activation RMS ÷ the first layer's."""
        if self.first is None or self.loudest is None:
            return None
        return self.loudest.activation_rms / self.first.activation_rms  # type: ignore[operator]

    @property
    def exploding(self) -> bool:
        growth = self.growth
        return growth is not None and growth > ACTIVATION_GROWTH

    @property
    def collapsing(self) -> bool:
        """The output maps the examples (or positions) to nearly one vector, where the first layer did not.

        Only the output counts, and the layers before it that stay collapsed up to it: inside a healthy
        Transformer at initialisation an attention layer's positions are nearly one vector (the attention
        is nearly uniform), and the residual stream brings them apart again."""
        return bool(self.collapsed)

    def layer_verdict(self, rec: LayerFlow) -> Verdict | None:
        """A layer's forward verdict: 'exploding' past the growth bound, 'collapsing', or None."""
        rms, first = rec.activation_rms, self.first
        if rms is not None and first is not None and rms / first.activation_rms > ACTIVATION_GROWTH:  # type: ignore[operator]
            return "exploding"
        return "collapsing" if rec.name in self.collapsed else None

    def growth_reason(self) -> str:
        """E.g. "activation RMS grows 345× (> 100×) from 'features.0' to 'classifier.0'"."""
        first, loudest = self.first, self.loudest
        where = f"from '{first.name}' to '{loudest.name}'" if first and loudest else ""
        return f"activation RMS grows {fmt_times(self.growth)} (> {ACTIVATION_GROWTH:g}×) {where}".strip()

    def collapse_reason(self) -> str:
        """E.g. "from 'blocks.2.fc1' to 'head' every example (or position) gives nearly one vector: …"."""
        out, entry = self.output, self.entry
        if out is None or entry is None or not self.collapsed:
            return ""
        where = f"at '{out.name}'" if self.collapsed == (out.name,) else f"from '{self.collapsed[0]}' to '{out.name}'"
        return (
            f"{where} every example (or position) gives nearly one vector: "
            f"similarity {fmt_similarity(out.activation_similarity)} at '{out.name}' "
            f"(> {COLLAPSE_SIMILARITY:g}; {fmt_similarity(entry.activation_similarity)} at '{entry.name}')"
        )


def signal_of(records: Sequence[LayerFlow]) -> Signal:
    """The forward figures of a report's records (its own layers only)."""
    own = own_layers(records)
    scaled = [r for r in own if r.activation_rms is not None and r.activation_rms > 0]
    similar = [r for r in own if r.activation_similarity is not None]
    entry = similar[0] if similar else None
    collapsed: list[str] = []
    if (
        entry is not None
        and entry.activation_similarity is not None
        and entry.activation_similarity <= COLLAPSE_SIMILARITY
    ):
        for r in reversed(similar):
            if r.activation_similarity is None or r.activation_similarity <= COLLAPSE_SIMILARITY:
                break
            collapsed.insert(0, r.name)
    return Signal(
        first=scaled[0] if scaled else None,
        loudest=max(scaled, key=lambda r: r.activation_rms or 0.0) if scaled else None,
        entry=entry,
        output=similar[-1] if similar else None,
        collapsed=tuple(collapsed),
    )
