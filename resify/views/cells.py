"""The cells every view shares: how a layer's figures, a site and a span are written in a table
cell, and the aligned text table itself.

Part of the views: the text and Markdown tables (``tables``), the plan's table
(``plan_table``) and the HTML pages (``html``) write their rows with these, so a figure reads the
same everywhere; it computes nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..formats import fmt_number, fmt_shape, fmt_similarity, fmt_times

if TYPE_CHECKING:
    from ..planning.sites import Site
    from ..report import FlowComparison, LayerChange, LayerFlow

__all__ = [
    "FLOW_HEADER",
    "FLOW_HEADER_MD",
    "flow_figures",
    "change_figures",
    "added_figures",
    "site_cells",
    "kind_cell",
    "span_label",
    "table",
    "md_row",
    "output_scale",
    "terminal_width",
]


#: the headers of ``flow_figures``' columns in the text and HTML tables, and in Markdown
FLOW_HEADER = ("mean|grad|", "‖grad‖", "‖g‖/‖w‖", "‖input grad‖", "act rms", "act sim")
FLOW_HEADER_MD = ("mean abs grad", "grad norm", "grad/weight", "input grad norm", "activation RMS", "act similarity")


def flow_figures(r: LayerFlow) -> list[str]:
    """One layer's figures as every table shows them: mean |grad|, ‖grad‖, ‖g‖/‖w‖, ‖input grad‖, act rms,
    and act sim (how alike the examples' outputs are: ``figures.activation_figures``)."""
    figures = (r.mean_abs_grad, r.grad_norm, r.grad_to_weight, r.input_grad_norm, r.activation_rms)
    return [*(fmt_number(x) for x in figures), fmt_similarity(r.activation_similarity)]


def change_figures(ch: LayerChange) -> list[str]:
    """One layer before and after: mean |grad| before, after, ×; ‖input grad‖ before, after, ×."""
    b, a = ch.before, ch.after
    return [
        fmt_number(b.mean_abs_grad),
        fmt_number(a.mean_abs_grad),
        fmt_times(ch.ratio),
        fmt_number(b.input_grad_norm),
        fmt_number(a.input_grad_norm),
        fmt_times(ch.input_ratio),
    ]


def added_figures(r: LayerFlow) -> list[str]:
    """A layer resify added, in a comparison: mean |grad|, ‖grad‖, ‖input grad‖."""
    return [fmt_number(x) for x in (r.mean_abs_grad, r.grad_norm, r.input_grad_norm)]


def site_cells(s: Site) -> list[str]:
    """One site as the plan tables show it: span, shapes, shortcut, gate, added parameters."""
    return [
        span_label(s.start, s.end),
        f"{fmt_shape(s.in_shape)} -> {fmt_shape(s.out_shape)}",
        s.kind if s.projection is None else s.projection,
        s.gate or "-",
        f"{s.added_params:,}",
    ]


def kind_cell(kind: str, width: int = 14) -> str:
    """A module class name for a table column: 'NonDynamicall…' beyond ``width``."""
    return kind if len(kind) <= width else kind[: width - 1] + "…"


def _shorten(name: str, width: int) -> str:
    """Fit a name into ``width`` characters by cutting its start (the end names the layer)."""
    if len(name) <= width:
        return name
    if name.startswith("+"):  # keep the 'added' mark
        return "+" + _shorten(name[1:], width - 1)
    return "…" + name[len(name) - width + 1 :]


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int,
    shrink: int | Sequence[int],
    right: Sequence[bool],
    min_widths: Sequence[int] = (),
    cut_end: Sequence[int] = (),
    then: Sequence[int] = (),
) -> list[str]:
    """Aligned columns two spaces apart, cut to fit ``width``: the ``shrink`` columns in turn (each
    down to 20 characters or its header, the last one further), then, where that is not enough,
    the ``then`` columns and after them the ``shrink`` ones in turn down to their headers; at their
    start (the end of a layer name names it) or, for the ``cut_end`` columns, at their end."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, w in enumerate(min_widths):
        widths[i] = max(widths[i], w)
    order = [shrink] if isinstance(shrink, int) else list(shrink)
    floors = [max(len(header[c]), 20) for c in order[:-1]] + [len(header[order[-1]])]
    for c, floor in [*zip(order, floors), *((c, len(header[c])) for c in (*then, *order))]:
        over = sum(widths) + 2 * (len(widths) - 1) - width
        if over <= 0:
            break
        widths[c] = max(min(floor, widths[c]), widths[c] - over)

    def cut(c: str, w: int, i: int) -> str:
        return kind_cell(c, w) if i in cut_end else _shorten(c, w)

    fmt = lambda r: "  ".join(
        (cut(c, w, i).rjust(w) if al else cut(c, w, i).ljust(w)) for i, (c, w, al) in enumerate(zip(r, widths, right))
    ).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]]


def span_label(start: str, end: str) -> str:
    return start if start == end else f"{start} … {end}"


def md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def output_scale(c: FlowComparison) -> str | None:
    """E.g. "output scale: activation RMS of 'fc' 7.25e-02 → 9.84e+01, 1,357× the original's" (None: not measured)."""
    ch = c.output_change
    if ch is None:
        return None
    b, a = fmt_number(ch.before.activation_rms), fmt_number(ch.after.activation_rms)
    return f"output scale: activation RMS of '{ch.name}' {b} → {a}, {fmt_times(c.output_ratio)} the original's"


def terminal_width(fallback: int = 100) -> int:
    """The terminal's width: ``COLUMNS`` if set, else the terminal's own, else ``fallback`` (a pipe)."""
    return shutil.get_terminal_size((fallback, 24)).columns
