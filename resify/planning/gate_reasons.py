"""Why ``gate='auto'`` gave a site its gate: the rule that decided it and the figures it read.

Part of stage 3 (planning): ``gating`` writes a ``GateReason`` on each site it decides, the plan's
table prints its ``text`` (grouped by ``views.plan_table``), and ``Site.to_dict`` writes it; the
rules themselves are in ``gating``'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..constants import AUTO_GROWTH, AUTO_OUTWEIGHS, AUTO_RATE, AUTO_SHRINK, DEEP_LAYERS
from ..formats import fmt_times

__all__ = ["GateRule", "GATE_RULES", "GateReason"]


GateRule = Literal[
    "outweighs",  # a gate: ungated, the site would grow the signal its shortcut carries past AUTO_OUTWEIGHS
    "compounds",  # a gate: no norm ends the branches of a deep net, and ungated their shortcuts compound
    "normalised",  # none: a norm ends the branch, which adds its own fixed scale
    "shallow",  # none: no norm ends the branches, but the net is shallow or they grow the signal little
    "dense",  # none: a dense shortcut keeps the branch's output whole
    "preserve_output",  # none: β = 0 on the shortcut keeps the output; a gate would start at 1
    "unmeasured",  # no forward could run (meta tensors): decided from the branches' contents alone
]
GATE_RULES: tuple[GateRule, ...] = get_args(GateRule)


@dataclass(frozen=True)
class GateReason:
    """Why ``gate='auto'`` gave a site its gate: a stable ``rule`` and the figures it read.

    ``value`` is, for "outweighs" and "normalised", how much the site, ungated, grows the mean square
    its shortcut carries, ``E[(F + S)²] / E[S²]`` (as the converted model computes them on the
    example); for "compounds" and "shallow", how much the ``sites`` sites whose branches no norm ends,
    ungated, grow the signal's mean square together (the product of their gains ``E[(F + S)²] /
    E[x²]``), in a net of ``layers`` layers. ``text`` words it; the rules are in ``resify.planning.gating``.
    """

    rule: GateRule
    branch: str = ""  # "norm" (a norm fixes the branch's scale), "bounded" (Tanh, an LSTM) or "plain"
    ends: str = ""  # the op that ends the branch: a norm ("LayerNorm"), "LSTM", "Tanh", "ReLU", …
    value: float | None = None
    sites: int = 0
    layers: int = 0
    detail: str = ""  # "unmeasured": why no forward ran
    #: rule 4: where the gate starts (beside a shortcut that shrinks its input), and the output's mean
    #: square over the original's had it started at 0; None where it starts at 0 (or gate_init)
    start: float | None = None
    shrunk: float | None = None

    @property
    def text(self) -> str:
        """E.g. "the branch (LayerNorm) outweighs its shortcut: ungated, the site would grow …"."""
        return self.words()

    @property
    def starts(self) -> str:
        """Where the gate starts, and why (rule 4: beside a shortcut that shrinks its input)."""
        if self.start is None:
            return "the gate starts at 0"
        return (
            f"the gate starts at {self.start:g}: at 0, beside shortcuts that shrink their input (a fresh "
            f"projection, a pool, a slice), these gates would leave the output's mean square {fmt_times(self.shrunk)} "
            f"the original's (below 1/{AUTO_SHRINK:g}); {self.start:g} keeps it"
        )

    def words(self, figure: str | None = None) -> str:
        """``text``, with ``figure`` in place of ``value`` where given (a range: "3.0× to 5.8×")."""
        v = fmt_times(self.value) if figure is None else figure
        if self.rule == "outweighs":
            return (
                f"the branch ({self.ends}) outweighs its shortcut: ungated, the site would grow the mean square "
                f"its shortcut carries {v} (more than {AUTO_OUTWEIGHS:g}×) and not start near the identity; "
                f"{self.starts}"
            )
        if self.rule == "normalised":
            return (
                f"{self.ends} ends the branch: it adds its own fixed scale (the site grows its shortcut's mean "
                f"square {v}), so the signal grows by addition, not by compounding"
            )
        per_site = fmt_times(self.value ** (1 / self.sites)) if self.value and self.sites and figure is None else ""
        rate = f", {per_site} a site" if per_site else ""
        depth = f"{self.sites} sites whose branches no norm ends and do not outweigh, in {self.layers} layers"
        limit = f"a gate past {AUTO_GROWTH:g}×, in a net of {DEEP_LAYERS} layers or more or at {AUTO_RATE:g}× a site"
        if self.rule == "compounds":
            return (
                f"no norm ends the branch ({self.ends}): ungated, the shortcuts of the {depth}, would compound, "
                f"scaling the signal's mean square by {v}{rate} ({limit}); {self.starts}"
            )
        if self.rule == "shallow":
            return (
                f"no norm ends the branch ({self.ends}), but ungated the shortcuts of the {depth}, scale the "
                f"signal's mean square by {v}{rate} ({limit})"
            )
        if self.rule == "dense":
            return "a dense shortcut keeps the branch's output whole"
        if self.rule == "preserve_output":
            return "preserve_output: β = 0 on the shortcut keeps the output; a gate would start at 1"
        return (
            f"not measured ({self.detail}): decided from the branch ({self.ends or 'unknown'}) and the depth "
            f"({self.layers} layers): a gate where no norm ends it in a net of {DEEP_LAYERS} layers or more"
        )
