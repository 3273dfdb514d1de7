"""Efficacy on sequences: do deep plain recurrent and attention stacks train once resify adds shortcuts?

scikit-learn's ``load_digits`` read row by row: each 8×8 image is a sequence of 8 steps of 8
features (the split and the standardisation of ``benchmarks/efficacy_digits.py``: stratified 75/25
with split seed 0, every pixel standardised on the training part). Every network trains with Adam
(lr 1e-3), batch 64, for a fixed budget of epochs (20 by default) from each seed; the tables give
final test accuracy, mean ± std over seeds.

Networks (width 64, no dropout):

* ``lstm``: ``Linear(8, 64)``, then ``depth`` single-layer ``nn.LSTM(64, 64)`` in an
  ``nn.ModuleList`` (each ``x, _ = lstm(x)``), then ``Linear(64, 10)`` on the last step;
* ``transformer``: ``Linear(8, 64)`` plus a learned position embedding, then ``depth`` skipless
  post-norm blocks ``x = LN1(MHA(x)); x = LN2(FF2(relu(FF1(x))))`` (4 heads, FF width 128), then the
  mean over the steps and ``Linear(64, 10)``.

Each as ``plain`` (``use_shortcut=False``), ``resify`` (``resify.apply(plain, x, gate=None)``),
``resify+rezero`` (``gate='rezero'``) and ``hand`` (the same class with ``use_shortcut=True``:
``x = x + lstm(x)[0]``; ``x = x + LN1(MHA(x))``, ``x = x + LN2(FF(x))``, the placement resify
uses), and ``default`` (``resify.apply(plain, batch)``, the gate left to the default, ``'auto'``,
measured on a training batch). Before training, each configuration checks that resify planned
exactly those shortcuts and that ``resify.apply(plain, gate=None)``, with the hand-written net's weights, computes the hand-written net's
outputs and gradients. At initialisation it records ``resify.gradient_flow``'s verdict and the
first-layer gradient gain ``resify.compare(flow(plain), flow(variant)).first_layer_ratio``; at
initialisation and after training, the spread of the head's input over the test set (a net that
maps every input to the same representation has none).

Run from the repository root::

    python -m benchmarks.efficacy_sequences            # the full sweep (13–16 min on 1 CPU thread)
    python -m benchmarks.efficacy_sequences --quick    # LSTM 16, Transformer 12, seed 0, 3 epochs; writes nothing

It prints plain tables and writes ``benchmarks/results/efficacy-sequences.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import resify
from benchmarks.common import copy_shortcut_weights, machine, table, write_json
from benchmarks.efficacy_digits import (
    EXAMPLE_BATCH,
    LABELS,
    SPLIT_SEED,
    VARIANTS,
    Digits,
    _mean_std,
    accuracy,
    load_data,
    train,
)

__all__ = [
    "LSTMStack",
    "PostNormBlock",
    "PostNormEncoder",
    "NETS",
    "VARIANTS",
    "SeqRun",
    "Equivalence",
    "as_sequences",
    "build",
    "expected_sites",
    "check_equivalence",
    "head_spread",
    "run_one",
    "main",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, FEATURES, WIDTH, CLASSES = 8, 8, 64, 10
_GATE = {"resify": None, "resify+rezero": "rezero"}
_TITLE = {"lstm": "stacked LSTM", "transformer": "post-norm Transformer"}
#: output and gradient differences above this fail the resify-vs-hand-written check
TOLERANCE = 1e-5


class LSTMStack(nn.Module):
    """``Linear(8, 64)``, ``depth`` one-layer LSTMs of width 64, ``Linear(64, 10)`` on the last step.

    With ``use_shortcut`` every LSTM adds its input back (``x = x + lstm(x)[0]``, GNMT's residual
    stack): the hand-written counterpart of ``resify.apply(plain)``.
    """

    def __init__(self, depth: int, use_shortcut: bool = False, width: int = WIDTH) -> None:
        super().__init__()
        self.use_shortcut = use_shortcut
        self.inp = nn.Linear(FEATURES, width)
        self.lstms = nn.ModuleList(nn.LSTM(width, width, batch_first=True) for _ in range(depth))
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for lstm in self.lstms:
            y, _ = lstm(x)
            x = x + y if self.use_shortcut else y
        return self.head(x[:, -1])


class PostNormBlock(nn.Module):
    """A post-norm Transformer encoder block, with or without its two residuals.

    Plain: ``x = LN1(MHA(x)); x = LN2(FF2(relu(FF1(x))))``. With ``use_shortcut``:
    ``x = x + LN1(MHA(x)); x = x + LN2(FF(x))``, each norm on its branch (where resify puts the
    shortcut of a skipless post-norm block), not the original Transformer's ``LN(x + MHA(x))``.
    """

    def __init__(self, width: int = WIDTH, heads: int = 4, ff: int = 2 * WIDTH, use_shortcut: bool = False) -> None:
        super().__init__()
        self.use_shortcut = use_shortcut
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln1 = nn.LayerNorm(width)
        self.ff1 = nn.Linear(width, ff)
        self.ff2 = nn.Linear(ff, width)
        self.ln2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.ln1(self.attn(x, x, x, need_weights=False)[0])
        x = x + a if self.use_shortcut else a
        f = self.ln2(self.ff2(torch.relu(self.ff1(x))))
        return x + f if self.use_shortcut else f


class PostNormEncoder(nn.Module):
    """``Linear(8, 64)`` + a learned position embedding, ``depth`` post-norm blocks, mean over steps, ``Linear(64, 10)``."""

    def __init__(self, depth: int, use_shortcut: bool = False, width: int = WIDTH) -> None:
        super().__init__()
        self.inp = nn.Linear(FEATURES, width)
        self.pos = nn.Parameter(0.02 * torch.randn(1, STEPS, width))
        self.blocks = nn.ModuleList(PostNormBlock(width, use_shortcut=use_shortcut) for _ in range(depth))
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


NETS: dict[str, type[LSTMStack] | type[PostNormEncoder]] = {"lstm": LSTMStack, "transformer": PostNormEncoder}


@dataclass(frozen=True)
class SeqRun:
    """One trained network: what it was, how its gradient looked at initialisation, and how it did."""

    model: str  # "lstm" or "transformer"
    depth: int
    variant: str
    seed: int
    epochs: int
    accuracy: float
    first_grad: float  # mean |grad| of the first layer's weight ('inp') at init, on the training set
    grad_ratio: float | None  # compare(flow(plain), flow(variant)).first_layer_ratio (None for plain)
    verdict: str  # resify.gradient_flow's verdict at init
    spread_init: float  # at init: the head input's std over the test set ÷ its rms (see head_spread)
    spread: float  # the same after training
    seconds: float
    diverged: bool


@dataclass(frozen=True)
class Equivalence:
    """resify.apply(plain) against the hand-written residual net with the same weights."""

    model: str
    depth: int
    sites: int  # shortcuts resify planned (all identities, all where expected)
    output_diff: float  # max |Δ| of the logits on the test set
    grad_diff: float  # max |Δ| of the cross-entropy gradient over every parameter


def as_sequences(x: torch.Tensor) -> torch.Tensor:
    """[N, 64] pixel rows → [N, 8 steps, 8 features]: the image read top to bottom, a row per step."""
    return x.view(-1, STEPS, FEATURES)


def build(model: str, variant: str, depth: int, seed: int, example: torch.Tensor) -> nn.Module:
    """The ``variant`` of ``model`` with ``depth`` LSTMs or blocks, initialised from ``seed``.

    Every variant starts from the plain net's weights (resify adds no weights here but the
    rezero gates, which start at 0).
    """
    torch.manual_seed(seed)
    plain = NETS[model](depth, use_shortcut=False)
    if variant == "plain":
        return plain
    if variant == "hand":
        hand = NETS[model](depth, use_shortcut=True)
        hand.load_state_dict(plain.state_dict())  # strict: the same parameters, the same weights
        return hand
    if variant == "default":  # the gate left to the default ('auto': measured on ``example``)
        return resify.apply(plain, example)
    return resify.apply(plain, example, gate=_GATE[variant])


def expected_sites(model: str, depth: int) -> list[tuple[str, str]]:
    """(first layer, last layer) of every shortcut the hand-written net has, in forward order."""
    if model == "lstm":
        return [(f"lstms.{i}", f"lstms.{i}") for i in range(depth)]
    return [site for i in range(depth) for site in ((f"blocks.{i}.attn",) * 2, (f"blocks.{i}.ff1", f"blocks.{i}.ff2"))]


def check_equivalence(model: str, depth: int, data: Digits, seed: int = 0) -> Equivalence:
    """Convert the plain net, give the hand-written one its weights, compare plans, outputs and gradients.

    Raises:
        SystemExit: resify planned other shortcuts than the hand-written net has, or the two
            compute different outputs or gradients (then the tables would compare different models).
    """
    x, y = as_sequences(data.x_test), data.y_test
    torch.manual_seed(seed)
    plain = NETS[model](depth, use_shortcut=False)
    converted = resify.apply(plain, x[:2], gate=None)  # the hand-written nets have no gates
    torch.manual_seed(seed + 1)  # other weights, so that only the copy can make the two agree
    hand = NETS[model](depth, use_shortcut=True)
    copy_shortcut_weights(converted, hand)
    plan = resify.applied_plan(converted)
    found = [(s.start, s.end, s.kind) for s in plan.sites]
    want = [(a, b, "identity") for a, b in expected_sites(model, depth)]
    if found != want:
        raise SystemExit(f"{model} depth {depth}: resify planned {found}, the hand-written net has {want}\n{plan}")
    outs, grads = [], []
    for net in (converted, hand):
        net.zero_grad(set_to_none=True)
        out = net(x)
        F.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in net.named_parameters()})
        net.zero_grad(set_to_none=True)
    output_diff = (outs[0] - outs[1]).abs().max().item()
    if set(grads[0]) != set(grads[1]):
        raise SystemExit(f"{model} depth {depth}: parameters differ: {sorted(set(grads[0]) ^ set(grads[1]))}")
    unreached = sorted(n for g in grads for n, t in g.items() if t is None)
    if unreached:
        raise SystemExit(f"{model} depth {depth}: no gradient reaches {unreached}")
    grad_diff = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    if not output_diff <= TOLERANCE or not grad_diff <= TOLERANCE:
        raise SystemExit(
            f"{model} depth {depth}: resify.apply(plain) and the hand-written net differ: "
            f"outputs by {output_diff:.3g}, gradients by {grad_diff:.3g} (tolerance {TOLERANCE})"
        )
    return Equivalence(model, depth, len(plan.sites), output_diff, grad_diff)


@torch.no_grad()
def head_spread(model: nn.Module, x: torch.Tensor) -> float:
    """The head's input over ``x``: mean per-feature std over the samples ÷ its rms (0: every input alike)."""
    seen: list[torch.Tensor] = []
    hook = model.get_submodule("head").register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        hook.remove()
        model.train(was)
    h = seen[0]
    rms = h.pow(2).mean().sqrt().item()
    return h.std(0).mean().item() / rms if rms > 0 else 0.0


