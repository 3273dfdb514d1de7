"""The report as a figure: the gradient flow per layer against depth, as PNG or SVG (matplotlib).

Part of the views: the report's ``plot`` calls ``plot_flows``; ``plot_series`` gives the series
that the PNG and the SVG chart (``chart``) both draw. It computes no figure of the report.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..constants import EXPLODING_RATIO, VANISHING_RATIO
from ..errors import ResifyError

if TYPE_CHECKING:
    from ..report import GradientFlow

__all__ = ["plot_flows", "plot_series"]


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
    last = flow.last_flow  # the verdict's: what the chart says the verdict is judged on
    rel = [(xpos[r.name], (None if r.flow is None or not last else r.flow / last)) for r in own]
    grads = [(xpos[r.name], r.mean_abs_grad) for r in own]
    added, prev = [], -1.0
    for r in flow.layers:  # a projection is drawn beside the layer it bridges
        if r.name in xpos:
            prev = xpos[r.name]
        elif r.kind != "Gate" and r.input_grad_norm is not None and last:
            added.append((prev + 0.35, r.input_grad_norm / last))
    return rel, grads, added
