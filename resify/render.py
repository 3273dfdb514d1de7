"""How resify's results print: plan tables, gradient-flow tables, Markdown and plots.

Beside the pipeline: ``Plan.__str__`` and the report's ``to_text`` / ``to_markdown`` / ``plot``
call into this module, which turns the frozen records into text or figures and computes nothing.
"""

from __future__ import annotations

import math
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .constants import EXPLODING_RATIO, VANISHING_RATIO
from .errors import ResifyError
from .formats import fmt_number, fmt_shape, fmt_similarity, fmt_times

if TYPE_CHECKING:
    from .report import FlowComparison, GradientFlow, LayerChange, LayerFlow
    from .sites import Site

__all__ = [
    "FLOW_HEADER",
    "FLOW_HEADER_MD",
    "flow_figures",
    "change_figures",
    "added_figures",
    "site_cells",
    "span_label",
    "plot_series",
    "table",
    "terminal_width",
    "flow_text",
    "flow_markdown",
    "output_scale",
    "comparison_text",
    "comparison_markdown",
    "plot_flows",
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


def _kind(kind: str, width: int = 14) -> str:
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
) -> list[str]:
    """Aligned columns two spaces apart, cut to fit ``width``: the ``shrink`` columns in turn (each
    down to 20 characters or its header, the last one further), at their start (the end of a layer
    name names it) or, for the ``cut_end`` columns, at their end."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, w in enumerate(min_widths):
        widths[i] = max(widths[i], w)
    order = [shrink] if isinstance(shrink, int) else list(shrink)
    for k, c in enumerate(order):
        over = sum(widths) + 2 * (len(widths) - 1) - width
        if over <= 0:
            break
        floor = len(header[c]) if k == len(order) - 1 else max(len(header[c]), 20)
        widths[c] = max(min(floor, widths[c]), widths[c] - over)

    def cut(c: str, w: int, i: int) -> str:
        return _kind(c, w) if i in cut_end else _shorten(c, w)

    fmt = lambda r: "  ".join(
        (cut(c, w, i).rjust(w) if al else cut(c, w, i).ljust(w)) for i, (c, w, al) in enumerate(zip(r, widths, right))
    ).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]]


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
        [str(r.depth), ("+" if r.added else "") + r.name, _kind(r.kind), *flow_figures(r), r.verdict]
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


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


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
    lines.append(_md_row(["#", "layer", "kind", *FLOW_HEADER_MD, "verdict"]))
    lines.append("|" + "---:|" + ":---|" * 2 + "---:|" * len(FLOW_HEADER_MD) + ":---|")
    for r in flow.layers:
        name = f"`{r.name}`" + (" *added*" if r.added else "")
        lines.append(_md_row([str(r.depth), name, r.kind, *flow_figures(r), r.verdict]))
    return "\n".join(lines)


def output_scale(c: FlowComparison) -> str | None:
    """E.g. "output scale: activation RMS of 'fc' 7.25e-02 → 9.84e+01, 1,357× the original's" (None: not measured)."""
    ch = c.output_change
    if ch is None:
        return None
    b, a = fmt_number(ch.before.activation_rms), fmt_number(ch.after.activation_rms)
    return f"output scale: activation RMS of '{ch.name}' {b} → {a}, {fmt_times(c.output_ratio)} the original's"


def comparison_text(c: FlowComparison, width: int) -> str:
    lines = [f"gradient flow: {c.before.model_class} → {c.after.model_class}", c.headline]
    scale = output_scale(c)
    if scale:
        lines += textwrap.wrap(scale, width, subsequent_indent="  ")
    for tag, flow in (("before", c.before), ("after", c.after)):
        lines += textwrap.wrap(f"{tag}: {flow.summary()}", width, subsequent_indent="  ")
    header = ["layer", "kind", "before", "after", "×", "before", "after", "×"]
    rows = [[ch.name, _kind(ch.after.kind), *change_figures(ch)] for ch in c.layers]
    groups = ("mean |grad| of weight", "‖input grad‖")
    # widen the 'before' columns so that each group label fits over its three columns
    mins = [0, 0, 0, 0, 0, 0, 0, 0]
    for k, label in enumerate(groups):
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(2 + 3 * k, 5 + 3 * k)]
        mins[2 + 3 * k] = max(widths[0], len(label) - widths[1] - widths[2] - 4)
    rendered = table(header, rows, width=width, shrink=0, right=[False, False] + [True] * 6, min_widths=mins)
    cols = rendered[1].split("  ")
    starts = [sum(len(x) + 2 for x in cols[:i]) for i in range(len(cols))]
    spans = [sum(len(x) for x in cols[i : i + 3]) + 4 for i in (2, 5)]
    group = " " * starts[2] + groups[0].center(spans[0]) + "  " + groups[1].center(spans[1])
    lines += ["", group.rstrip(), *rendered]
    if c.added:
        lines += ["", f"added by resify ({len(c.added)}):"]
        rows = [[r.name, _kind(r.kind), *added_figures(r)] for r in c.added]
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
        _md_row(
            ["layer", "kind", "mean abs grad before", "after", "ratio", "input grad norm before", "after", "ratio"]
        ),
        "|:---|:---|" + "---:|" * 6,
    ]
    for ch in c.layers:
        lines.append(_md_row([f"`{ch.name}`", ch.after.kind, *change_figures(ch)]))
    if c.added:
        lines += [
            "",
            f"Added by resify ({len(c.added)}):",
            "",
            _md_row(["layer", "kind", "mean abs grad", "grad norm", "input grad norm"]),
            "|:---|:---|---:|---:|---:|",
        ]
        for r in c.added:
            lines.append(_md_row([f"`{r.name}`", r.kind, *added_figures(r)]))
    if c.removed:
        lines += ["", "Only before: " + ", ".join(f"`{n}`" for n in c.removed)]
    return "\n".join(lines)


_STYLE = {"": ("#1f77b4", "o"), "before": ("#d62728", "s"), "after": ("#1f77b4", "o")}


def plot_flows(flows: Sequence[tuple[str, GradientFlow]], path: str | Path, title: str) -> Path:
    """Gradient norm per layer against depth (log scale), one series per flow, bands shaded."""

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise ResifyError(f"plot() writes .png or .svg files, found '{path.name}'; pass e.g. 'flow.png'")
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ResifyError("plot() needs matplotlib, which is not installed; pip install 'resify[plot]'") from e

    names: list[str] = []  # x positions: the model's own layers, in forward order
    for _, flow in flows:
        for r in flow.layers:
            if not r.added and r.kind != "Gate" and r.name not in names:
                names.append(r.name)
    xpos = {n: i for i, n in enumerate(names)}
    series = [(label, flow, *plot_series(flow, xpos)) for label, flow in flows]
    rel_values = [v for s in series for _, v in s[2] + s[4] if v and math.isfinite(v)]
    grad_values = [v for s in series for _, v in s[3] if v and math.isfinite(v)]
    lo = min([VANISHING_RATIO / 10, *rel_values]) / 10
    hi = max([EXPLODING_RATIO * 10, *rel_values]) * 10
    glo = min(grad_values) / 10 if grad_values else 1e-12

    fig = Figure(figsize=(9, 6.8), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    top.axhspan(EXPLODING_RATIO, hi, color="#d62728", alpha=0.10, lw=0, label=f"exploding band (> {EXPLODING_RATIO:g})")
    top.axhspan(lo, VANISHING_RATIO, color="#7f7f7f", alpha=0.18, lw=0, label=f"vanishing band (< {VANISHING_RATIO:g})")
    top.axhline(1.0, color="k", lw=0.6, ls=":")
    for label, flow, rel, grads, added in series:
        color, marker = _STYLE.get(label, _STYLE[""])
        tag = f"{label}: " if label else ""
        shown = [(x, v) for x, v in rel if v is not None]
        top.plot(
            [x for x, _ in shown],
            [v if v > 0 else lo * 2 for _, v in shown],
            marker=marker,
            ms=4,
            color=color,
            label=f"{tag}{flow.model_class}, {flow.verdict}",
        )
        zeros = [x for x, v in shown if v == 0]
        if zeros:
            top.plot(zeros, [lo * 2] * len(zeros), "v", color=color, ms=7, ls="none", label=f"{tag}zero (underflow)")
        if added:
            top.plot(
                [x for x, _ in added],
                [v for _, v in added],
                marker="D",
                ls="none",
                mfc="none",
                color=color,
                ms=5,
                label=f"{tag}resify projections",
            )
        pos = [(x, v) for x, v in grads if v is not None and v > 0]
        if pos:
            bottom.plot(
                [x for x, _ in pos],
                [v for _, v in pos],
                marker=marker,
                ms=4,
                color=color,
                label=f"{tag}{flow.model_class}",
            )
        zx = [x for x, v in grads if v == 0]
        if zx:
            bottom.plot(
                zx, [glo * 2] * len(zx), "v", color=color, ms=6, ls="none", label=f"{tag}zero (e.g. behind a gate at 0)"
            )
    top.set_yscale("log")
    top.set_ylim(lo, hi)
    top.set_ylabel("input-gradient norm\n÷ the last layer's")
    top.set_title("gradient flow: what the verdict is judged on", fontsize=9, loc="left")
    bottom.set_yscale("log")
    bottom.set_ylim(bottom=glo)
    bottom.set_ylabel("mean |grad| of weight")
    bottom.set_title("weight gradient: the seed's print_gradients figure", fontsize=9, loc="left")
    bottom.set_xlabel("depth (the model's layers in forward order)")
    for ax in (top, bottom):
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best", framealpha=0.9)
    if len(names) <= 16:
        bottom.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 90)), fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt, dpi=120)
    return path


def plot_series(flow: GradientFlow, xpos: Mapping[str, int]) -> tuple[list, list, list]:
    """(x, flow ÷ last flow) and (x, mean |grad|) for the own layers; (x, flow ÷ last) for projections."""
    own = [r for r in flow.layers if not r.added and r.kind != "Gate"]
    last = next((r.flow for r in reversed(own) if r.flow), None)
    rel = [(xpos[r.name], (None if r.flow is None or not last else r.flow / last)) for r in own]
    grads = [(xpos[r.name], r.mean_abs_grad) for r in own]
    added, prev = [], -1.0
    for r in flow.layers:  # a projection is drawn beside the layer it bridges
        if r.name in xpos:
            prev = xpos[r.name]
        elif r.kind != "Gate" and r.input_grad_norm is not None and last:
            added.append((prev + 0.35, r.input_grad_norm / last))
    return rel, grads, added


def span_label(start: str, end: str) -> str:
    return start if start == end else f"{start} … {end}"


def terminal_width(fallback: int = 100) -> int:
    """The terminal's width: ``COLUMNS`` if set, else the terminal's own, else ``fallback`` (a pipe)."""
    return shutil.get_terminal_size((fallback, 24)).columns
