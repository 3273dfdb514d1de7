"""The output's scale at initialisation: every torchvision classifier before and after the default conversion.

Each model of ``torchvision.models.list_models(module=torchvision.models)`` is built with
``weights=None`` (seeded), converted with resify's default policy (or ``--gate``), and both the
original and the converted model run in train mode, as the first training step sees them, on the
same seeded batch (batch 4, 224×224; 299×299 for Inception-v3, whose auxiliary head needs it). The
table gives the standard deviation of the logits before and after, their ratio, and the gates the
plan chose; the worst ratio (the larger of after/before and before/after) heads the file.

Run from the repository root::

    python -m benchmarks.init_scale                     # every classifier, default policy (~15 min on 2 cores)
    python -m benchmarks.init_scale vgg16 alexnet       # some models
    python -m benchmarks.init_scale --gate none --results benchmarks/results/init-scale-none.md

It writes ``benchmarks/results/init-scale.md``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

import resify
from benchmarks.common import machine, table

__all__ = ["Row", "measure", "main"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4
SEED = 0
#: the acceptance bound: the converted model's output std within this factor of the original's
BOUND = 4.0


@dataclass(frozen=True)
class Row:
    """One model: its logits' std in train mode before and after conversion, and the gates chosen."""

    model: str
    size: int
    std_before: float
    std_after: float
    gates: str  # e.g. "13 rezero, 2 none"
    seconds: float  # the conversion's

    @property
    def ratio(self) -> float:
        """after / before; 1 where both are 0 (a zero-initialised head: ViT's logits start at 0)."""
        if self.std_before == 0:
            return 1.0 if self.std_after == 0 else math.inf
        return self.std_after / self.std_before

    @property
    def off_by(self) -> float:
        """How far the ratio is from 1, as a factor ≥ 1 (either way)."""
        r = self.ratio
        return max(r, 1 / r) if r > 0 else math.inf


def _logits(out: object) -> torch.Tensor:
    """The logits of a classifier's output (Inception and GoogLeNet return a tuple in train mode)."""
    return out if isinstance(out, torch.Tensor) else out[0]  # type: ignore[index]


@torch.no_grad()
def _std(model: torch.nn.Module, x: torch.Tensor) -> float:
    torch.manual_seed(SEED + 1)  # the same dropout masks where the two models draw alike
    return _logits(model(x)).float().std().item()


def _gates(plan: resify.Plan) -> str:
    counts: dict[str, int] = {}
    for s in plan.sites:
        key = "none" if s.gate is None else s.gate
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no sites"


def measure(name: str, gate: str | None = "default") -> Row:
    """Build ``name`` (weights=None), convert it, and measure both in train mode on one seeded batch."""
    import torchvision

    from resify.constants import image_size

    size = 299 if image_size(name) == 299 else 224
    torch.manual_seed(SEED)
    model = torchvision.models.get_model(name, weights=None).train()
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(SEED))
    policy: dict[str, Any] = {} if gate == "default" else {"gate": gate}
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = resify.apply(model, x, **policy)
    seconds = time.perf_counter() - t
    plan = resify.applied_plan(new)
    assert plan is not None
    return Row(name, size, _std(model, x), _std(new, x), _gates(plan), seconds)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def markdown(rows: Sequence[Row], command: str, seconds: float, policy: str) -> str:
    worst = max(rows, key=lambda r: r.off_by)
    over = [r for r in rows if r.off_by > BOUND]
    lines = [
        "# The output's scale at initialisation, before and after conversion",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Time: {seconds / 60:.0f} min in all. Every classifier of `torchvision.models.list_models(module="
        f"torchvision.models)`, built with `weights=None` (seed {SEED}), converted with {policy}; the original "
        f"and the converted model in train mode (as the first training step sees them) on the same seeded batch "
        f"of {BATCH} images, 224×224 (299×299 for Inception-v3, whose auxiliary head needs it). *std* is the "
        "standard deviation of the logits; *ratio* is after / before.",
        "",
        f"**Worst ratio: {worst.model}, {worst.ratio:.3g}× ({'within' if worst.off_by <= BOUND else 'outside'} "
        f"{BOUND:g}× either way).** {len(rows)} models, {len(over)} outside {BOUND:g}×"
        + (f": {', '.join(r.model for r in over)}." if over else "."),
        "",
        table(
            ["model", "std before", "std after", "ratio", "gates chosen", "convert s"],
            [
                [r.model, _fmt(r.std_before), _fmt(r.std_after), _fmt(r.ratio), r.gates, f"{r.seconds:.2f}"]
                for r in rows
            ],
            markdown=True,
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help="torchvision model names (default: every classifier)")
    p.add_argument("--gate", default="default", help="'default' (the policy's default), none, rezero, layerscale, auto")
    p.add_argument("--skip", nargs="*", default=[], help="models to leave out")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "init-scale.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gate = None if args.gate == "none" else args.gate
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    names = [n for n in names if n not in args.skip]
    rows: list[Row] = []
    start = time.perf_counter()
    for name in names:
        r = measure(name, gate)
        rows.append(r)
        flag = "" if r.off_by <= BOUND else f"  OUTSIDE {BOUND:g}x"
        print(
            f"{name:24s} {r.size}px std {r.std_before:9.3g} -> {r.std_after:9.3g}  x{r.ratio:8.3g}  "
            f"[{r.gates}] ({r.seconds:.1f} s){flag}",
            flush=True,
        )
        gc.collect()
    seconds = time.perf_counter() - start
    command = "python -m benchmarks.init_scale " + " ".join(sys.argv[1:] if argv is None else argv)
    policy = "the default policy" if args.gate == "default" else f"`gate={gate!r}`"
    text = markdown(rows, command.strip(), seconds, policy)
    print("\n" + text)
    if not args.no_write:
        os.makedirs(os.path.dirname(args.results), exist_ok=True)
        with open(args.results, "w") as f:
            f.write(text)
        print(f"wrote {os.path.relpath(args.results, ROOT)}")
    return rows


if __name__ == "__main__":
    main()
