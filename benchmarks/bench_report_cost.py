"""What the gradient-flow report costs: resify.gradient_flow against one plain forward+backward.

    .venv/bin/python benchmarks/bench_report_cost.py               # all models, 7 repetitions, 1 thread
    .venv/bin/python benchmarks/bench_report_cost.py --reps 15 --threads 2 mlp vgg

The baseline is what a training step does: zero the gradients, forward, MSE to zeros, backward.
The report does the same once (batches=1) plus its hooks, norms and the restoring of gradients,
buffers, modes and random state. Runs alternate between the two; the table gives medians and the
ratio (target: at most 1.5×), and the extra time per layer. Part of that extra is fixed (hooks
and bookkeeping in Python, ~0.1 ms per layer on one CPU thread), part grows with the tensors
(norms of activations and gradients), so a network of tiny layers (the seed's) shows it most.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from reference import vgg_style_cnn  # noqa: E402

import resify  # noqa: E402


def mlp(depth: int = 20, width: int = 256) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None)


def seed_network() -> nn.Module:
    from reference import ImprovedResidualNetwork

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


def measure(model: nn.Module, x: torch.Tensor, reps: int) -> tuple[float, float]:
    """Median seconds of (plain step, report), alternating, after one warm-up of each."""
    plain_step(model, x)
    report_step(model, x)
    plain, report = [], []
    for _ in range(reps):
        for fn, out in ((plain_step, plain), (report_step, report)):
            t = time.perf_counter()
            fn(model, x)
            out.append(time.perf_counter() - t)
    return statistics.median(plain), statistics.median(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"some of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady on a shared machine)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; expected some of {', '.join(MODELS)}")
    args.models = args.models or list(MODELS)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU, {args.threads} thread(s), {args.reps} repetitions, medians")
    header = (
        f"{'model':<9} {'layers':>6} {'fwd+bwd ms':>10} {'report ms':>10} {'ratio':>6} {'extra µs/layer':>14}  setup"
    )
    print(header)
    print("-" * len(header))
    met = []
    for name in args.models:
        factory, make_input, what = MODELS[name]
        model, x = factory(), make_input()
        layers = len(resify.gradient_flow(model, x).layers)
        plain, report = measure(model, x, args.reps)
        ratio = report / plain
        if ratio <= 1.5:
            met.append(name)
        per_layer = (report - plain) / layers * 1e6
        print(
            f"{name:<9} {layers:>6} {plain * 1e3:>10.1f} {report * 1e3:>10.1f} {ratio:>5.2f}× "
            f"{per_layer:>14.0f}  {what}"
        )
    print(f"target ≤ 1.5×: met by {', '.join(met) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
