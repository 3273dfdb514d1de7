"""Efficacy on a conditioned net: does a deep plain conditional denoiser train once resify adds shortcuts?

scikit-learn's ``load_digits`` with the split and the standardisation of
``benchmarks/efficacy_digits.py`` (stratified 75/25 with split seed 0, every pixel standardised on the
training part). Each example is corrupted with Gaussian noise of its own level: a relative level
``σ ~ U(0.1, 1.0)`` drawn per example, the noise ``σ · s · ε`` with ``s`` the training data's std (one
scalar) and ``ε ~ N(0, I)``. The net gets the noisy image (64 features) and ``σ``, and is trained to
output the clean image (MSE). Training draws fresh σ and noise every step (from the seed); the test
set is corrupted once, with a generator of its own, the same for every network. Adam (lr 1e-3),
batch 64, a fixed budget of epochs (40 by default); the table gives the final test MSE against the
clean images, mean ± std over seeds.

The network (``Denoiser``, width 64, GELU): ``h = inp(x)``, then ``depth`` blocks
``h = act(lin(h) + cond(emb))``, then ``out(h)``, where ``emb`` is a fixed (parameter-free) Fourier
embedding of ``log σ`` (8 frequencies from 1 to 100, sin and cos) and ``cond`` a ``Linear(16, 64)`` per
block: the noise level is injected into every block, from another input than the main path. Variants:

* ``plain``: no residuals;
* ``default``: ``resify.apply(plain, (x_batch, sigma_batch))``, the default policy (``gate='auto'``,
  measured on a training batch of ``EXAMPLE_BATCH`` noisy examples and their levels);
* ``resify``: ``resify.apply(plain, example, gate=None)``;
* ``resify+rezero``: ``gate='rezero'``;
* ``hand``: the same class with ``use_shortcut=True``: ``h = h + block(h, emb)``, written by hand (the
  same layer weights as the plain net's).

Before training, each depth's default plan is checked: a site in every block, no existing shortcut
(the σ-injection, an add of a value from the other input, is not one), the gates ``gate='auto'``
chose, and where the block's site closes: the converted block is compared, on random inputs, with
``act(lin(h) + h + cond(emb))`` (the shortcut inside the activation) and ``h + act(lin(h) + cond(emb))``
(the hand-written net's).

Run from the repository root::

    python -m benchmarks.efficacy_denoiser             # depths 8, 16, 32, 3 seeds, 40 epochs (~6–10 min on 1 thread)
    python -m benchmarks.efficacy_denoiser --quick     # depth 16, seed 0, 5 epochs; writes nothing

It prints plain tables and writes ``benchmarks/results/efficacy-denoiser.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
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
from benchmarks.common import machine, table, write_json
from benchmarks.efficacy_digits import EXAMPLE_BATCH, LABELS, SPLIT_SEED, VARIANTS, Digits, fit, load_data

__all__ = [
    "Block",
    "Denoiser",
    "Noisy",
    "DenRun",
    "PlanCheck",
    "VARIANTS",
    "noisy_data",
    "corrupt",
    "build",
    "train",
    "test_mse",
    "check_plan",
    "run_one",
    "main",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES, WIDTH, EMBED = 64, 64, 16
SIGMA = (0.1, 1.0)  # the relative noise level's range, in units of the training data's std
TEST_NOISE_SEED = 1234
EXAMPLE_SEED = 4321
_GATE = {"resify": None, "resify+rezero": "rezero"}


class Block(nn.Module):
    """``act(lin(h) + cond(emb))``: a plain block with the noise level's embedding added before the activation."""

    def __init__(self, width: int = WIDTH, embed: int = EMBED) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.cond = nn.Linear(embed, width)
        self.act = nn.GELU()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(h) + self.cond(emb))


