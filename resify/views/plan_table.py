"""Views: the plan as an aligned text table (``Plan.__str__``, ``Plan.to_text``, the CLI).

It reads the shared cells and table layout of ``cells``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..formats import fmt_times
from .cells import site_cells, span_label, table, terminal_width

if TYPE_CHECKING:
    from ..planning.sites import Plan, Site

__all__ = ["plan_text", "gate_lines"]


def plan_text(plan: Plan, width: int | None = 100) -> str:
    """The plan as an aligned text table (sites, skipped with reasons, existing, totals), ``width``
    columns at most (None: :func:`terminal_width`); names and labels are cut only where they must be."""
    width = terminal_width() if width is None else width
    lines = textwrap.wrap(
        f"resify plan for {plan.model_class} ({plan.tracer} trace, {plan.n_layers} layers, "
        f"{plan.params_before:,} parameters)",
        width,
        subsequent_indent="  ",
    )
    if plan.existing:
        lines += ["", f"existing shortcuts ({len(plan.existing)}):"]
        for e in plan.existing:
            lines.append(_clip(f"  {e.kind} at {e.node} over {span_label(e.start, e.end)} ({e.bypass})", width))
    else:
        lines += ["", "existing shortcuts: none"]
    if plan.sites:
        rows = [site_cells(s) for s in plan.sites]
        lines += [
            "",
            *table(
                ["span", "shape", "shortcut", "gate", "+params"],
                rows,
                width=width,
                shrink=(0, 2),
                then=(1,),  # the shapes last, below ~58 columns
                right=[False, False, False, False, True],
                cut_end=(2,),
            ),
        ]
    else:
        lines += ["", "no shortcut will be added"]
    owners: dict[str, int] = {}
    for s in plan.sites:
        owners[s.owner] = owners.get(s.owner, 0) + 1
    if set(owners) - {""}:  # where the shortcuts live: the forwards resify rewrites
        shown = ", ".join(f"{o or '(the model itself)'} ({n})" for o, n in owners.items())
        lines += ["", *textwrap.wrap(f"forwards rewritten ({len(owners)}): {shown}", width, subsequent_indent="  ")]
    if plan.whole:
        lines += ["", f"kept whole ({len(plan.whole)}): their own forwards run as they are"]
        for w in plan.whole:
            lines.append(_clip(f"  {w.module or '(the model itself)'}: {w.code}: {w.reason}", width))
    lines += gate_lines(plan, width)
    if plan.skipped:
        lines += ["", f"skipped ({len(plan.skipped)}):"]
        for k in plan.skipped:
            lines.append(_clip(f"  {span_label(k.start, k.end)}: {k.reason}", width))
    for note in plan.notes:
        lines += ["", *textwrap.wrap("note: " + note, width, subsequent_indent="  ")]
    lines += ["", *textwrap.wrap("total: " + plan.summary(), width, subsequent_indent="  ")]
    return "\n".join(lines)


def gate_lines(plan: Plan, width: int) -> list[str]:
    """What gate='auto' chose and why: one paragraph per gate, rule and branch end, naming its sites
    (the figures of a rule read per site are given as their range); none where the gates were given."""
    groups: dict[tuple, list[Site]] = {}
    for s in plan.sites:
        r = s.gate_reason
        if r is not None:
            groups.setdefault((s.gate, s.gate_init, r.rule, r.branch, r.ends, r.sites, r.layers, r.detail), []).append(
                s
            )
    if not groups:
        return []
    lines = ["", f"gates chosen (gate='auto'): {_gate_counts(plan.sites)}"]
    for (gate, *_), sites in groups.items():
        values = [s.gate_reason.value for s in sites if s.gate_reason is not None and s.gate_reason.value is not None]
        low, high = (min(values), max(values)) if values else (None, None)
        figure = None if low == high else f"{fmt_times(low)} to {fmt_times(high)}"
        reason = sites[0].gate_reason
        assert reason is not None
        names = ", ".join(span_label(s.start, s.end) for s in sites[:3])
        names += f", … ({len(sites)} in all)" if len(sites) > 3 else ""
        said = f"{gate or 'none'} at {names}: {reason.words(figure)}"
        lines += textwrap.wrap(said, width, initial_indent="  ", subsequent_indent="    ")
    return lines


def _gate_counts(sites: Sequence[Site]) -> str:
    counts: dict[str, int] = {}
    for s in sites:
        counts[s.gate or "none"] = counts.get(s.gate or "none", 0) + 1
    return ", ".join(f"{k} at {n} site{'s' if n != 1 else ''}" for k, n in counts.items())


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"
