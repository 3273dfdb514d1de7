"""How a ``resify.watch`` history draws: a heatmap of layers × steps, the verdict band, the gates.

The sibling of ``plots`` for the records of ``report.history`` (``FlowHistory.plot`` calls it);
like ``plots`` it turns frozen records into a figure and computes nothing of its own: the colour
is the figure the verdict is judged on (each layer's input-gradient norm ÷ the last layer's), the
band is each step's verdict.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import EXPLODING_RATIO, VANISHING_RATIO, VERDICTS
from ..errors import ResifyError

if TYPE_CHECKING:
    from ..report.history import FlowHistory

__all__ = ["plot_histories", "relative_flows"]

_VERDICT_COLOURS = {"healthy": "#2ca02c", "vanishing": "#1f4e9c", "exploding": "#d62728", "collapsing": "#9467bd"}


def relative_flows(history: FlowHistory) -> tuple[list[str], list[list[float | None]]]:
    """The model's own layers in forward order, and per layer the flow ÷ the last layer's at each step.

    The last layer is the verdict's (``GradientFlow.last_flow``: the last own layer with an input
    gradient). A layer absent from a step, or a step whose last flow is missing or 0, gives None.
    """
    names: dict[str, None] = {}
    for r in history.records:
        names.update((lf.name, None) for lf in r.flow.layers if not lf.added and lf.kind != "Gate")
    rows: dict[str, list[float | None]] = {n: [] for n in names}
    for r in history.records:
        own = {lf.name: lf.flow for lf in r.flow.layers if not lf.added and lf.kind != "Gate"}
        last = r.flow.last_flow
        for n in names:
            f = own.get(n)
            rows[n].append(None if f is None or not last else f / last)
    return list(names), [rows[n] for n in names]


def _level(v: float | None, lo: float, hi: float) -> float:
    """A ratio's place on the colour scale: log10, 0 at ``lo`` (underflow), not finite at ``hi``
    (the exploding end: a NaN gradient is no measurement of nothing), None as NaN (drawn grey)."""
    if v is None:
        return math.nan
    if not math.isfinite(v):
        return hi
    return lo if v <= 0 else math.log10(v)


def _edges(steps: Sequence[int]) -> list[float]:
    """Cell edges around each step (halfway to its neighbours)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [steps[0] - (mids[0] - steps[0]), *mids, steps[-1] + (steps[-1] - mids[-1])]