class Denoiser(nn.Module):
    """``inp``, ``depth`` conditioned blocks, ``out``; with ``use_shortcut`` each block is ``h + block(h, emb)``.

    ``forward(x, sigma)``: ``x`` the noisy images (N, 64), ``sigma`` their relative noise levels (N, 1).
    """

    def __init__(self, depth: int, use_shortcut: bool = False, width: int = WIDTH, embed: int = EMBED) -> None:
        super().__init__()
        self.use_shortcut = use_shortcut
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(100.0), embed // 2)))
        self.inp = nn.Linear(FEATURES, width)
        self.blocks = nn.ModuleList(Block(width, embed) for _ in range(depth))
        self.out = nn.Linear(width, FEATURES)

    def embed(self, sigma: torch.Tensor) -> torch.Tensor:
        a = torch.log(sigma) * self.freqs
        return torch.cat([torch.sin(a), torch.cos(a)], -1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        emb = self.embed(sigma)
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h, emb) if self.use_shortcut else block(h, emb)
        return self.out(h)


@dataclass(frozen=True)
class Noisy:
    """The digits, the data's std, and the test set corrupted once (the same for every net)."""

    clean_train: torch.Tensor
    clean_test: torch.Tensor
    std: float
    x_test: torch.Tensor  # noisy
    sigma_test: torch.Tensor  # (N, 1)