def example_for(variant: str, x: torch.Tensor) -> torch.Tensor:
    """The example a variant is converted with: a training batch for the default (its gates are
    measured on it, see ``benchmarks.efficacy_digits.EXAMPLE_BATCH``), two sequences for the others."""
    return x[:EXAMPLE_BATCH] if variant == "default" else x[:2]


def run_one(
    model: str,
    depth: int,
    variant: str,
    seed: int,
    epochs: int,
    data: Digits,
    plain_flow: resify.GradientFlow | None = None,
) -> tuple[SeqRun, resify.GradientFlow]:
    """Build, measure the gradient flow at init, train and test one network; returns its run and its flow."""
    xtr, xte = as_sequences(data.x_train), as_sequences(data.x_test)
    net = build(model, variant, depth, seed, example_for(variant, xtr))
    flow = resify.gradient_flow(net, xtr, target=data.y_train)
    ratio = None if variant == "plain" or plain_flow is None else resify.compare(plain_flow, flow).first_layer_ratio
    first = flow.layer("inp").mean_abs_grad or 0.0
    spread_init = head_spread(net, xte)
    t = time.perf_counter()
    diverged = train(net, xtr, data.y_train, epochs, seed)
    seconds = time.perf_counter() - t
    run = SeqRun(
        model,
        depth,
        variant,
        seed,
        epochs,
        accuracy(net, xte, data.y_test),
        first,
        ratio,
        flow.verdict,
        spread_init,
        head_spread(net, xte),
        seconds,
        diverged,
    )
    return run, flow


