"""Efficacy on real data: do deep plain networks train once resify adds shortcuts?

scikit-learn's ``load_digits`` (1,797 8×8 images, shipped with the package: no download),
a stratified 75/25 split with a fixed seed, features standardised on the training part.
Every network trains with Adam (lr 1e-3), batch 64, for a fixed budget of epochs (30 by default)
from each seed; the table gives final test accuracy, mean ± std over seeds.

Networks (width 64; "depth" counts Linear layers, the last being the 10-way output layer):

* ``plain``: the seed guide's ImprovedResidualNetwork pattern with ``use_shortcut=False``;
* ``resify``: ``resify.apply(plain, x, gate=None)``;
* ``resify+rezero``: ``resify.apply(plain, x, gate='rezero')``;
* ``hand``: the same class with ``use_shortcut=True``, written by hand (``x = act(linear(x)) + x``,
  a Linear projection where the width changes: here only at the output layer);
* ``default``: ``resify.apply(plain, batch)``, the gate left to the default (``'auto'``: chosen site
  by site from a forward of ``batch``, a training batch of ``EXAMPLE_BATCH`` examples).

plus a VGG-style CNN of 21 conv layers (with and without BatchNorm) on the images, plain vs
converted, and, with ``--big``, a 1,000-layer MLP converted with ``gate='rezero'``.
It also reports the first-layer gradient ratio at initialisation: mean |∂loss/∂W| of the first
layer's weight in the converted (or hand-written) net over the same in the plain net, on the
whole training set.

Run from the repository root::

    python -m benchmarks.efficacy_digits                 # the full sweep (about 25 min on 1 CPU thread; 45 with --big)
    python -m benchmarks.efficacy_digits --quick         # depth 8 and 32, 1 seed, 5 epochs (about 1 min)
    python -m benchmarks.efficacy_digits --big --only-big   # just the 1,000-layer row
    python -m benchmarks.efficacy_digits --variants default --merge   # add one variant to the saved runs

It prints plain tables, writes ``benchmarks/results/efficacy.md`` (and ``efficacy.json``) and the
figure ``docs/efficacy_depth.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import resify
from benchmarks.common import ACTIVATIONS, SeedMLP, VGGNet, machine, mlp_sizes, table, write_json

__all__ = [
    "Digits",
    "Run",
    "Probe",
    "load_data",
    "build",
    "train",
    "fit",
    "accuracy",
    "first_layer_grad",
    "run_mlp",
    "run_cnn",
    "VARIANTS",
    "LABELS",
    "main",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT_SEED = 0
VARIANTS = ("plain", "resify", "resify+rezero", "hand", "default")
#: the variants' names in tables, one for every efficacy benchmark
LABELS = {
    "plain": "plain",
    "resify": "resify gate=None",
    "resify+rezero": "resify gate='rezero'",
    "hand": "hand-written",
    "default": "resify default",
}
#: the example the default variant is converted with: a training batch (gate='auto' measures on it)
EXAMPLE_BATCH = 64


@dataclass(frozen=True)
class Digits:
    """The split, standardised with the training part's mean and std (test data never seen)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class Run:
    """One trained network: what it was and how it did."""

    model: str  # "mlp" or "cnn" / "cnn-nobn"
    act: str
    depth: int
    variant: str
    seed: int
    epochs: int
    accuracy: float
    grad_ratio: float | None  # first-layer mean |grad| at init, variant / plain (None for plain)
    first_grad: float
    seconds: float
    diverged: bool
    verdict: str | None = None  # resify.gradient_flow's verdict at init
    recommendation: str | None = None  # and its recommendation