def plot_histories(histories: Sequence[FlowHistory], path: str | Path, title: str) -> Path:
    """One column per history: the heatmap (log10 of flow ÷ last), the verdict band, the gates."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise ResifyError(f"plot() writes .png or .svg files, found '{path.name}'; pass e.g. 'flow.png'")
    if not histories or any(not h.records for h in histories):
        raise ResifyError("plot() needs at least one recorded step; train with the watch open first")
    try:
        import numpy as np
        from matplotlib import colors
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ResifyError("plot() needs matplotlib, which is not installed; pip install 'resify[plot]'") from e

    data = [relative_flows(h) for h in histories]
    logs = [np.log10(v) for _, rows in data for row in rows for v in row if v and math.isfinite(v) and v > 0]
    lo = min([math.log10(VANISHING_RATIO) - 1, *logs])
    hi = max([math.log10(EXPLODING_RATIO) + 1, *logs])
    lo, hi = max(lo, -12.0), min(hi, 12.0)  # beyond ±12 decades the colour saturates (and says so)
    norm = colors.TwoSlopeNorm(vmin=lo, vcenter=0.0, vmax=hi)
    cmap = colors.LinearSegmentedColormap.from_list(
        "flow", ["#08306b", "#6baed6", "#f7f7f7", "#fc9272", "#67000d"]
    ).with_extremes(bad="#d9d9d9")
    gated = any(r.gates for h in histories for r in h.records)
    n = len(histories)
    fig = Figure(figsize=(4.6 * n + 1.4, 7.4 if gated else 5.6), layout="constrained")
    ratios = [6, 0.45, 2.4] if gated else [6, 0.45]
    axes = fig.subplots(len(ratios), n, squeeze=False, height_ratios=ratios, sharex="col")
    mesh: Any = None
    for col, (h, (names, rows)) in enumerate(zip(histories, data)):
        top, band = axes[0][col], axes[1][col]
        steps = list(h.steps)
        x = _edges(steps)
        values = np.array([[_level(v, lo, hi) for v in row] for row in rows])
        mesh = top.pcolormesh(x, np.arange(len(names) + 1), np.ma.masked_invalid(values), cmap=cmap, norm=norm)
        top.set_ylim(len(names), 0)  # the input side at the top
        name = h.label if h.label == h.model_class else f"{h.label}: {h.model_class}"
        top.set_title(f"{name}, {len(names)} layers", fontsize=9, loc="left")
        named = len(names) <= 12  # few enough to name each row
        if named:
            top.set_yticks(np.arange(len(names)) + 0.5, [f"'{n}'" for n in names], fontsize=7)
        if col == 0:
            top.set_ylabel("layer (input side at the top)" if named else "layer position (0: the input side)")
        codes = [np.nan if r.overflow else float(VERDICTS.index(r.verdict)) for r in h.records]
        vmap = colors.ListedColormap([_VERDICT_COLOURS[v] for v in VERDICTS]).with_extremes(bad="#ffffff")
        band.pcolormesh(x, [0, 1], np.ma.masked_invalid([codes]), cmap=vmap, vmin=-0.5, vmax=len(VERDICTS) - 0.5)
        band.set_yticks([])
        if col == 0:
            band.set_ylabel("verdict", rotation=0, ha="right", va="center", fontsize=8)
        bottom = band
        if gated:
            ax = axes[2][col]
            bottom = ax
            _draw_gates(ax, h, np)
            if col == 0:
                ax.set_ylabel("gate value")
        bottom.set_xlabel("step (backward passes)")
    cbar = fig.colorbar(mesh, ax=[axes[0][c] for c in range(n)], extend="both", pad=0.01, fraction=0.05)
    step = max(1, math.ceil((hi - lo) / 8))
    bounds = [round(math.log10(VANISHING_RATIO)), round(math.log10(EXPLODING_RATIO))]
    ticks = {t for t in range(math.ceil(lo), math.floor(hi) + 1) if t % step == 0} | {0, *bounds}
    cbar.set_ticks(sorted(t for t in ticks if lo <= t <= hi))
    cbar.ax.yaxis.set_major_formatter(lambda v, _: "1" if v == 0 else f"1e{v:+.0f}")
    for bound in (VANISHING_RATIO, EXPLODING_RATIO):
        cbar.ax.axhline(math.log10(bound), color="k", lw=1.2)
    cbar.set_label(
        f"input-gradient norm ÷ the last layer's (log scale)\n"
        f"black lines: vanishing below {VANISHING_RATIO:g}, exploding above {EXPLODING_RATIO:g}",
        fontsize=8,
    )
    legend = [Patch(color=_VERDICT_COLOURS[v], label=v) for v in VERDICTS]
    if any(r.overflow for h in histories for r in h.records):
        legend.append(Patch(facecolor="#ffffff", edgecolor="#999999", label="skipped (GradScaler overflow)"))
    if any(v is None for _, rows in data for row in rows for v in row):
        legend.append(Patch(color="#d9d9d9", label="not measured"))
    fig.legend(handles=legend, loc="outside lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.suptitle("\n".join(textwrap.wrap(title, 45 * n + 20)), fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt, dpi=110)
    return path


def _draw_gates(ax: Any, h: FlowHistory, np: Any) -> None:
    """Each gate's value (γ: its mean over channels) against the step, coloured from input to output."""
    names = list(dict.fromkeys(n for r in h.records for n in r.gates))
    if not names:
        ax.text(0.5, 0.5, "no resify gates", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_yticks([])
        return
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    steps = [r.step for r in h.records]
    for i, name in enumerate(names):
        ys = [float(np.mean(r.gates[name])) if name in r.gates else np.nan for r in h.records]
        label = (
            name if len(names) <= 6 else ("input side" if i == 0 else "output side" if i == len(names) - 1 else None)
        )
        ax.plot(steps, ys, color=cmap(i / max(1, len(names) - 1)), lw=1, label=label)
    ax.axhline(0.0, color="k", lw=0.5, ls=":")
    ax.set_title(f"{len(names)} gate(s) (α, β; γ: mean over channels)", fontsize=8, loc="left")
    ax.legend(fontsize=7, loc="best")
