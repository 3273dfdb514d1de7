"""The report as text and Markdown: a gradient flow's table and a comparison's, before and after.

Part of the views: the report's ``to_text`` and ``to_markdown`` call into this module, which writes
the frozen records with the shared cells (``cells``) and computes nothing.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from ..formats import fmt_number
from .cells import (
    FLOW_HEADER,
    FLOW_HEADER_MD,
    added_figures,
    change_figures,
    flow_figures,
    kind_cell,
    md_row,
    output_scale,
    table,
)

if TYPE_CHECKING:
    from ..report import FlowComparison, GradientFlow

__all__ = ["flow_text", "flow_markdown", "comparison_text", "comparison_markdown"]


def _header(flow: GradientFlow, width: int) -> list[str]:
    own = sum(1 for r in flow.layers if not r.added)
    added = len(flow.layers) - own
    extra = f" (+{added} added by resify)" if added else ""
    batches = f"{flow.batches} batch" + ("es" if flow.batches != 1 else "")
    lines = textwrap.wrap(
        f"gradient flow of {flow.model_class}: {own} layers{extra}; loss {flow.loss} = "
        f"{fmt_number(flow.loss_value)}, {batches}",
        width,
        subsequent_indent="  ",
    )
    lines += textwrap.wrap(f"verdict: {flow.verdict}, {flow.reason}", width, subsequent_indent="  ")
    if flow.recommendation:
        lines += textwrap.wrap(f"recommendation: {flow.recommendation}", width, subsequent_indent="  ")
    return lines


def flow_text(flow: GradientFlow, width: int) -> str:
    header = ["#", "layer", "kind", *FLOW_HEADER, "verdict"]
    rows = [
        [str(r.depth), ("+" if r.added else "") + r.name, kind_cell(r.kind), *flow_figures(r), r.verdict]
        for r in flow.layers
    ]
    right = [True, False, False, True, True, True, True, True, True, False]
    # narrower than the full table: leave out the figures the verdict does not rest on, least used
    # first (‖g‖/‖w‖, ‖grad‖, act sim, act rms), before a layer's name is cut below 20 characters
    names = min(20, max(len(r[1]) for r in rows)) if rows else 0
    for drop in (None, 5, 4, 6, 5):
        if drop is not None:
            header, right = header[:drop] + header[drop + 1 :], right[:drop] + right[drop + 1 :]
            rows = [r[:drop] + r[drop + 1 :] for r in rows]
        body = table(header, rows, width=width, shrink=1, right=right)
        if max(map(len, body)) <= width and len(body[1].split("  ")[1]) >= names:
            break
    lines = [*_header(flow, width), "", *body]
    if any(r.added for r in flow.layers):
        lines.append("+ added by resify")
    return "\n".join(lines)


def flow_markdown(flow: GradientFlow) -> str:
    lines = [f"### Gradient flow of `{flow.model_class}`", "", f"**Verdict: {flow.verdict}**, {flow.reason}."]
    if flow.recommendation:
        lines += ["", f"Recommendation: {flow.recommendation}."]
    lines += [
        "",
        f"Loss: {flow.loss} = {fmt_number(flow.loss_value)} over {flow.batches} batch(es); "
        "layers marked *added* were inserted by resify.",
        "",
    ]
    lines.append(md_row(["#", "layer", "kind", *FLOW_HEADER_MD, "verdict"]))
    lines.append("|" + "---:|" + ":---|" * 2 + "---:|" * len(FLOW_HEADER_MD) + ":---|")
    for r in flow.layers:
        name = f"`{r.name}`" + (" *added*" if r.added else "")
        lines.append(md_row([str(r.depth), name, r.kind, *flow_figures(r), r.verdict]))
    return "\n".join(lines)


def comparison_text(c: FlowComparison, width: int) -> str:
    lines = textwrap.wrap(
        f"gradient flow: {c.before.model_class} → {c.after.model_class}", width, subsequent_indent="  "
    )
    lines.append(c.headline)
    scale = output_scale(c)
    if scale:
        lines += textwrap.wrap(scale, width, subsequent_indent="  ")
    for tag, flow in (("before", c.before), ("after", c.after)):
        lines += textwrap.wrap(f"{tag}: {flow.summary()}", width, subsequent_indent="  ")
    changes = _change_table(c, width, kinds=True)
    if any(len(line) > width for line in changes):  # too narrow: the kind column goes first
        changes = _change_table(c, width, kinds=False)
    lines += ["", *changes]
    if c.added:
        lines += ["", f"added by resify ({len(c.added)}):"]
        rows = [[r.name, kind_cell(r.kind), *added_figures(r)] for r in c.added]
        lines += table(
            ["layer", "kind", "mean|grad|", "‖grad‖", "‖input grad‖"],
            rows,
            width=width,
            shrink=0,
            right=[False, False, True, True, True],
        )
    if c.removed:
        lines += textwrap.wrap(f"only before: {', '.join(c.removed)}", width, subsequent_indent="  ")
    return "\n".join(lines)


def _change_table(c: FlowComparison, width: int, *, kinds: bool) -> list[str]:
    """The per-layer table of ``comparison_text``: its group labels over before/after/×, then the table."""
    header = ["layer", *(["kind"] if kinds else []), "before", "after", "×", "before", "after", "×"]
    rows = [[ch.name, *([kind_cell(ch.after.kind)] if kinds else []), *change_figures(ch)] for ch in c.layers]
    first = 2 if kinds else 1  # the column of the first 'before'
    groups = ("mean |grad| of weight", "‖input grad‖")
    # widen the 'before' columns so that each group label fits over its three columns
    mins = [0] * len(header)
    for k, label in enumerate(groups):
        at = first + 3 * k
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(at, at + 3)]
        mins[at] = max(widths[0], len(label) - widths[1] - widths[2] - 4)
    rendered = table(header, rows, width=width, shrink=0, right=[False] * first + [True] * 6, min_widths=mins)
    cols = rendered[1].split("  ")
    starts = [sum(len(x) + 2 for x in cols[:i]) for i in range(len(cols))]
    spans = [sum(len(x) for x in cols[i : i + 3]) + 4 for i in (first, first + 3)]
    group = " " * starts[first] + groups[0].center(spans[0]) + "  " + groups[1].center(spans[1])
    return [group.rstrip(), *rendered]


def comparison_markdown(c: FlowComparison) -> str:
    lines = [
        f"### Gradient flow: `{c.before.model_class}` → `{c.after.model_class}`",
        "",
        f"**{c.headline}**",
        "",
        *([f"- {output_scale(c)}"] if output_scale(c) else []),
        f"- before: {c.before.summary()}",
        f"- after: {c.after.summary()}",
        "",
        md_row(["layer", "kind", "mean abs grad before", "after", "ratio", "input grad norm before", "after", "ratio"]),
        "|:---|:---|" + "---:|" * 6,
    ]
    for ch in c.layers:
        lines.append(md_row([f"`{ch.name}`", ch.after.kind, *change_figures(ch)]))
    if c.added:
        lines += [
            "",
            f"Added by resify ({len(c.added)}):",
            "",
            md_row(["layer", "kind", "mean abs grad", "grad norm", "input grad norm"]),
            "|:---|:---|---:|---:|---:|",
        ]
        for r in c.added:
            lines.append(md_row([f"`{r.name}`", r.kind, *added_figures(r)]))
    if c.removed:
        lines += ["", "Only before: " + ", ".join(f"`{n}`" for n in c.removed)]
    return "\n".join(lines)
