"""What the gradient-flow report costs: resify.gradient_flow against one plain forward+backward.

Run from the repository root::

    python -m benchmarks.bench_report_cost                 # all models, 7 repetitions, 1 thread (about 30 s)
    python -m benchmarks.bench_report_cost --reps 15 --threads 2 mlp vgg --no-write

The baseline is what a training step does: zero the gradients, forward, MSE to zeros, backward.
The report does the same once (batches=1; its backward computes only the gradients it reads, the
weights' and the layers' inputs') plus its hooks, norms and the restoring of gradients, buffers,
modes and random state. Runs alternate between the two; the table gives medians and the
ratio (target: at most 1.5×), and the extra time per layer. Part of that extra is fixed (hooks
and bookkeeping in Python, ~0.1 ms per layer on one CPU thread), part grows with the tensors
(norms of activations and gradients), so a network of tiny layers (the seed's) shows it most.

It prints a plain table and writes ``benchmarks/results/report-cost.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import resify
from benchmarks.common import machine, table
from tests.reference import ImprovedResidualNetwork, vgg_style_cnn

__all__ = ["MODELS", "measure", "main"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ("model", "layers", "fwd+bwd ms", "report ms", "ratio", "best ratio", "extra µs/layer", "setup")


def mlp(depth: int = 20, width: int = 256) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None)


def seed_network() -> nn.Module:
    return ImprovedResidualNetwork([128, 64, 32, 16, 8, 1], False)


#: name -> (model factory, example input, description)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str]] = {
    "seed": (seed_network, lambda: torch.randn(10, 128), "the seed network [128..1], batch 10 (overhead-bound)"),
    "mlp": (mlp, lambda: torch.randn(64, 256), "20 × Linear(256, 256)+ReLU, batch 64"),
    "vgg": (vgg_style_cnn, lambda: torch.randn(16, 3, 32, 32), "VGG-style CNN (tests/reference.py), 16×3×32×32"),
    "resnet50": (resnet50, lambda: torch.randn(2, 3, 224, 224), "torchvision resnet50(weights=None), 2×3×224×224"),
}


def plain_step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.mse_loss(out, torch.zeros_like(out)).backward()


def report_step(model: nn.Module, x: torch.Tensor) -> None:
    resify.gradient_flow(model, x)


def measure(
    model: nn.Module, x: torch.Tensor, reps: int, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, float, float]:
    """Median seconds of (plain step, report), alternating, after one warm-up of each, on ``clock``,
    and the ratio of the fastest of each (what the report costs where neither met the machine's noise)."""
    plain_step(model, x)
    report_step(model, x)
    plain, report = [], []
    for _ in range(reps):
        for fn, out in ((plain_step, plain), (report_step, report)):
            t = clock()
            fn(model, x)
            out.append(clock() - t)
    return statistics.median(plain), statistics.median(report), min(report) / min(plain)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"some of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady on a shared machine)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter (default); cpu: the process's CPU time, steadier where other processes share the cores",
    )
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "report-cost.md"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; expected some of {', '.join(MODELS)}")
    args.models = args.models or list(MODELS)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    what = machine()
    print(f"{what}; {args.reps} repetitions, medians of {args.clock} time")
    header = f"{'model':<9} {'layers':>6} {'fwd+bwd ms':>10} {'report ms':>10} {'ratio':>6} {'best':>6} {'extra µs/layer':>14}  setup"
    print(header)
    print("-" * len(header))
    rows = []
    met = []
    for name in args.models:
        factory, make_input, setup = MODELS[name]
        model, x = factory(), make_input()
        layers = len(resify.gradient_flow(model, x).layers)
        plain, report, best = measure(
            model, x, args.reps, time.process_time if args.clock == "cpu" else time.perf_counter
        )
        ratio = report / plain
        if ratio <= 1.5:
            met.append(name)
        per_layer = (report - plain) / layers * 1e6
        rows.append(
            (
                name,
                layers,
                f"{plain * 1e3:.1f}",
                f"{report * 1e3:.1f}",
                f"{ratio:.2f}×",
                f"{best:.2f}×",
                f"{per_layer:.0f}",
                setup,
            )
        )
        print(
            f"{name:<9} {layers:>6} {plain * 1e3:>10.1f} {report * 1e3:>10.1f} {ratio:>5.2f}× {best:>5.2f}× {per_layer:>14.0f}  {setup}",
            flush=True,
        )
    verdict = f"target ≤ 1.5×: met by {', '.join(met) or 'none'}"
    print(verdict)
    if args.no_write:
        return 0
    command = "python -m benchmarks.bench_report_cost" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )
    md = [
        "# Cost of the gradient-flow report: resify.gradient_flow vs one plain forward+backward",
        "",
        f"Command: `{command}`  ",
        f"Machine: {what}",
        "",
        "*fwd+bwd*: zero the gradients, forward, MSE to zeros, backward. *report*: `resify.gradient_flow(model, x)` "
        "(batches=1: the same forward, and a backward that computes only the gradients it reads, the weights' and "
        "the layers' inputs', plus its hooks, norms and the restoring of gradients, buffers, "
        f"modes and random state). The two alternate after one warm-up of each; {args.reps} repetitions, medians "
        f"of the {'process CPU' if args.clock == 'cpu' else 'wall-clock'} time. "
        "*ratio* = report / fwd+bwd (target ≤ 1.5×); *best ratio* = the fastest report / the fastest fwd+bwd "
        "(the two with the least of the machine's noise; on this VM the medians of the 20-layer MLP moved by "
        "±0.04× from one run to the next); *extra µs/layer* = (report − fwd+bwd) / layers.",
        "",
        table(HEADER, rows, True),
        "",
        verdict,
        "",
    ]
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        f.write("\n".join(md))
    print(f"\nwrote {os.path.relpath(args.results, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