# ---------------------------------------------------------------------------------------------
# tables


def _group(runs: Sequence[SeqRun], **key: object) -> list[SeqRun]:
    return [r for r in runs if all(getattr(r, k) == v for k, v in key.items())]


def _configs(runs: Sequence[SeqRun]) -> list[tuple[str, int]]:
    return list(dict.fromkeys((r.model, r.depth) for r in runs))


def _geo(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not vals:
        return "-"
    return f"{math.exp(statistics.fmean(math.log(v) for v in vals)):.3g}"


def accuracy_table(runs: Sequence[SeqRun], markdown: bool = False) -> str:
    """(model, depth) × variant: test accuracy %, mean ± std over seeds."""
    rows = []
    for model, depth in _configs(runs):
        row: list[object] = [_TITLE[model], depth]
        for v in VARIANTS:
            rs = _group(runs, model=model, depth=depth, variant=v)
            cell = _mean_std([r.accuracy for r in rs])
            if any(r.diverged for r in rs):
                cell += f" ({sum(r.diverged for r in rs)} diverged)"
            row.append(cell)
        rows.append(row)
    return table(["model", "depth", *[LABELS[v] for v in VARIANTS]], rows, markdown)


def default_lines(runs: Sequence[SeqRun]) -> list[str]:
    """Per network: the default's mean accuracy against the best of gate=None, gate='rezero' and the
    hand-written net (within 1 point?) and against the plain net (not more than 1 point below?)."""
    lines = []
    for model, depth in _configs(runs):
        mean = {}
        for v in VARIANTS:
            rs = [r.accuracy for r in _group(runs, model=model, depth=depth, variant=v)]
            mean[v] = statistics.fmean(rs) if rs else None
        others = {v: m for v, m in mean.items() if v in ("resify", "resify+rezero", "hand") and m is not None}
        default, plain = mean["default"], mean["plain"]
        if default is None or not others or plain is None:
            continue
        best = max(others, key=lambda v: others[v])
        ok = default >= others[best] - 0.01 and default >= plain - 0.01
        lines.append(
            f"- {_TITLE[model]} depth {depth}: default {100 * default:.1f}%, best of the others "
            f"{100 * others[best]:.1f}% ({LABELS[best]}, {100 * (default - others[best]):+.1f} points), plain "
            f"{100 * plain:.1f}%: {'met' if ok else 'missed'}"
        )
    return lines


def grad_table(runs: Sequence[SeqRun], markdown: bool = False) -> str:
    """First-layer gradient gain at init (geometric mean over seeds) and the report's verdicts."""
    rows = []
    for model, depth in _configs(runs):
        plain = _group(runs, model=model, depth=depth, variant="plain")
        row: list[object] = [
            _TITLE[model],
            depth,
            f"{statistics.fmean(r.first_grad for r in plain):.3g}" if plain else "-",
            "/".join(sorted({r.verdict for r in plain})) or "-",
        ]
        for v in VARIANTS[1:]:
            rs = _group(runs, model=model, depth=depth, variant=v)
            row.append(f"{_geo([r.grad_ratio for r in rs])} ({'/'.join(sorted({r.verdict for r in rs})) or '-'})")
        rows.append(row)
    header = ["model", "depth", "plain: first layer's mean abs grad", "plain: verdict"]
    return table(header + [f"{LABELS[v]}: gain (verdict)" for v in VARIANTS[1:]], rows, markdown)


def spread_table(runs: Sequence[SeqRun], markdown: bool = False) -> str:
    """The spread of the head's input over the test set at init → after training, mean over seeds."""
    rows = []
    for model, depth in _configs(runs):
        row: list[object] = [_TITLE[model], depth]
        for v in VARIANTS:
            rs = _group(runs, model=model, depth=depth, variant=v)
            if not rs:
                row.append("-")
                continue
            before, after = statistics.fmean(r.spread_init for r in rs), statistics.fmean(r.spread for r in rs)
            row.append(f"{before:.2g} → {after:.2g}")
        rows.append(row)
    return table(["model", "depth", *[LABELS[v] for v in VARIANTS]], rows, markdown)


def equivalence_table(checks: Sequence[Equivalence], markdown: bool = False) -> str:
    rows = [
        [_TITLE[c.model], c.depth, f"{c.sites} identity", f"{c.output_diff:.2g}", f"{c.grad_diff:.2g}"] for c in checks
    ]
    return table(
        ["model", "depth", "resify's shortcuts", "largest Δ of a logit", "largest Δ of a gradient"], rows, markdown
    )


def _n_seeds(runs: Sequence[SeqRun]) -> int:
    return len({r.seed for r in runs})


def write_markdown(
    runs: Sequence[SeqRun],
    checks: Sequence[Equivalence],
    path: str,
    commands: Sequence[str],
    machine_line: str,
    seconds: float,
) -> None:
    epochs = "/".join(str(e) for e in sorted({r.epochs for r in runs}))
    seeds = ", ".join(str(s) for s in sorted({r.seed for r in runs}))
    parts = [
        "# Efficacy on sequences: load_digits read row by row",
        "",
        *[f"Command: `{c}`  " for c in commands],
        f"Machine: {machine_line}  ",
        f"Time: {seconds / 60:.0f} min in all (training, the gradient-flow reports and the checks). "
        f"Split seed {SPLIT_SEED} (stratified 75/25: 1,347 train, 450 test), features standardised on the "
        "training part, each 8×8 image read as 8 steps (its rows) of 8 features; Adam lr 1e-3, batch 64, "
        f"{epochs} epochs, seeds {seeds}; width 64, no dropout. Accuracy is the final test accuracy after "
        "the fixed budget; chance is 10%.",
        "",
        "Networks: **stacked LSTM**: `Linear(8, 64)`, *depth* one-layer `nn.LSTM(64, 64)` in an "
        "`nn.ModuleList` (`x, _ = lstm(x)`), `Linear(64, 10)` on the last step. **post-norm "
        "Transformer**: `Linear(8, 64)` + a learned position embedding, *depth* skipless post-norm "
        "blocks `x = LN1(MHA(x)); x = LN2(FF2(relu(FF1(x))))` (`nn.MultiheadAttention`, 4 heads; FF "
        "width 128), mean over the steps, `Linear(64, 10)`.",
        "",
        "Variants: **plain**; **resify gate=None** (`resify.apply(plain, x, gate=None)`); **resify gate='rezero'**; "
        "**hand-written** (the same class with `use_shortcut=True`: `x = x + lstm(x)[0]`; "
        "`x = x + LN1(MHA(x))`, `x = x + LN2(FF(x))`); **resify default** (`resify.apply(plain, batch)`: the "
        "gate left to the default, `'auto'`, chosen site by site from a forward of `batch`, the first "
        f"{EXAMPLE_BATCH} training sequences). All start from the same weights.",
        "",
        f"## Test accuracy % (mean ± std over {_n_seeds(runs)} seeds)",
        "",
        accuracy_table(runs, markdown=True),
        "",
        *(
            ["The default against the best of the others (within 1 point) and the plain net:", "", *lines, ""]
            if (lines := default_lines(runs))
            else []
        ),
        "## resify against the hand-written residual net",
        "",
        "Before training, for each configuration: `resify.apply(plain, x, gate=None)` (seed 0), the hand-written "
        "net given its weights (`benchmarks.common.copy_shortcut_weights`; drawn from another seed "
        "before), the plan checked to be exactly the hand-written net's shortcuts (every LSTM; every "
        "block's attention and feed-forward sub-layer, each with its norm inside the branch), and "
        "both run on the 450 test sequences: logits, and the gradient of the cross-entropy on every "
        "parameter. The script stops if they differ by more than "
        f"{TOLERANCE:g}.",
        "",
        equivalence_table(checks, markdown=True),
        "",
        "## Gradient at initialisation",
        "",
        "`resify.gradient_flow(net, x_train, target=y_train)` on each network before training. The "
        "*gain* is `resify.compare(flow(plain), flow(variant)).first_layer_ratio`: the mean |∂loss/∂W| "
        "of the first layer (`inp`, the `Linear(8, 64)`) in the variant over the plain net's, geometric "
        "mean over seeds; in brackets the variant's verdict. The first layer sits outside every "
        "shortcut, so with `gate='rezero'` it gets gradient at initialisation too (through the "
        "shortcuts alone, every branch being multiplied by 0).",
        "",
        grad_table(runs, markdown=True),
        "",
        "## Do the networks tell their inputs apart?",
        "",
        "The head's input (the last step's features for the LSTM, the mean over the steps for the "
        "Transformer) over the 450 test sequences: its per-feature standard deviation over the samples "
        "divided by its root mean square, at initialisation → after training, mean over seeds. Near 0, "
        "the network maps every input to the same representation and predicts one class.",
        "",
        spread_table(runs, markdown=True),
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(parts))


def main(argv: Sequence[str] | None = None) -> list[SeqRun]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--lstm-depths", type=int, nargs="+", default=[2, 8, 16])
    p.add_argument("--transformer-depths", type=int, nargs="+", default=[2, 12, 24])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: LSTM 16, Transformer 12, seed 0, 3 epochs, writes nothing"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "efficacy-sequences.md"))
    p.add_argument("--no-write", action="store_true", help="print only; write no files")
    p.add_argument("--replot", action="store_true", help="rewrite the Markdown from the saved .json")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--merge",
        action="store_true",
        help="train only --variants (the plain nets measured at initialisation, not trained) and merge their "
        "rows into the saved .json, in place of the saved rows of the same network, variant and seed",
    )
    args = p.parse_args(argv)
    json_path = os.path.splitext(args.results)[0] + ".json"
    if args.replot:
        with open(json_path) as f:
            saved = json.load(f)
        runs = [SeqRun(**r) for r in saved["runs"]]
        checks = [Equivalence(**c) for c in saved["checks"]]
        write_markdown(runs, checks, args.results, saved["commands"], saved["machine"], saved["seconds"])
        return runs
    if args.quick:
        args.lstm_depths, args.transformer_depths, args.seeds, args.epochs, args.no_write = [16], [12], [0], 3, True
    torch.set_num_threads(args.threads)
    data = load_data()
    runs: list[SeqRun] = []
    checks: list[Equivalence] = []
    start = time.perf_counter()
    depths = {"lstm": args.lstm_depths, "transformer": args.transformer_depths}
    for model in args.models:
        for depth in depths[model]:
            check = check_equivalence(model, depth, data)
            checks.append(check)
            print(
                f"  {model:11s} depth {depth:3d}: resify = hand-written ({check.sites} shortcuts; "
                f"max |Δ| logits {check.output_diff:.2g}, grads {check.grad_diff:.2g})",
                flush=True,
            )
            for seed in args.seeds:
                plain_flow = None
                if args.merge:  # the plain net's flow at initialisation, for the gain; not trained again
                    xtr = as_sequences(data.x_train)
                    plain_flow = resify.gradient_flow(
                        build(model, "plain", depth, seed, xtr[:2]), xtr, target=data.y_train
                    )
                for v in [v for v in VARIANTS if v in args.variants and not (args.merge and v == "plain")]:
                    r, flow = run_one(model, depth, v, seed, args.epochs, data, plain_flow)
                    plain_flow = flow if v == "plain" else plain_flow
                    runs.append(r)
                    gain = "" if r.grad_ratio is None else f" gain x{r.grad_ratio:.3g}"
                    print(
                        f"  {model:11s} depth {depth:3d} {v:14s} seed {seed}: {100 * r.accuracy:5.1f}% "
                        f"({r.verdict}{gain}; spread {r.spread_init:.2g} -> {r.spread:.2g}) ({r.seconds:.1f} s)"
                        f"{' DIVERGED' if r.diverged else ''}",
                        flush=True,
                    )
    seconds = time.perf_counter() - start
    command = "python -m benchmarks.efficacy_sequences " + " ".join(sys.argv[1:] if argv is None else argv)
    commands = [command.strip()]
    if args.merge:  # the saved runs, those trained again replaced by the new ones
        with open(json_path) as f:
            saved = json.load(f)
        key = lambda r: (r.model, r.depth, r.variant, r.seed)
        new = {key(r) for r in runs}
        runs[:0] = [r for r in (SeqRun(**d) for d in saved["runs"]) if key(r) not in new]
        commands, seconds = saved["commands"] + commands, saved["seconds"] + seconds
    print()
    print(machine())
    print(f"{seconds / 60:.1f} min in all\n")
    print("Test accuracy % (mean ± std over seeds)\n\n" + accuracy_table(runs))
    print("\n".join(["", *default_lines(runs)]))
    print("\nresify.apply(plain) against the hand-written net, same weights\n\n" + equivalence_table(checks))
    print("\nFirst-layer gradient gain at init, variant / plain (verdict)\n\n" + grad_table(runs))
    print("\nSpread of the head's input over the test set, at init -> after training\n\n" + spread_table(runs))
    if not args.no_write:
        os.makedirs(os.path.dirname(args.results), exist_ok=True)
        write_markdown(runs, checks, args.results, commands, machine(), seconds)
        write_json(
            json_path,
            {
                "machine": machine(),
                "commands": commands,
                "seconds": seconds,
                "checks": [asdict(c) for c in checks],
                "runs": [asdict(r) for r in runs],
            },
        )
        print(f"\nwrote {os.path.relpath(args.results, ROOT)} and its .json")
    return runs


if __name__ == "__main__":
    main()
