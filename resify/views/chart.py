"""The gradient-flow chart as inline SVG: the PNG figure's top panel, for notebooks and HTML pages.

One of the views, beside ``plots`` (whose ``plot_flows`` draws the same series with matplotlib) and
``html``: the flow that reaches each layer's input, divided by the last layer's, against depth on a
log scale, with the vanishing and exploding bands shaded. Plain SVG, no matplotlib, no script: it
needs nothing that ``pip install resify`` does not bring, and renders the same offline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING

from ..constants import EXPLODING_RATIO, VANISHING_RATIO
from ..formats import fmt_number
from .plots import plot_series  # the figure's series: one definition for the PNG and the SVG

if TYPE_CHECKING:
    from ..report import GradientFlow

__all__ = ["SERIES_COLOURS", "flow_chart_svg"]

#: line colour of each series, as in the PNG figure ("" for a single report).
SERIES_COLOURS = {"": "#1f77b4", "before": "#d62728", "after": "#1f77b4"}
_MARKERS = 150  # above this many layers a series is a line without a marker per layer


def _t(s: str) -> str:
    return escape(s, quote=False)


def _decade(k: int) -> str:
    return "1" if k == 0 else f"1e{k}"


def flow_chart_svg(flows: Sequence[tuple[str, GradientFlow]], *, width: int = 640, height: int = 300) -> str:
    """An ``<svg class="resify-chart">``: one line per ``(label, flow)``, each point with a tooltip.

    The y value of a layer is its ``flow`` ÷ the last own layer's (what the verdict is judged on);
    a zero (float underflow) is a triangle on the bottom edge, a layer without a figure is a gap.
    """
    names: list[str] = []
    for _, flow in flows:
        for r in flow.layers:
            if not r.added and r.kind != "Gate" and r.name not in names:
                names.append(r.name)
    xpos = {n: i for i, n in enumerate(names)}
    series = [(label, flow, plot_series(flow, xpos)[0]) for label, flow in flows]
    values = [v for *_, rel in series for _, v in rel if v and math.isfinite(v)]
    lo_k = math.floor(math.log10(min([VANISHING_RATIO / 10, *values]))) - 1
    hi_k = math.ceil(math.log10(max([EXPLODING_RATIO * 10, *values]))) + 1
    rotate = len(names) <= 16
    longest = min(24, max((len(n) for n in names), default=0))
    left, right, top, bottom = 58, 16, 30, (24 + round(longest * 3.9) if rotate else 40)  # labels at 35°
    pw, ph = width - left - right, height - top - bottom

    def x(i: float) -> float:
        return left + (pw / 2 if len(names) < 2 else pw * i / (len(names) - 1))

    def y(v: float) -> float:
        return top + ph * (hi_k - math.log10(v)) / (hi_k - lo_k)

    out = [
        f'<svg class="resify-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" font-family="system-ui, sans-serif" font-size="11">'
        "<title>gradient flow: input-gradient norm ÷ the last layer's, per layer (log scale)</title>",
        f'<rect x="{left}" y="{top}" width="{pw}" height="{y(EXPLODING_RATIO) - top:.1f}" fill="#d62728" '
        f'fill-opacity="0.10"><title>exploding band (&gt; {EXPLODING_RATIO:g})</title></rect>',
        f'<rect x="{left}" y="{y(VANISHING_RATIO):.1f}" width="{pw}" height="{top + ph - y(VANISHING_RATIO):.1f}" '
        f'fill="#7f7f7f" fill-opacity="0.18"><title>vanishing band (&lt; {VANISHING_RATIO:g})</title></rect>',
        f'<line x1="{left}" x2="{left + pw}" y1="{y(1):.1f}" y2="{y(1):.1f}" stroke="#000" stroke-dasharray="2 3"/>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#94a3b8"/>',
        f'<text x="{left}" y="{top - 10}" fill="#334155">input-gradient norm ÷ the last layer\'s '
        "(what the verdict is judged on)</text>",
    ]
    step = max(1, math.ceil((hi_k - lo_k) / 8))
    for k in range(lo_k, hi_k + 1):
        if (k - lo_k) % step == 0 or k == 0:
            out.append(
                f'<line x1="{left - 4}" x2="{left}" y1="{y(10.0**k):.1f}" y2="{y(10.0**k):.1f}" stroke="#64748b"/>'
                f'<text x="{left - 7}" y="{y(10.0**k) + 4:.1f}" text-anchor="end" fill="#334155">{_decade(k)}</text>'
            )
    base = top + ph
    if rotate:
        for i, name in enumerate(names):
            out.append(
                f'<text transform="translate({x(i):.1f},{base + 12}) rotate(-35)" text-anchor="end" '
                f'fill="#334155" font-size="10">{_t(name[-24:])}</text>'
            )
    else:
        for i in sorted({0, len(names) - 1, *range(0, len(names), max(1, math.ceil(len(names) / 8)))}):
            out.append(f'<text x="{x(i):.1f}" y="{base + 15}" text-anchor="middle" fill="#334155">{i}</text>')
        out.append(
            f'<text x="{left + pw / 2:.1f}" y="{base + 32}" text-anchor="middle" fill="#334155">'
            "depth (the model's layers in forward order)</text>"
        )
    for n, (label, flow, rel) in enumerate(series):
        colour = SERIES_COLOURS.get(label, SERIES_COLOURS[""])
        tag = f"{label}: " if label else ""
        runs: list[list[str]] = [[]]
        for i, v in rel:
            if v is None or v <= 0 or not math.isfinite(v):
                runs.append([])
            else:
                runs[-1].append(f"{x(i):.1f},{y(v):.1f}")
        for points in runs:
            if len(points) > 1:
                out.append(
                    f'<polyline class="series" points="{" ".join(points)}" fill="none" stroke="{colour}" '
                    'stroke-width="1.6"/>'
                )
        zeros = [i for i, v in rel if v == 0]
        if zeros:  # one shape for all of them: a 1,000-layer net that underflows stays a small picture
            d = " ".join(f"M{x(i) - 4:.1f},{base - 7}h8l-4,7z" for i in zeros)
            shown = ", ".join(names[i] for i in zeros[:5]) + (", …" if len(zeros) > 5 else "")
            out.append(
                f'<path d="{d}" fill="{colour}"><title>{_t(f"{tag}{len(zeros)} layer(s) at 0 (underflow): {shown}")}'
                "</title></path>"
            )
        if len(rel) <= _MARKERS:
            for i, v in rel:
                if v is not None and v > 0 and math.isfinite(v):
                    tip = _t(f"{tag}{names[i]}: {fmt_number(v)}")
                    out.append(
                        f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"><title>{tip}</title></circle>'
                    )
        legend_y = top + 14 + 15 * n
        out.append(
            f'<line x1="{left + 8}" x2="{left + 26}" y1="{legend_y - 4}" y2="{legend_y - 4}" stroke="{colour}" '
            f'stroke-width="2"/><text x="{left + 31}" y="{legend_y}" fill="#0f172a">{_t(tag + flow.verdict)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)
