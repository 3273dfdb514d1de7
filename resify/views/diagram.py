"""The architecture diagram: a plan drawn as SVG, the layers in forward order and the shortcuts as arcs.

One of the views, with ``cells`` and ``html``: it draws a frozen :class:`~resify.Plan` and computes
nothing about the model. Each layer is a row; the shortcuts resify adds are arcs on the right of the
chain, coloured by kind (identity, projection, pooled, dense; a gate or β is a knob on the arc), the
model's existing shortcuts are grey arcs on the left, and skipped layers carry a mark. Every row, arc
and mark has a tooltip (an SVG ``<title>``: name, shapes, added parameters, skip reason). Nested or
overlapping arcs move outwards, so a DenseNet block's 24 concatenations stay apart; a long model
scrolls (the page gives the picture a scroll box), so a 1,000-layer MLP is 1,000 legible rows.

The SVG is plain markup whose look is in presentation attributes (no script, no style sheet, no
external font): it renders the same offline, in a notebook (even one that strips ``<style>``), in a
page, and on its own as a ``.svg`` file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING

from ..formats import fmt_shape
from .cells import span_label as _span  # "first … last", as the text tables write a span

if TYPE_CHECKING:
    from ..analysis.analyze import ExistingShortcut
    from ..planning.sites import Plan, Site

__all__ = ["COLOURS", "KIND_NAMES", "site_category", "layer_order", "architecture_svg"]

#: stroke colour of each kind of arc or mark (the legend reads this too).
COLOURS: dict[str, str] = {
    "identity": "#15803d",
    "projection": "#1d4ed8",
    "pooled": "#7e22ce",
    "dense": "#c2410c",
    "gate": "#be185d",
    "existing": "#64748b",
    "skipped": "#94a3b8",
}
#: what each colour means, as the legend writes it.
KIND_NAMES: dict[str, str] = {
    "identity": "identity shortcut (new)",
    "projection": "projection to the new shape (new)",
    "pooled": "pooled shortcut (new)",
    "dense": "dense concatenation (new)",
    "gate": "gate α/γ or β on a new shortcut",
    "existing": "shortcut the model already has",
    "skipped": "candidate skipped (reason in its tooltip)",
}

_ROW = 22  # px per layer
_BOX = 18  # height of a layer's box
_CHAR = 6.7  # px per character of the 11px monospace label
_STEP = 9  # px between nested arcs
_PAD = 14  # px between the chain and the first arc
_TOP = 26  # room for "input" above the first row
_MAX_NAME = 48  # characters of a name shown in its box (the tooltip has it whole)
_ZOOM = 1.3  # a picture of at most _ZOOM_ROWS rows is shown this much larger (a 5-layer net is small)
_ZOOM_ROWS = 30


def site_category(site: Site) -> str:
    """The colour class of a new shortcut: "identity", "projection", "pooled" or "dense"."""
    if site.kind != "projection":
        return site.kind
    form = site.shortcut  # a Projection (read by field: this module imports the records for typing only)
    return "pooled" if getattr(form, "op", "") == "pool" or getattr(form, "pool", False) else "projection"


def layer_order(plan: Plan) -> list[str]:
    """The plan's layers in forward order: ``plan.layers``, or for a plan read from JSON written before
    resify recorded it, the names in the order the plan first mentions them (sites, skips, existing)."""
    if plan.layers:
        return list(plan.layers)
    seen: dict[str, None] = {}
    for site in plan.sites:
        seen.update(dict.fromkeys(site.layers))
    for skip in plan.skipped:
        seen.update(dict.fromkeys((skip.start, skip.end)))
    for e in plan.existing:
        seen.update(dict.fromkeys(e.layers))
    return list(seen)


@dataclass(frozen=True)
class _Arc:
    first: int  # row of the span's first layer
    last: int  # row of its last layer
    side: str  # "new" (right of the chain) or "existing" (left)
    css: str  # classes beside "arc": "site KIND" or "existing add|concat" (the colour, the dashes)
    tip: str
    knob: str = ""  # "α", "γ", "β" or "" (a gate or β on the shortcut)


def _text(s: str) -> str:
    """Text content of an element (quotes need no escaping there)."""
    return escape(s, quote=False)


def _short(name: str) -> str:
    return name if len(name) <= _MAX_NAME else "…" + name[len(name) - _MAX_NAME + 1 :]


def _site_arc(site: Site, rows: Mapping[str, int]) -> _Arc | None:
    if site.start not in rows or site.end not in rows:
        return None
    category = site_category(site)
    label = site.kind if site.projection is None else f"{site.kind}: {site.projection}"
    extras = [f"gate {site.gate} (starts at {site.gate_init:g})" if site.gate and site.gate_init is not None else ""]
    extras.append("β = 0 at start: outputs unchanged" if site.preserve_output else "")
    tip = "\n".join(
        line
        for line in (
            f"new shortcut '{site.name}' ({label})",
            f"around {_span(site.start, site.end)}",
            f"{fmt_shape(site.in_shape)} → {fmt_shape(site.out_shape)}",
            f"+{site.added_params:,} parameters",
            *extras,
        )
        if line
    )
    knob = {"rezero": "α", "layerscale": "γ"}.get(site.gate or "", "β" if site.preserve_output else "")
    return _Arc(rows[site.start], rows[site.end], "new", f"site {category}", tip, knob)


def _existing_arc(e: ExistingShortcut, rows: Mapping[str, int]) -> _Arc | None:
    inside = [rows[n] for n in (*e.layers, e.start, e.end) if n in rows]
    if not inside:
        return None
    tip = f"existing {e.kind} at '{e.node}' ({e.bypass} bypass)\naround {_span(e.start, e.end)}"
    return _Arc(min(inside), max(inside), "existing", f"existing {e.kind}", tip)


def _levels(arcs: Sequence[_Arc], n_rows: int) -> list[int]:
    """How far out each arc goes (1 = next to the chain): an arc passes every arc it contains or overlaps
    that is shorter, so nested arcs stay apart and the shortest hug the chain."""
    levels = [0] * len(arcs)
    used = {"new": [0] * n_rows, "existing": [0] * n_rows}
    for i in sorted(range(len(arcs)), key=lambda i: (arcs[i].last - arcs[i].first, arcs[i].first)):
        a, row_levels = arcs[i], used[arcs[i].side]
        levels[i] = 1 + max(row_levels[a.first : a.last + 1])
        row_levels[a.first : a.last + 1] = [levels[i]] * (a.last - a.first + 1)
    return levels


def _rows(plan: Plan, order: Sequence[str], notes: Mapping[str, str]) -> tuple[list[str], list[str], set[int]]:
    """Per row: its tooltip, its shape text ("[10, 128] → [10, 64]" where a site knows it); and the rows
    inside a new shortcut."""
    shapes = [""] * len(order)
    covered: set[int] = set()
    rows = {name: i for i, name in enumerate(order)}
    for site in plan.sites:
        if site.start in rows and site.end in rows:
            first, last = rows[site.start], rows[site.end]
            shapes[first] = fmt_shape(site.in_shape) + " → " + (fmt_shape(site.out_shape) if first == last else "…")
            if last != first:
                shapes[last] = "… → " + fmt_shape(site.out_shape)
            covered.update(range(first, last + 1))
    tips = ["\n".join(t for t in (name, shapes[r], notes.get(name, "")) if t) for r, name in enumerate(order)]
    return tips, shapes, covered


def _skip_marks(plan: Plan, rows: Mapping[str, int]) -> dict[int, list[str]]:
    """Row of each skipped candidate's first layer → the reasons (a row may be skipped for several)."""
    marks: dict[int, list[str]] = {}
    for s in plan.skipped:
        if s.start in rows:
            marks.setdefault(rows[s.start], []).append(f"skipped {_span(s.start, s.end)} [{s.code}]: {s.reason}")
    return marks


