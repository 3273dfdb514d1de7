"""How resify's results look in a notebook or a browser: HTML fragments and self-contained pages.

One of the views, beside ``tables`` and ``plots`` (text, Markdown, PNG): ``Plan.to_html`` / ``_repr_html_`` and the
report's ``to_html`` / ``_repr_html_`` call into this module, and ``resify inspect --html`` writes
:func:`report_page`. It turns the frozen records into markup and computes nothing: every figure is
written by ``resify.formats`` exactly as the text tables write it, the pictures are
``resify.views.diagram`` (the architecture) and ``resify.views.chart`` (the gradient flow). A page is one file,
its style inline, with no script and nothing fetched from the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import TYPE_CHECKING, Any

from ..formats import fmt_number, fmt_shape, fmt_times
from .cells import FLOW_HEADER, added_figures, change_figures, flow_figures, output_scale, site_cells, span_label
from .chart import flow_chart_svg
from .diagram import COLOURS, KIND_NAMES, architecture_svg, site_category

if TYPE_CHECKING:
    from ..planning.sites import Plan
    from ..report import FlowComparison, GradientFlow

__all__ = ["plan_html", "flow_html", "comparison_html", "report_page"]

_OPEN_ROWS = 25  # a table longer than this starts folded (its <details> closed)

_CSS = """
.resify-view{color:#0f172a;background:#fff;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;
  padding:12px 16px;max-width:100%;box-sizing:border-box}