def corrupt(clean: torch.Tensor, std: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``clean`` plus Gaussian noise of a level ``σ ~ U(SIGMA)`` per example (times ``std``); (noisy, σ)."""
    lo, hi = SIGMA
    sigma = lo + (hi - lo) * torch.rand(len(clean), 1, generator=g)
    return clean + sigma * std * torch.randn(clean.shape, generator=g), sigma


def noisy_data(digits: Digits | None = None) -> Noisy:
    """efficacy_digits' split and scaling, the test part corrupted with ``TEST_NOISE_SEED``."""
    d = load_data(SPLIT_SEED) if digits is None else digits
    std = d.x_train.std().item()
    x, sigma = corrupt(d.x_test, std, torch.Generator().manual_seed(TEST_NOISE_SEED))
    return Noisy(d.x_train, d.x_test, std, x, sigma)


def example(data: Noisy) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch of ``EXAMPLE_BATCH`` noisy images and their levels (what ``gate='auto'`` measures on)."""
    return corrupt(data.clean_train[:EXAMPLE_BATCH], data.std, torch.Generator().manual_seed(EXAMPLE_SEED))


def build(variant: str, depth: int, seed: int, data: Noisy, width: int = WIDTH) -> nn.Module:
    """The ``variant`` of a ``depth``-block denoiser, its layers drawn from ``seed`` (the same for every variant)."""
    torch.manual_seed(seed)
    plain = Denoiser(depth, width=width)
    if variant == "plain":
        return plain
    if variant == "hand":
        hand = Denoiser(depth, use_shortcut=True, width=width)
        hand.load_state_dict(plain.state_dict())  # the same parameters: nothing added by hand
        return hand
    torch.manual_seed(seed + 10_000)
    if variant == "default":
        return resify.apply(plain, example(data))
    return resify.apply(plain, example(data), gate=_GATE[variant])


def train(model: nn.Module, data: Noisy, epochs: int, seed: int, lr: float = 1e-3, batch: int = 64) -> bool:
    """Adam on the MSE to the clean images, fresh σ and noise every step (from ``seed``); True if it went non-finite."""
    clean = data.clean_train

    def batch_loss(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        y = clean[idx]
        x, sigma = corrupt(y, data.std, g)
        return F.mse_loss(model(x, sigma), y)

    return fit(model, len(clean), batch_loss, epochs, seed, lr, batch)


@torch.no_grad()
def test_mse(model: nn.Module, data: Noisy) -> float:
    """Mean squared error to the clean test images (eval mode; a non-finite output gives inf)."""
    was = model.training
    model.eval()
    try:
        err = F.mse_loss(model(data.x_test, data.sigma_test), data.clean_test).item()
        return err if math.isfinite(err) else math.inf
    finally:
        model.train(was)


@dataclass(frozen=True)
class PlanCheck:
    """The default plan of one depth: where its sites are, what it read as existing, the gates it chose."""

    depth: int
    sites: int
    block_sites: int  # blocks with a site inside them
    existing: int
    gates: dict[str, int]  # gate -> sites (default policy)
    block_gate: str  # the gate of the blocks' sites ("none", "rezero", or "mixed: ...")
    reason: str  # gate_reason of the first block's site, in words
    placement: str  # "inside the activation", "around the block", or "elsewhere"
    spans: str  # the first block's site: its layers


def check_plan(depth: int, data: Noisy) -> PlanCheck:
    """The default plan of the ``depth``-block denoiser, and where the converted block adds its shortcut."""
    torch.manual_seed(0)
    plain = Denoiser(depth)
    plan = resify.plan(plain, example(data))
    in_block = [s for s in plan.sites if s.start.startswith("blocks.")]
    owners = {s.start.split(".")[1] for s in in_block}
    gates: dict[str, int] = {}
    for s in plan.sites:
        gates[str(s.gate)] = gates.get(str(s.gate), 0) + 1
    block_gates = sorted({str(s.gate) for s in in_block})
    first = in_block[0] if in_block else None
    reason = "" if first is None or first.gate_reason is None else first.gate_reason.text
    # where the shortcut closes: compare the converted block (gate=None) with the two candidate forms
    torch.manual_seed(10_000)
    converted = resify.apply(plain, example(data), gate=None)
    block = converted.blocks[0]
    g = torch.Generator().manual_seed(7)
    h = torch.randn(16, WIDTH, generator=g)
    emb = plain.embed(0.1 + 0.9 * torch.rand(16, 1, generator=g))
    with torch.no_grad():
        y = block(h, emb)
        inside = block.act(block.lin(h) + h + block.cond(emb))
        around = h + block.act(block.lin(h) + block.cond(emb))
    if torch.allclose(y, inside, atol=1e-6):
        placement = "inside the activation: act(lin(h) + h + cond(emb))"
    elif torch.allclose(y, around, atol=1e-6):
        placement = "around the block: h + act(lin(h) + cond(emb))"
    else:
        placement = "elsewhere"
    return PlanCheck(
        depth,
        len(plan.sites),
        len(owners),
        len(plan.existing),
        gates,
        block_gates[0] if len(block_gates) == 1 else "mixed: " + "/".join(block_gates),
        reason,
        placement,
        ", ".join(first.layers) if first is not None else "-",
    )


@dataclass(frozen=True)
class DenRun:
    """One trained denoiser."""

    depth: int
    variant: str
    seed: int
    epochs: int
    width: int
    mse: float
    mse_init: float
    seconds: float
    diverged: bool


def run_one(variant: str, depth: int, seed: int, epochs: int, data: Noisy, width: int = WIDTH) -> DenRun:
    """Build, train and test one denoiser."""
    net = build(variant, depth, seed, data, width)
    init = test_mse(net, data)
    t = time.perf_counter()
    diverged = train(net, data, epochs, seed)
    seconds = time.perf_counter() - t
    return DenRun(depth, variant, seed, epochs, width, test_mse(net, data), init, seconds, diverged)


def baselines(data: Noisy) -> dict[str, float]:
    """Test MSE of two trivial denoisers: the noisy input itself, and the mean training image."""
    mean = data.clean_train.mean(0, keepdim=True).expand_as(data.clean_test)
    return {
        "noisy input": F.mse_loss(data.x_test, data.clean_test).item(),
        "mean training image": F.mse_loss(mean, data.clean_test).item(),
    }


# ---------------------------------------------------------------------------------------------
# tables and targets


def _group(runs: Sequence[DenRun], **key: object) -> list[DenRun]:
    return [r for r in runs if all(getattr(r, k) == v for k, v in key.items())]


def _mean(runs: Sequence[DenRun]) -> float:
    return statistics.fmean(r.mse for r in runs) if runs else math.nan


def _cell(runs: Sequence[DenRun]) -> str:
    if not runs:
        return "-"
    vals = [r.mse for r in runs]
    if not all(math.isfinite(v) for v in vals):
        return f"non-finite ({sum(not math.isfinite(v) for v in vals)} of {len(vals)})"
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    out = f"{statistics.fmean(vals):.4f} ± {s:.4f}"
    if any(r.diverged for r in runs):
        out += f" ({sum(r.diverged for r in runs)} diverged)"
    return out


def mse_table(runs: Sequence[DenRun], markdown: bool = False) -> str:
    depths = sorted({r.depth for r in runs})
    variants = [v for v in VARIANTS if any(r.variant == v for r in runs)]
    rows = [[d, *[_cell(_group(runs, depth=d, variant=v)) for v in variants]] for d in depths]
    return table(["depth", *[LABELS[v] for v in variants]], rows, markdown)


def init_table(runs: Sequence[DenRun], markdown: bool = False) -> str:
    depths = sorted({r.depth for r in runs})
    variants = [v for v in VARIANTS if any(r.variant == v for r in runs)]
    rows = [
        [d, *[f"{statistics.fmean(r.mse_init for r in _group(runs, depth=d, variant=v)):.4g}" for v in variants]]
        for d in depths
    ]
    return table(["depth", *[LABELS[v] for v in variants]], rows, markdown)


def plan_table(checks: Sequence[PlanCheck], markdown: bool = False) -> str:
    rows = [
        [
            c.depth,
            c.sites,
            f"{c.block_sites} of {c.depth}",
            c.existing,
            ", ".join(f"{k}: {v}" for k, v in sorted(c.gates.items())),
            c.block_gate,
            c.spans,
            c.placement,
        ]
        for c in checks
    ]
    return table(
        ["depth", "sites", "blocks with a site", "existing", "gates (all sites)", "blocks' gate", "block site's layers",
         "the converted block computes"],
        rows,
        markdown,
    )  # fmt: skip


def targets(runs: Sequence[DenRun]) -> list[str]:
    """Per depth: the default within 5% (relative MSE) of the best of gate=None / 'rezero' / hand-written,
    and never more than 5% worse than plain."""
    out = []
    for d in sorted({r.depth for r in runs}):
        default = _group(runs, depth=d, variant="default")
        if not default:
            continue
        m = _mean(default)
        others = {v: _mean(_group(runs, depth=d, variant=v)) for v in ("resify", "resify+rezero", "hand")}
        others = {v: x for v, x in others.items() if not math.isnan(x)}
        plain = _mean(_group(runs, depth=d, variant="plain"))
        parts = [f"depth {d}: default {m:.4f}"]
        if others:
            best_v = min(others, key=lambda v: others[v])
            best = others[best_v]
            rel = m / best - 1
            parts.append(
                f"best of the others {best:.4f} ({LABELS[best_v]}), {100 * rel:+.1f}% "
                f"(within 5%: {'met' if rel <= 0.05 else 'missed'})"
            )
        if not math.isnan(plain):
            rel = m / plain - 1
            parts.append(
                f"plain {plain:.4f}, {100 * rel:+.1f}% (no more than 5% worse: {'met' if rel <= 0.05 else 'missed'})"
            )
        out.append("; ".join(parts))
    return out


def write_markdown(
    runs: Sequence[DenRun],
    checks: Sequence[PlanCheck],
    base: dict[str, float],
    path: str,
    commands: Sequence[str],
    machine_line: str,
    seconds: float,
    date: str,
) -> None:
    seeds = sorted({r.seed for r in runs})
    epochs = sorted({r.epochs for r in runs})
    width = sorted({r.width for r in runs})
    lines = [
        "# Efficacy on a conditioned net: a deep plain conditional denoiser on load_digits",
        "",
        *[f"Command: `{c}`  " for c in commands],
        f"Date: {date}  ",
        f"Machine: {machine_line}  ",
        f"Wall time: {seconds / 60:.1f} min in all (training, tests, plan checks).",
        "",
        f"Split seed {SPLIT_SEED} (stratified 75/25: 1,347 train, 450 test), pixels standardised on the "
        f"training part; every example corrupted with Gaussian noise of relative level σ ~ U({SIGMA[0]}, {SIGMA[1]}) "
        "times the training data's std, fresh every training step, once (seed "
        f"{TEST_NOISE_SEED}) for the test set. Adam lr 1e-3, batch 64, {'/'.join(map(str, epochs))} epochs, seeds "
        f"{', '.join(map(str, seeds))}; width {'/'.join(map(str, width))}, GELU. Depth = conditioned blocks "
        "`h = act(lin(h) + cond(emb))` between `inp` (Linear 64→64) and `out` (Linear 64→64); `emb` is a fixed "
        "Fourier embedding of log σ (16 features), `cond` a Linear(16, 64) per block.",
        "",
        "Variants: **plain** (no residuals), **resify gate=None**, **resify gate='rezero'**, **hand-written** "
        "(`h = h + block(h, emb)`, the plain net's weights), **resify default** (`resify.apply(plain, (x_batch, "
        f"sigma_batch))`, `gate='auto'` measured on a training batch of {EXAMPLE_BATCH} noisy examples).",
        "",
        "## Test MSE against the clean images (mean ± std over seeds; lower is better)",
        "",
        mse_table(runs, markdown=True),
        "",
        "For scale: " + "; ".join(f"{k}: {v:.4f}" for k, v in base.items()) + ".",
        "",
        "Test MSE at initialisation (mean over seeds):",
        "",
        init_table(runs, markdown=True),
        "",
        "## The default plan",
        "",
        "`resify.plan(plain, (x_batch, sigma_batch))` (seed 0) per depth; *the converted block computes*: the "
        "gate=None conversion's `blocks[0]` compared on random inputs with the two forms.",
        "",
        plan_table(checks, markdown=True),
        "",
        *[f"- depth {c.depth}, the blocks' gate reason: {c.reason}" for c in checks],
        "",
        "## Targets",
        "",
        *[f"- {t}" for t in targets(runs)],
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> list[DenRun]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--width", type=int, default=WIDTH)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--quick", action="store_true", help="smoke run: depth 16, seed 0, 5 epochs, writes nothing")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "efficacy-denoiser.md"))
    p.add_argument("--no-write", action="store_true", help="print only; write no files")
    args = p.parse_args(argv)
    if args.quick:
        args.depths, args.seeds, args.epochs, args.no_write = [16], [0], 5, True
    torch.set_num_threads(args.threads)
    data = noisy_data()
    base = baselines(data)
    print("baselines: " + "; ".join(f"{k} {v:.4f}" for k, v in base.items()), flush=True)
    start = time.perf_counter()
    runs: list[DenRun] = []
    checks: list[PlanCheck] = []
    for depth in args.depths:
        c = check_plan(depth, data)
        checks.append(c)
        print(
            f"  depth {depth:3d}: default plan {c.sites} sites, {c.block_sites} of {depth} blocks, "
            f"{c.existing} existing; gates {c.gates}; block: {c.placement}",
            flush=True,
        )
        for seed in args.seeds:
            for v in [v for v in VARIANTS if v in args.variants]:
                r = run_one(v, depth, seed, args.epochs, data, args.width)
                runs.append(r)
                print(
                    f"  depth {depth:3d} {v:14s} seed {seed}: MSE {r.mse:.4f} (init {r.mse_init:.3g}) "
                    f"({r.seconds:.1f} s){' DIVERGED' if r.diverged else ''}",
                    flush=True,
                )
    seconds = time.perf_counter() - start
    command = "python -m benchmarks.efficacy_denoiser " + " ".join(sys.argv[1:] if argv is None else argv)
    print()
    print(machine())
    print(f"{seconds / 60:.1f} min in all\n")
    print("Test MSE (mean ± std over seeds)\n\n" + mse_table(runs))
    print("\nThe default plan\n\n" + plan_table(checks))
    print("\nTargets:\n" + "\n".join(targets(runs)))
    if not args.no_write:
        os.makedirs(os.path.dirname(args.results), exist_ok=True)
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_markdown(runs, checks, base, args.results, [command.strip()], machine(), seconds, date)
        write_json(
            os.path.splitext(args.results)[0] + ".json",
            {
                "machine": machine(),
                "commands": [command.strip()],
                "date": date,
                "seconds": seconds,
                "baselines": base,
                "checks": [asdict(c) for c in checks],
                "runs": [asdict(r) for r in runs],
            },
        )
        print(f"\nwrote {os.path.relpath(args.results, ROOT)} and its .json")
    return runs


if __name__ == "__main__":
    main()