def _n(x: float) -> str:
    """A coordinate: at most one decimal, none when it is whole (a 1,000-row picture stays small)."""
    return f"{x:.1f}".removesuffix(".0")


def _arc_path(a: _Arc, level: int, x_left: float, x_right: float) -> tuple[str, float, float]:
    """The arc's path from the top of its first row to the bottom of its last, and where its knob goes."""
    y1 = _TOP + a.first * _ROW + 3
    y2 = _TOP + a.last * _ROW + _BOX - 3
    reach = _PAD + level * _STEP
    if a.side == "new":
        x, out = x_right, x_right + reach * 4 / 3  # a cubic's control points reach 3/4 of the way out
    else:
        x, out = x_left, x_left - reach * 4 / 3
    apex = x + (out - x) * 3 / 4 + (6 if out > x else -6)  # a knob sits just outside the arc's apex
    return f"M{_n(x)},{y1} C{_n(out)},{y1} {_n(out)},{y2} {_n(x)},{y2}", apex, (y1 + y2) / 2


def architecture_svg(plan: Plan, *, notes: Mapping[str, str] | None = None) -> str:
    """The plan as an SVG picture: one row per layer in forward order, one arc per shortcut.

    Args:
        plan: what to draw (``plan.layers`` gives the order).
        notes: an extra tooltip line per layer name (the HTML report adds the gradient before → after).

    Returns:
        An ``<svg class="resify-diagram">`` element: rows are ``<g class="layer" data-name=NAME>``; each arc
        is a ``<path class="arc site KIND">`` (a new shortcut) or ``<path class="arc existing add|concat">``
        in a ``<g class="shortcut">`` with its ``<title>``; skipped rows have a ``<g class="skip">`` mark;
        the gates' and β's letters are in ``<g class="knobs">``.
    """
    order = layer_order(plan)
    rows = {name: i for i, name in enumerate(order)}
    arcs = [a for a in (_site_arc(s, rows) for s in plan.sites) if a is not None]
    arcs += [a for a in (_existing_arc(e, rows) for e in plan.existing) if a is not None]
    levels = _levels(arcs, len(order))
    tips, shapes, covered = _rows(plan, order, notes or {})
    marks = _skip_marks(plan, rows)
    top_left = max([lv for a, lv in zip(arcs, levels) if a.side == "existing"], default=0)
    top_right = max([lv for a, lv in zip(arcs, levels) if a.side == "new"], default=0)
    name_w = max([len(_short(n)) for n in order], default=10) * _CHAR
    shape_w = max([len(s) for s in shapes], default=0) * _CHAR * 0.9
    x_left = 12 + (_PAD + top_left * _STEP if top_left else 0)  # room for the outermost existing arc
    box_w = round(18 + name_w + shape_w + (20 if shape_w else 8))
    x_right = x_left + box_w
    width = round(x_right + (_PAD + top_right * _STEP) + 34)
    height = _TOP + len(order) * _ROW + 22
    mid = _n(x_left + box_w / 2)
    zoom = _ZOOM if len(order) <= _ZOOM_ROWS else 1
    out = [
        f'<svg class="resify-diagram" xmlns="http://www.w3.org/2000/svg" width="{_n(width * zoom)}" '
        f'height="{_n(height * zoom)}" '
        f'viewBox="0 0 {width} {height}" role="img" font-family="ui-monospace, Menlo, Consolas, monospace" '
        f'font-size="11" fill="#0f172a"><title>{_text(plan.model_class)}: {_text(plan.summary())}</title>',
        f'<text x="{mid}" y="{_TOP - 9}" text-anchor="middle" fill="#64748b">input</text>',
        f'<text x="{mid}" y="{height - 6}" text-anchor="middle" fill="#64748b">output</text>',
    ]
    if order:
        out.append(f'<line x1="{mid}" y1="{_TOP - 4}" x2="{mid}" y2="{height - 18}" stroke="#cbd5e1"/>')
    for r, name in enumerate(order):
        y = _TOP + r * _ROW
        shape = (
            f'<text x="{x_right - 8}" y="{y + 13}" font-size="10" text-anchor="end" fill="#64748b">'
            f"{_text(shapes[r])}</text>"
            if shapes[r]
            else ""
        )
        inside = r in covered
        out.append(
            f'<g class="layer{" in-site" if inside else ""}" data-name="{escape(name)}">'
            f'<title>{_text(tips[r])}</title><rect x="{x_left}" y="{y}" width="{box_w}" height="{_BOX}" rx="3" '
            f'fill="#f8fafc" stroke="{"#334155" if inside else "#94a3b8"}"/>'
            f'<text x="{x_left + 18}" y="{y + 13}">{_text(_short(name))}</text>{shape}</g>'
        )
    out.append('<g class="arcs" fill="none" stroke-width="1.8">')
    knobs: list[tuple[str, str, str]] = []  # (x, y, letter): drawn over the arcs, their look held by two groups
    for a, level in zip(arcs, levels):
        d, kx, ky = _arc_path(a, level, x_left, x_right)
        if a.knob:
            knobs.append((_n(kx), _n(ky), a.knob))
        dash = ' stroke-dasharray="5 3"' if a.css.endswith(("dense", "concat")) else ""
        out.append(
            f'<g class="shortcut"><title>{_text(a.tip)}</title><path class="arc {a.css}" d="{d}" '
            f'stroke="{COLOURS[a.css.split()[-1] if a.side == "new" else "existing"]}"{dash}/></g>'
        )
    out.append("</g>")
    if knobs:  # a gate or β: a letter in a circle on its arc (a 1,000-gate net stays a small picture)
        gate = COLOURS["gate"]
        out += [
            f'<g class="knobs" pointer-events="none"><g fill="#fff" stroke="{gate}" stroke-width="1.5">',
            *(f'<circle cx="{x}" cy="{y}" r="5.5"/>' for x, y, _ in knobs),
            f'</g><g fill="{gate}" font-size="9" text-anchor="middle">',
            *(f'<text x="{x}" y="{float(y) + 3.5:g}">{letter}</text>' for x, y, letter in knobs),
            "</g></g>",
        ]
    for r, reasons in sorted(marks.items()):
        y, x = _TOP + r * _ROW + _BOX // 2, x_left + 9  # inside the box, before the name: arcs keep the right
        quiet = all("[inside_existing]" in t for t in reasons)  # the grey arc on the left says why
        out.append(
            f'<g class="skip{" quiet" if quiet else ""}"><title>{_text(chr(10).join(reasons))}</title>'
            f'<path d="M{x - 3},{y - 3} l6,6 m0,-6 l-6,6" stroke="{"#cbd5e1" if quiet else COLOURS["skipped"]}" '
            'stroke-width="1.6"/></g>'
        )
    out.append("</svg>")
    return "\n".join(out)