def load_data(split_seed: int = SPLIT_SEED) -> Digits:
    """load_digits, stratified 75/25 split with ``split_seed``, standardised on the training part."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=split_seed)
    scaler = StandardScaler().fit(x_tr)
    f = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)
    return Digits(f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te))


def _image(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 1, 8, 8)


def build(variant: str, depth: int, act: str, seed: int, example: torch.Tensor, width: int = 64) -> nn.Module:
    """The MLP ``variant`` of ``depth`` Linear layers, initialised from ``seed``.

    The plain net's layers are drawn first, so every variant starts from the same layer weights;
    resify's projection and the hand-written one each draw their own.
    """
    sizes = mlp_sizes(depth, width)
    torch.manual_seed(seed)
    plain = SeedMLP(sizes, use_shortcut=False, act=ACTIVATIONS[act])
    if variant == "plain":
        return plain
    if variant == "hand":
        torch.manual_seed(seed)
        hand = SeedMLP(sizes, use_shortcut=True, act=ACTIVATIONS[act])
        hand.load_state_dict(plain.state_dict(), strict=False)  # identical layers, its own projection
        return hand
    torch.manual_seed(seed + 10_000)
    return _converted(plain, example, variant)


def _converted(plain: nn.Module, example: torch.Tensor, variant: str) -> nn.Module:
    """``plain`` converted as ``variant`` says: gate=None, gate='rezero', or the default policy."""
    if variant == "default":
        return resify.apply(plain, example)
    return resify.apply(plain, example, gate={"resify": None, "resify+rezero": "rezero"}[variant])


def example_for(variant: str, x: torch.Tensor) -> torch.Tensor:
    """The example a variant is converted with: a training batch for the default (its gates are
    measured on it), two examples for the others (only the shapes matter there)."""
    return x[:EXAMPLE_BATCH] if variant == "default" else x[:2]


def build_cnn(variant: str, seed: int, norm: bool, example: torch.Tensor) -> nn.Module:
    """The 21-conv VGG-style net (plain) or its conversion (``resify`` / ``resify+rezero`` / ``default``)."""
    torch.manual_seed(seed)
    plain = VGGNet(in_channels=1, classes=10, norm=norm)
    if variant == "plain":
        return plain
    torch.manual_seed(seed + 10_000)
    return _converted(plain, _image(example), variant)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` classified as ``y`` (eval mode; NaN logits count as wrong)."""
    was = model.training
    model.eval()
    try:
        logits = model(x)
        ok = (logits.argmax(1) == y) & torch.isfinite(logits).all(1)
        return ok.float().mean().item()
    finally:
        model.train(was)


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, lr: float = 1e-3, batch: int = 64
) -> bool:
    """Adam on cross-entropy for ``epochs`` epochs, shuffled from ``seed``; True if the loss went non-finite."""
    return fit(model, len(x), lambda idx, g: F.cross_entropy(model(x[idx]), y[idx]), epochs, seed, lr, batch)


def fit(
    model: nn.Module,
    n: int,
    batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    epochs: int,
    seed: int,
    lr: float = 1e-3,
    batch: int = 64,
) -> bool:
    """Adam for ``epochs`` epochs over ``n`` examples shuffled from ``seed``, on ``batch_loss(indices,
    generator)`` (the generator the shuffles draw from, for a loss that draws too); True if the loss
    went non-finite (every efficacy benchmark trains through it)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    diverged = False
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            loss = batch_loss(perm[i : i + batch], g)
            if not torch.isfinite(loss):
                diverged = True
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return diverged


def _first_weight(model: nn.Module) -> tuple[str, torch.Tensor]:
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() >= 2 and not name.startswith("resify."):
            return name, p
    raise ValueError(f"{type(model).__name__} has no layer weight")


@dataclass(frozen=True)
class Probe:
    """The first layer's mean |grad| at the current weights and, when measured by the report, its verdict."""

    first_grad: float
    verdict: str | None
    recommendation: str | None


def first_layer_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Probe:
    """Mean |∂ cross-entropy / ∂ W| of the first layer's weight on (x, y), at the model's current weights.

    Uses ``resify.gradient_flow`` (which also gives the report's verdict and recommendation)
    when the installed resify has it, else plain autograd on a copy; both leave the model as it was.
    """
    name, _ = _first_weight(model)
    flow = getattr(resify, "gradient_flow", None)
    if flow is not None:
        report = flow(model, x, target=y)  # cross-entropy for integer targets
        layer = report.layer(name.rsplit(".", 1)[0])
        return Probe(layer.mean_abs_grad or 0.0, report.verdict, report.recommendation)
    import copy

    probe = copy.deepcopy(model)
    _, weight = _first_weight(probe)
    F.cross_entropy(probe(x), y).backward()
    return Probe(0.0 if weight.grad is None else weight.grad.abs().mean().item(), None, None)