.resify-view h1{font-size:22px;margin:4px 0 2px}.resify-view h2{font-size:18px;margin:22px 0 8px;
  border-bottom:1px solid #e2e8f0;padding-bottom:3px}.resify-view h3{font-size:15px;margin:14px 0 6px}
.resify-view p{margin:4px 0}.resify-view code,.resify-view .mono{font-family:ui-monospace,Menlo,Consolas,monospace;
  font-size:12px}
.resify-view table{border-collapse:collapse;margin:6px 0;font-size:12px}
.resify-view th,.resify-view td{padding:2px 9px;border-bottom:1px solid #e2e8f0;text-align:left;
  vertical-align:top;white-space:nowrap}
.resify-view td.n,.resify-view th.n{text-align:right;font-variant-numeric:tabular-nums}
.resify-view td.wrap{white-space:normal;min-width:18em}
.resify-view th{background:#f1f5f9;font-weight:600;position:sticky;top:0}
.resify-view .scroll{max-height:70vh;overflow:auto;border:1px solid #e2e8f0;border-radius:4px;
  display:inline-block;max-width:100%}
.resify-view details>summary{cursor:pointer;color:#334155;margin:6px 0}
.resify-view .legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;margin:4px 0 8px;color:#334155}
.resify-view .legend i{display:inline-block;width:18px;height:0;border-top:2.5px solid;margin-right:5px;
  vertical-align:middle}
.resify-view .verdict-healthy{color:#15803d;font-weight:600}.resify-view .verdict-vanishing{color:#b45309;
  font-weight:600}.resify-view .verdict-exploding{color:#b91c1c;font-weight:600}
.resify-view .verdict-collapsing{color:#7e22ce;font-weight:600}
.resify-view .headline{font-size:15px;font-weight:600}
.resify-view .facts{display:grid;grid-template-columns:max-content auto;gap:1px 14px;font-size:13px}
.resify-view .facts dt{color:#475569}.resify-view .facts dd{margin:0}
.resify-view .diagram{max-height:75vh;overflow:auto;display:inline-block;max-width:100%}
.resify-view svg .shortcut:hover path.arc{stroke-width:3.5}
.resify-view svg .layer:hover rect{fill:#e0f2fe}
.resify-page{display:grid;grid-template-columns:fit-content(50%) minmax(0,1fr);gap:8px 32px;align-items:start}
.resify-page .arch .legend{flex-direction:column}
.resify-page>header{grid-column:1/-1}
.resify-page>.arch{position:sticky;top:0;max-height:100vh;overflow:auto}
.resify-page>.arch .diagram{max-height:none;overflow:visible}
@media (max-width:1000px){.resify-page{display:block}.resify-page>.arch{position:static;max-height:none}}
"""


def _t(s: object) -> str:
    """Text content (quotes need no escaping there; every attribute value here is resify's own)."""
    return escape(str(s), quote=False)


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = (), wrap: Sequence[int] = ()
) -> str:
    def cell(tag: str, i: int, text: str) -> str:
        cls = "n" if i in numeric else "wrap" if i in wrap else ""
        return f'<{tag} class="{cls}">{_t(text)}</{tag}>' if cls else f"<{tag}>{_t(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "\n".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table></div>'


def _folded(summary: str, inner: str, rows: int) -> str:
    """A table under a <details> summary, open when it is short."""
    state = " open" if rows <= _OPEN_ROWS else ""
    return f"<details{state}><summary>{_t(summary)}</summary>\n{inner}\n</details>"


def _legend() -> str:
    items = "".join(
        f'<span><i style="border-color:{COLOURS[k]}"></i>{_t(name)}</span>' for k, name in KIND_NAMES.items()
    )
    return f'<div class="legend">{items}</div>'


def _verdict(v: str) -> str:
    return f'<span class="verdict-{v}">{v}</span>'


# plans


def _plan_tables(plan: Plan) -> str:
    parts = [f"<p><b>total:</b> {_t(plan.summary())}</p>"]
    if plan.sites:
        rows = [[*site_cells(s), site_category(s)] for s in plan.sites]
        table = _table(["span", "shape", "shortcut", "gate", "+params", "drawn as"], rows, numeric=(4,))
        parts.append(_folded(f"{len(rows)} shortcut(s) to add", f'<div class="sites">{table}</div>', len(rows)))
    else:
        parts.append("<p>no shortcut will be added</p>")
    if plan.skipped:
        rows = [[span_label(s.start, s.end), s.code, s.reason] for s in plan.skipped]
        table = _table(["span", "code", "reason"], rows, wrap=(2,))
        parts.append(_folded(f"skipped ({len(rows)})", f'<div class="skipped">{table}</div>', len(rows)))
    if plan.existing:
        rows = [[e.kind, e.node, span_label(e.start, e.end), e.bypass] for e in plan.existing]
        table = _table(["kind", "at", "around", "bypass"], rows)
        parts.append(_folded(f"existing shortcuts ({len(rows)})", f'<div class="existing">{table}</div>', len(rows)))
    else:
        parts.append("<p>existing shortcuts: none</p>")
    parts += [f"<p>note: {_t(n)}</p>" for n in plan.notes]
    return "\n".join(parts)


def _plan_title(plan: Plan) -> str:
    return (
        f"resify plan for {plan.model_class} ({plan.tracer} trace, {plan.n_layers} layers, "
        f"{plan.params_before:,} parameters)"
    )


def _diagram(plan: Plan, notes: Mapping[str, str] | None = None) -> str:
    return f'{_legend()}<div class="diagram">{architecture_svg(plan, notes=notes)}</div>'


def _flow_notes(c: FlowComparison | None) -> dict[str, str]:
    """Per layer, the gradient before → after, for the diagram's tooltips."""
    if c is None:
        return {}
    return {
        ch.name: f"mean |grad| {fmt_number(ch.before.mean_abs_grad)} → {fmt_number(ch.after.mean_abs_grad)} "
        f"({fmt_times(ch.ratio)})"
        for ch in c.layers
    }


def plan_html(plan: Plan, *, page: bool = True) -> str:
    """The plan: its diagram, the sites, the skipped candidates with their reasons, the existing shortcuts."""
    body = f"<h3>{_t(_plan_title(plan))}</h3>\n{_diagram(plan)}\n{_plan_tables(plan)}"
    return _page(f"resify plan: {plan.model_class}", body) if page else _fragment(body)


# gradient flow


def _flow_table(flow: GradientFlow) -> str:
    rows = [[str(r.depth), ("+" if r.added else "") + r.name, r.kind, *flow_figures(r), r.verdict] for r in flow.layers]
    header = ["#", "layer", "kind", *FLOW_HEADER, "verdict"]
    table = _table(header, rows, numeric=(0, 3, 4, 5, 6, 7, 8))
    return _folded(f"{len(rows)} layer(s); + marks those resify added", f'<div class="flow">{table}</div>', len(rows))


def _flow_body(flow: GradientFlow) -> str:
    own = sum(1 for r in flow.layers if not r.added)
    added = len(flow.layers) - own
    extra = f" (+{added} added by resify)" if added else ""
    batches = f"{flow.batches} batch" + ("es" if flow.batches != 1 else "")
    lines = [
        f"<h3>gradient flow of {_t(flow.model_class)}</h3>",
        f"<p>{own} layers{extra}; loss {_t(flow.loss)} = {fmt_number(flow.loss_value)}, {batches}</p>",
        f"<p>verdict: {_verdict(flow.verdict)}, {_t(flow.reason)}</p>",
    ]
    if flow.recommendation:
        lines.append(f"<p>recommendation: {_t(flow.recommendation)}</p>")
    lines += [flow_chart_svg([("", flow)]), _flow_table(flow)]
    return "\n".join(lines)


def flow_html(flow: GradientFlow, *, page: bool = True) -> str:
    """One model's gradient flow: the verdict, the chart, every figure of every layer."""
    body = _flow_body(flow)
    return _page(f"resify gradient flow: {flow.model_class}", body) if page else _fragment(body)


def _comparison_body(c: FlowComparison) -> str:
    lines = [
        f"<h3>gradient flow: {_t(c.before.model_class)} → {_t(c.after.model_class)}</h3>",
        f'<p class="headline">{_t(c.headline)}</p>',
        *([f"<p>{_t(output_scale(c))}</p>"] if output_scale(c) else []),
        f"<p>before: {_verdict(c.before.verdict)}: {_t(c.before.reason)}"
        + (f"; {_t(c.before.recommendation)}" if c.before.recommendation else "")
        + "</p>",
        f"<p>after: {_verdict(c.after.verdict)}: {_t(c.after.reason)}"
        + (f"; {_t(c.after.recommendation)}" if c.after.recommendation else "")
        + "</p>",
        flow_chart_svg([("before", c.before), ("after", c.after)]),
    ]
    rows = [[ch.name, ch.after.kind, *change_figures(ch)] for ch in c.layers]
    header = ["layer", "kind", "mean |grad| before", "after", "×", "‖input grad‖ before", "after", "×"]
    table = _table(header, rows, numeric=range(2, 8))
    lines.append(_folded(f"{len(rows)} layer(s), before and after", f'<div class="layers">{table}</div>', len(rows)))
    if c.added:
        rows = [[r.name, r.kind, *added_figures(r)] for r in c.added]
        table = _table(["layer", "kind", "mean|grad|", "‖grad‖", "‖input grad‖"], rows, numeric=(2, 3, 4))
        lines.append(_folded(f"added by resify ({len(rows)})", f'<div class="added">{table}</div>', len(rows)))
    if c.removed:
        lines.append(f"<p>only before: {_t(', '.join(c.removed))}</p>")
    return "\n".join(lines)


def comparison_html(c: FlowComparison, *, page: bool = True) -> str:
    """Two reports side by side: headline, both verdicts, the chart, before/after/× per layer."""
    body = _comparison_body(c)
    title = f"resify gradient flow: {c.before.model_class} → {c.after.model_class}"
    return _page(title, body) if page else _fragment(body)


# the page of ``resify inspect --html``


def report_page(info: Mapping[str, Any], plan: Plan, flow: FlowComparison | None) -> str:
    """What ``resify inspect`` prints, as one self-contained page: the model, its diagram, the plan and
    the gradient flow before and after (``flow`` None: ``--no-report``)."""
    facts = [
        ("source", info.get("source", "")),
        ("parameters", f"{plan.params_before:,} → {int(info.get('parameters_after', plan.params_before)):,}"),
        ("layers", f"{plan.n_layers}, {plan.tracer} trace"),
        ("example input", " ".join(fmt_shape(s) for s in info.get("example_input", []))),
        ("plan", plan.summary()),
    ]
    if flow is not None:
        facts.append(("gradient flow", flow.headline))
    dl = "".join(f"<dt>{_t(k)}</dt><dd>{_t(v)}</dd>" for k, v in facts)
    flow_section = (
        f'<section id="gradient-flow"><h2>Gradient flow before and after</h2>\n{_comparison_body(flow)}</section>'
        if flow is not None
        else ""
    )
    body = (
        '<div class="resify-page">'
        f'<header><h1>{_t(info.get("class", plan.model_class))}</h1><dl class="facts">{dl}</dl></header>\n'
        f'<section class="arch" id="architecture"><h2>Architecture</h2>\n{_diagram(plan, _flow_notes(flow))}</section>\n'
        f'<div class="details"><section id="plan"><h2>Plan</h2>\n<p>{_t(_plan_title(plan))}</p>\n'
        f"{_plan_tables(plan)}</section>\n{flow_section}</div></div>"
    )
    version = info.get("resify_version")
    footer = f'<footer><p class="mono">written by resify {_t(version)}</p></footer>' if version else ""
    return _page(f"resify: {info.get('class', plan.model_class)}", body + footer)


def _fragment(body: str) -> str:
    """A notebook cell's display: the style scoped to ``.resify-view``, nothing global, no script."""
    return f'<div class="resify-view"><style>{_CSS}</style>\n{body}\n</div>'


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_t(title)}</title>\n<style>{_CSS}body{{margin:0;background:#fff}}</style>\n</head>\n"
        f'<body>\n<main class="resify-view">\n{body}\n</main>\n</body>\n</html>\n'
    )