def _one(
    model_kind: str,
    act: str,
    depth: int,
    variant: str,
    seed: int,
    epochs: int,
    data: Digits,
    net: nn.Module,
    plain_grad: float | None,
    to_input: Callable[[torch.Tensor], torch.Tensor],
) -> Run:
    xtr, xte = to_input(data.x_train), to_input(data.x_test)
    probe = first_layer_grad(net, xtr, data.y_train)
    grad = probe.first_grad
    ratio = None if variant == "plain" or plain_grad is None else _ratio(grad, plain_grad)
    t = time.perf_counter()
    diverged = train(net, xtr, data.y_train, epochs, seed)
    seconds = time.perf_counter() - t
    return Run(
        model_kind,
        act,
        depth,
        variant,
        seed,
        epochs,
        accuracy(net, xte, data.y_test),
        ratio,
        grad,
        seconds,
        diverged,
        probe.verdict,
        probe.recommendation,
    )


def _ratio(a: float, b: float) -> float:
    if b == 0.0:
        return math.inf if a > 0 else math.nan
    return a / b


def run_mlp(
    depth: int, act: str, variant: str, seed: int, epochs: int, data: Digits, plain_grad: float | None = None
) -> Run:
    """Build, measure the first-layer gradient, train and test one MLP."""
    net = build(variant, depth, act, seed, example_for(variant, data.x_train))
    return _one("mlp", act, depth, variant, seed, epochs, data, net, plain_grad, lambda x: x)


def run_cnn(
    variant: str, seed: int, epochs: int, data: Digits, norm: bool = True, plain_grad: float | None = None
) -> Run:
    """Build, measure, train and test the 21-conv VGG-style net (``variant``: plain/resify/resify+rezero)."""
    net = build_cnn(variant, seed, norm, example_for(variant, data.x_train))
    return _one("cnn" if norm else "cnn-nobn", "relu", 21, variant, seed, epochs, data, net, plain_grad, _image)


# ---------------------------------------------------------------------------------------------
# sweep, tables, figure


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    m = 100 * statistics.fmean(values)
    s = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}"


def _fmt_ratio(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    if any(math.isinf(v) for v in vals):
        return "inf (plain: 0)"
    geo = math.exp(statistics.fmean(math.log(v) for v in vals)) if all(v > 0 for v in vals) else statistics.fmean(vals)
    return f"{geo:.3g}"


def _group(runs: Sequence[Run], **key: object) -> list[Run]:
    return [r for r in runs if all(getattr(r, k) == v for k, v in key.items())]


def accuracy_tables(runs: Sequence[Run], markdown: bool = False) -> str:
    """One table per activation: depth × variant, test accuracy (%) mean ± std."""
    out = []
    for act in dict.fromkeys(r.act for r in runs if r.model == "mlp"):
        depths = sorted({r.depth for r in runs if r.model == "mlp" and r.act == act})
        variants = [v for v in VARIANTS if any(r.variant == v for r in _group(runs, model="mlp", act=act))]
        rows = []
        for d in depths:
            row: list[object] = [d]
            for v in variants:
                rs = _group(runs, model="mlp", act=act, depth=d, variant=v)
                cell = _mean_std([r.accuracy for r in rs])
                if any(r.diverged for r in rs):
                    cell += f" ({sum(r.diverged for r in rs)} diverged)"
                row.append(cell)
            rows.append(row)
        title = f"{act.upper()} MLP, width 64: test accuracy % (mean ± std over {_n_seeds(runs)} seeds)"
        out.append(
            ("### " if markdown else "")
            + title
            + "\n\n"
            + table(["depth", *[LABELS[v] for v in variants]], rows, markdown)
        )
    return "\n\n".join(out)


def grad_tables(runs: Sequence[Run], markdown: bool = False) -> str:
    """First-layer gradient ratio at init (geometric mean over seeds), variant / plain."""
    rows = []
    for act in dict.fromkeys(r.act for r in runs if r.model == "mlp"):
        for d in sorted({r.depth for r in runs if r.model == "mlp" and r.act == act}):
            plain = _group(runs, model="mlp", act=act, depth=d, variant="plain")
            row: list[object] = [act, d, f"{statistics.fmean(r.first_grad for r in plain):.3g}" if plain else "-"]
            for v in VARIANTS[1:]:
                rs = _group(runs, model="mlp", act=act, depth=d, variant=v)
                zero = bool(rs) and all(r.first_grad == 0.0 for r in rs)
                row.append("0 (gate = 0)" if zero else _fmt_ratio([r.grad_ratio for r in rs]))
            rows.append(row)
    return table(
        ["activation", "depth", "plain mean |grad|", *[LABELS[v] + " / plain" for v in VARIANTS[1:]]], rows, markdown
    )


def report_table(runs: Sequence[Run], markdown: bool = False) -> str:
    """resify.gradient_flow's verdict at init per variant (over seeds), and what it recommends."""
    rows = []
    for act in dict.fromkeys(r.act for r in runs if r.model == "mlp"):
        for d in sorted({r.depth for r in runs if r.model == "mlp" and r.act == act}):
            row: list[object] = [act, d]
            for v in VARIANTS:
                verdicts = sorted({r.verdict or "-" for r in _group(runs, model="mlp", act=act, depth=d, variant=v)})
                row.append("/".join(verdicts) or "-")
            row.append(_recommended(runs, act, d) or "-")
            rows.append(row)
    return table(["activation", "depth", *[LABELS[v] for v in VARIANTS], "recommended setting"], rows, markdown)


def _recommended(runs: Sequence[Run], act: str, depth: int) -> str | None:
    """The variant the report leads to: what the plain net's report recommends ('resify', or
    'resify+rezero' when it says gate='rezero'), then rezero if the gate=None report says 'exploding'."""
    plain = _group(runs, model="mlp", act=act, depth=depth, variant="plain")
    conv = _group(runs, model="mlp", act=act, depth=depth, variant="resify")
    if not plain or not conv or plain[0].verdict is None:
        return None
    if any("gate='rezero'" in (r.recommendation or "") for r in plain):
        return "resify+rezero"
    if any(r.verdict == "exploding" and "rezero" in (r.recommendation or "") for r in conv):
        return "resify+rezero"
    return "resify"


def cnn_table(runs: Sequence[Run], markdown: bool = False) -> str:
    rows = []
    for kind, label in (("cnn", "21 conv + BatchNorm"), ("cnn-nobn", "21 conv, no norm")):
        rs = _group(runs, model=kind)
        if not rs:
            continue
        row: list[object] = [label]
        for v in CNN_VARIANTS:
            vs = [r for r in rs if r.variant == v]
            cell = _mean_std([r.accuracy for r in vs])
            if vs and v != "plain":
                zero = all(r.first_grad == 0.0 for r in vs)
                cell += f" (grad ×{'0' if zero else _fmt_ratio([r.grad_ratio for r in vs])})"
            row.append(cell)
        rows.append(row)
    return table(["VGG-style CNN", *[LABELS[v] for v in CNN_VARIANTS]], rows, markdown)


#: the CNN's variants (no hand-written CNN)
CNN_VARIANTS = ("plain", "resify", "resify+rezero", "default")


def big_table(runs: Sequence[Run], markdown: bool = False) -> str:
    rows = []
    for v in VARIANTS:
        rs = _group(runs, model="mlp-big", variant=v)
        if rs:
            rows.append(
                [
                    rs[0].depth,
                    LABELS[v],
                    _mean_std([r.accuracy for r in rs]),
                    ", ".join(f"{100 * r.accuracy:.1f}" for r in rs),
                    f"{statistics.fmean(r.seconds for r in rs):.0f} s",
                ]
            )
    return table(["depth", "variant", "test acc %", "per seed", "train time / seed"], rows, markdown)


def _n_seeds(runs: Sequence[Run]) -> int:
    return len({r.seed for r in runs})


def figure(runs: Sequence[Run], path: str) -> None:
    """Accuracy vs depth, one panel per activation, a line per variant with ±1 std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acts = list(dict.fromkeys(r.act for r in runs if r.model == "mlp"))
    fig, axes = plt.subplots(1, len(acts), figsize=(4.2 * len(acts), 3.8), sharey=True, squeeze=False)
    style = {
        "plain": ("#888888", "o", "-"),
        "resify": ("#1f77b4", "s", "-"),
        "resify+rezero": ("#2ca02c", "^", "-"),
        "hand": ("#d62728", "x", "--"),
        "default": ("#9467bd", "D", ":"),
    }
    for ax, act in zip(axes[0], acts):
        for v in VARIANTS:
            depths = sorted({r.depth for r in _group(runs, model="mlp", act=act, variant=v)})
            if not depths:
                continue
            accs = [[100 * r.accuracy for r in _group(runs, model="mlp", act=act, variant=v, depth=d)] for d in depths]
            mean = [statistics.fmean(a) for a in accs]
            std = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
            color, marker, ls = style[v]
            ax.errorbar(
                depths,
                mean,
                yerr=std,
                label=LABELS[v],
                color=color,
                marker=marker,
                linestyle=ls,
                capsize=3,
                markersize=6,
                linewidth=1.6,
                alpha=0.9,
            )
        ax.axhline(10, color="#bbbbbb", linestyle=":", linewidth=1)
        ax.text(min(r.depth for r in runs if r.model == "mlp"), 12, "chance", color="#999999", fontsize=8)
        ax.set_xscale("log")
        ticks = sorted({r.depth for r in _group(runs, model="mlp", act=act)})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_ylim(0, 102)
        ax.set_title(f"{act.upper()} MLP (width 64)")
        ax.set_xlabel("depth (Linear layers)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy % (mean ± std)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    epochs = {r.epochs for r in runs}
    fig.suptitle(
        f"load_digits, Adam 1e-3, batch 64, {'/'.join(map(str, sorted(epochs)))} epochs, {_n_seeds(runs)} seeds",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_markdown(runs: Sequence[Run], path: str, commands: Sequence[str], machine_line: str, seconds: float) -> None:
    mlp = [r for r in runs if r.model == "mlp"]
    epochs = "/".join(str(e) for e in sorted({r.epochs for r in runs}))
    seeds = ", ".join(str(x) for x in sorted({r.seed for r in runs}))
    parts = [
        "# Efficacy on load_digits",
        "",
        *[f"Command: `{c}`  " for c in commands],
        f"Machine: {machine_line}  ",
        f"Training time: {seconds / 60:.0f} min in all. Split seed {SPLIT_SEED} (stratified 75/25: 1,347 train, "
        "450 test), features standardised on the training part; Adam lr 1e-3, batch 64, "
        f"{epochs} epochs, seeds {seeds}; width 64; depth = Linear layers "
        "(the last is the output layer). Accuracy is the final test accuracy after the fixed budget.",
        "",
        "Variants: **plain** (the seed's `ImprovedResidualNetwork` pattern, `use_shortcut=False`), "
        "**resify gate=None** (`resify.apply(plain, x)`), **resify gate='rezero'**, "
        "**hand-written** (`use_shortcut=True`: `x = act(linear(x)) + x`; the 64→10 output layer is "
        "linear and gets no shortcut, as resify adds none there), **resify default** (`resify.apply(plain, "
        f"batch)`: the gate left to the default, `'auto'`, chosen site by site from a forward of `batch`, "
        f"the first {EXAMPLE_BATCH} training examples).",
        "",
    ]
    if mlp:
        parts += [
            "## MLP depth sweep",
            "",
            accuracy_tables(runs, markdown=True),
            "",
            "![accuracy vs depth](../../docs/efficacy_depth.png)",
            "",
            "## First-layer gradient at initialisation",
            "",
            "Mean |∂loss/∂W| of the first Linear weight on the whole training set (cross-entropy), "
            "variant over plain, geometric mean over seeds. With `gate='rezero'` every branch is "
            "multiplied by a gate that starts at 0, so the first layer's gradient is exactly 0 at "
            "initialisation (only the gates get gradient on the first step): the ratio is 0 by "
            "construction, not a failure.",
            "",
            grad_tables(runs, markdown=True),
            "",
            "## What the report says at initialisation",
            "",
            "`resify.gradient_flow(model, x_train, target=y_train)` on each network before training "
            "(verdicts over the seeds). The *recommended setting* follows the report: a plain net that "
            "is 'vanishing' is told to add shortcuts, ungated (`shortcut='auto'`) below 32 layers and "
            "with `gate='rezero'` from 32 layers on; where the gate=None conversion is 'exploding', "
            "its report recommends `gate='rezero'` too.",
            "",
            report_table(runs, markdown=True),
            "",
        ]
    if any(r.model.startswith("cnn") for r in runs):
        parts += [
            "## VGG-style CNN, 21 conv layers",
            "",
            "Stages of 7 conv3×3(+BatchNorm)+ReLU at 16/32/64 channels on the 1×8×8 images, max-pool "
            "between stages, global average pool, Linear(64, 10). Test accuracy %, mean ± std; "
            "in brackets the first-layer gradient ratio converted / plain.",
            "",
            cnn_table(runs, markdown=True),
            "",
        ]
    if any(r.model == "mlp-big" for r in runs):
        depth = next(r.depth for r in runs if r.model == "mlp-big")
        parts += [f"## {depth:,}-layer MLP (GELU, width 64)", "", big_table(runs, markdown=True), ""]
    parts += ["## Targets", "", *_targets(runs), ""]
    with open(path, "w") as f:
        f.write("\n".join(parts))


def default_targets(runs: Sequence[Run]) -> list[str]:
    """Per network: the default's mean accuracy against the best of gate=None, gate='rezero' and the
    hand-written net (within 1 point?) and against the plain net (not more than 1 point below?)."""
    lines, worst = [], []
    keys = dict.fromkeys((r.model, r.act, r.depth) for r in runs if r.variant == "default" and r.model != "mlp-big")
    for model, act, depth in keys:
        mean = {
            v: statistics.fmean(rs)
            if (rs := [r.accuracy for r in _group(runs, model=model, act=act, depth=depth, variant=v)])
            else None
            for v in VARIANTS
        }
        others = {v: m for v, m in mean.items() if v in ("resify", "resify+rezero", "hand") and m is not None}
        if mean["default"] is None or not others:
            continue
        best = max(others, key=lambda v: others[v])
        gap, over_plain = mean["default"] - others[best], mean["default"] - (mean["plain"] or 0.0)
        worst.append((gap, f"{model} {act} depth {depth}"))
        ok = gap >= -0.01 and over_plain >= -0.01
        lines.append(
            f"- default, {model} {act} depth {depth}: {100 * mean['default']:.1f}%; best of the others "
            f"{100 * others[best]:.1f}% ({LABELS[best]}), {100 * gap:+.1f} points; plain {100 * (mean['plain'] or 0):.1f}% "
            f"({'met' if ok else 'missed'})"
        )
    if worst:
        gap, where = min(worst)
        lines.append(
            f"- default: the largest shortfall against the best of the others is {100 * gap:+.1f} points ({where})"
        )
    return lines


def _targets(runs: Sequence[Run]) -> list[str]:
    lines = []
    for act in dict.fromkeys(r.act for r in runs if r.model == "mlp"):
        deepest = max((r.depth for r in runs if r.model == "mlp" and r.act == act), default=0)
        if deepest < 100:
            continue
        m = {
            v: statistics.fmean(
                [r.accuracy for r in _group(runs, model="mlp", act=act, depth=deepest, variant=v)] or [math.nan]
            )
            for v in VARIANTS
        }
        verdict = lambda a: "met" if a >= 0.95 else "missed"
        rec = _recommended(runs, act, deepest)
        if rec is not None:
            lines.append(
                f"- {act} depth {deepest}, the report's recommended setting ({LABELS[rec]}): "
                f"{100 * m[rec]:.1f}% (≥ 95%: {verdict(m[rec])}); plain {100 * m['plain']:.1f}%"
            )
        lines.append(
            f"- {act} depth {deepest}: plain {100 * m['plain']:.1f}%; resify gate=None "
            f"{100 * m['resify']:.1f}% ({verdict(m['resify'])}); gate='rezero' "
            f"{100 * m['resify+rezero']:.1f}% ({verdict(m['resify+rezero'])}); hand-written "
            f"{100 * m['hand']:.1f}%"
        )
    compared = 0
    for act in dict.fromkeys(r.act for r in runs if r.model == "mlp"):
        for d in sorted({r.depth for r in runs if r.model == "mlp" and r.act == act}):
            a = [r.accuracy for r in _group(runs, model="mlp", act=act, depth=d, variant="resify")]
            b = [r.accuracy for r in _group(runs, model="mlp", act=act, depth=d, variant="hand")]
            if len(a) > 1 and len(b) > 1:
                compared += 1
                gap = statistics.fmean(a) - statistics.fmean(b)
                noise = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
                if abs(gap) > 2 * noise + 0.005:
                    lines.append(
                        f"- {act} depth {d}: resify gate=None vs hand-written differ by "
                        f"{100 * gap:+.1f} points (2 standard errors: {200 * noise:.1f})"
                    )
    if compared and not any("differ by" in line for line in lines):
        lines.append(
            "- resify gate=None and the hand-written network agree within 2 standard errors "
            "(+0.5 point) at every depth and activation"
        )
    lines += default_targets(runs)
    big = _group(runs, model="mlp-big", variant="resify+rezero")
    if big:
        acc = statistics.fmean(r.accuracy for r in big)
        lines.append(
            f"- {big[0].depth:,}-layer gate='rezero': {100 * acc:.1f}% (≥ 93%: {'met' if acc >= 0.93 else 'missed'}; "
            f"{statistics.fmean(r.seconds for r in big):.0f} s of training per seed)"
        )
    return lines or ["- (no depth-100 or 1,000-layer rows in this run)"]


def main(argv: Sequence[str] | None = None) -> list[Run]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64, 100])
    p.add_argument("--activations", nargs="+", default=list(ACTIVATIONS), choices=list(ACTIVATIONS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--no-cnn", action="store_true", help="skip the VGG-style CNN")
    p.add_argument("--big", action="store_true", help="also train a 1,000-layer MLP (plain and gate='rezero')")
    p.add_argument("--big-depth", type=int, default=1000)
    p.add_argument("--only-big", action="store_true", help="with --big: skip the sweep and the CNN")
    p.add_argument("--only-cnn", action="store_true", help="train the CNNs only; their rows replace the saved ones")
    p.add_argument(
        "--merge",
        action="store_true",
        help="train only --variants (the plain nets' first-layer gradient read from the saved runs) and merge "
        "their rows into the saved .json, in place of the saved rows of the same network, variant and seed",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: depths 8 32, seed 0, 5 epochs, no CNN, writes nothing"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "efficacy.md"))
    p.add_argument("--figure", default=os.path.join(ROOT, "docs", "efficacy_depth.png"))
    p.add_argument("--no-write", action="store_true", help="print only; write no files")
    p.add_argument("--replot", action="store_true", help="rewrite the Markdown and figure from the saved .json")
    p.add_argument(
        "--rejudge",
        action="store_true",
        help="like --replot, after asking the installed resify's "
        "report again for each saved network's verdict and recommendation at initialisation (no training)",
    )
    args = p.parse_args(argv)
    json_path = os.path.splitext(args.results)[0] + ".json"
    if args.replot or args.rejudge:
        with open(json_path) as f:
            saved = json.load(f)
        runs = [Run(**r) for r in saved["runs"]]
        if args.rejudge:
            runs = rejudge(runs)
            rejudged = "python -m benchmarks.efficacy_digits --rejudge"
            saved["commands"] = [c for c in saved["commands"] if c != rejudged] + [rejudged]
        if args.no_write:
            print(report_table(runs))
        else:
            _write(runs, args, saved["commands"], saved["machine"], saved["seconds"], json_path)
        return runs
    if args.quick:
        args.depths, args.seeds, args.epochs, args.no_cnn, args.no_write = [8, 32], [0], 5, True, True
    torch.set_num_threads(args.threads)
    data = load_data()
    runs: list[Run] = []
    start = time.perf_counter()
    saved_runs: list[Run] = []
    if args.merge:
        with open(json_path) as f:
            saved_merge = json.load(f)
        saved_runs = [Run(**r) for r in saved_merge["runs"]]

    def plain_first_grad(model: str, act: str, depth: int, seed: int) -> float | None:
        """The saved plain net's first-layer gradient (``--merge``: the plain nets are not trained again)."""
        found = [
            r.first_grad
            for r in saved_runs
            if (r.model, r.act, r.depth, r.seed, r.variant) == (model, act, depth, seed, "plain")
        ]
        return found[0] if found else None

    def log(r: Run) -> None:
        runs.append(r)
        ratio = "" if r.grad_ratio is None else f" grad x{r.grad_ratio:.3g}"
        print(
            f"  {r.model:8s} {r.act:5s} depth {r.depth:4d} {r.variant:14s} seed {r.seed}: "
            f"{100 * r.accuracy:5.1f}%{ratio} ({r.seconds:.1f} s){' DIVERGED' if r.diverged else ''}",
            flush=True,
        )

    if not args.only_big and not args.only_cnn:
        for act in args.activations:
            for depth in args.depths:
                for seed in args.seeds:
                    plain_grad = plain_first_grad("mlp", act, depth, seed) if args.merge else None
                    first = [] if args.merge else ["plain"]
                    for v in [*first, *[v for v in args.variants if v != "plain"]]:
                        r = run_mlp(depth, act, v, seed, args.epochs, data, plain_grad)
                        plain_grad = r.first_grad if v == "plain" else plain_grad
                        if v in args.variants:
                            log(r)
    if not args.only_big and not args.no_cnn:
        for norm in (True, False):
            for seed in args.seeds:
                kind = "cnn" if norm else "cnn-nobn"
                plain_grad = plain_first_grad(kind, "relu", 21, seed) if args.merge else None
                first = [] if args.merge else ["plain"]
                for v in [*first, *[v for v in CNN_VARIANTS[1:] if v in args.variants]]:
                    r = run_cnn(v, seed, args.epochs, data, norm, plain_grad)
                    plain_grad = r.first_grad if v == "plain" else plain_grad
                    log(r)
    if args.big and not args.only_cnn:
        for seed in args.seeds:
            plain_grad = None
            for v in ("plain", "resify+rezero"):
                r = run_mlp(args.big_depth, "gelu", v, seed, args.epochs, data, plain_grad)
                plain_grad = r.first_grad if v == "plain" else plain_grad
                log(Run(**{**asdict(r), "model": "mlp-big"}))
    seconds = time.perf_counter() - start
    commands = ["python -m benchmarks.efficacy_digits " + " ".join(sys.argv[1:] if argv is None else argv)]
    if args.only_big and not args.no_write and os.path.exists(json_path):
        with open(json_path) as f:  # keep the sweep and CNN rows of the last full run
            saved = json.load(f)
        runs[:0] = [Run(**r) for r in saved["runs"] if r["model"] != "mlp-big"]
        commands = [c for c in saved["commands"] if "--only-big" not in c] + commands
        seconds += saved["seconds"]
    if args.merge:  # the saved runs, those trained again replaced by the new ones
        key = lambda r: (r.model, r.act, r.depth, r.variant, r.seed)
        new = {key(r) for r in runs}
        runs[:0] = [r for r in saved_runs if key(r) not in new]
        commands = saved_merge["commands"] + commands
        seconds += saved_merge["seconds"]
    if args.only_cnn and not args.merge and not args.no_write and os.path.exists(json_path):
        with open(json_path) as f:  # keep the MLP rows of the last run, replace the CNN rows
            saved = json.load(f)
        runs[:0] = [Run(**r) for r in saved["runs"] if not r["model"].startswith("cnn")]
        commands = [c for c in saved["commands"] if "--only-cnn" not in c] + commands
        seconds += saved["seconds"] - sum(r["seconds"] for r in saved["runs"] if r["model"].startswith("cnn"))

    print()
    print(machine())
    if any(r.model == "mlp" for r in runs):
        print(
            "\n"
            + accuracy_tables(runs)
            + "\n\nFirst-layer gradient ratio at init (variant / plain)\n\n"
            + grad_tables(runs)
            + "\n\nresify.gradient_flow verdict at init\n\n"
            + report_table(runs)
        )
    if any(r.model.startswith("cnn") for r in runs):
        print("\n" + cnn_table(runs))
    if any(r.model == "mlp-big" for r in runs):
        print("\n" + big_table(runs))
    print("\nTargets:\n" + "\n".join(_targets(runs)))
    if not args.no_write:
        _write(runs, args, [c.strip() for c in commands], machine(), seconds, json_path)
    return runs


def rejudge(runs: list[Run]) -> list[Run]:
    """The saved runs with ``verdict`` and ``recommendation`` measured again on the same networks at
    initialisation (they are rebuilt from their seeds), so that a change to the report's rules
    shows in the tables without training anything again."""
    data = load_data()
    out = []
    for r in runs:
        if r.model in ("mlp", "mlp-big"):
            net, x = build(r.variant, r.depth, r.act, r.seed, example_for(r.variant, data.x_train)), data.x_train
        else:
            net = build_cnn(r.variant, r.seed, r.model == "cnn", example_for(r.variant, data.x_train))
            x = _image(data.x_train)
        probe = first_layer_grad(net, x, data.y_train)
        if probe.first_grad != r.first_grad and not math.isclose(probe.first_grad, r.first_grad, rel_tol=1e-3):
            raise SystemExit(
                f"{r.model} {r.act} {r.depth} {r.variant} seed {r.seed}: rebuilt net's first-layer "
                f"gradient {probe.first_grad:.4g} differs from the saved {r.first_grad:.4g}"
            )
        out.append(Run(**{**asdict(r), "verdict": probe.verdict, "recommendation": probe.recommendation}))
    return out


def _write(
    runs: list[Run], args: argparse.Namespace, commands: list[str], machine_line: str, seconds: float, json_path: str
) -> None:
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    write_markdown(runs, args.results, commands, machine_line, seconds)
    write_json(
        json_path,
        {"machine": machine_line, "commands": commands, "seconds": seconds, "runs": [asdict(r) for r in runs]},
    )
    if any(r.model == "mlp" for r in runs):
        figure(runs, args.figure)
    print(
        f"\nwrote {os.path.relpath(args.results, ROOT)} and its .json"
        + (f", {os.path.relpath(args.figure, ROOT)}" if any(r.model == "mlp" for r in runs) else "")
    )


if __name__ == "__main__":
    main()
