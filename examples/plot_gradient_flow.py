"""The gradient flow of the seed guide's network before and after resify, as text and as a figure.

    python examples/plot_gradient_flow.py           # prints both comparisons, writes docs/*.png

Writes docs/gradient_flow.png (the seed network, [128, 64, 32, 16, 8, 1]) and
docs/gradient_flow_deep.png (a 30-layer sigmoid MLP, where the difference is dramatic).
"""

from pathlib import Path

import torch
import torch.nn as nn
from seed_mlp import ImprovedResidualNetwork  # the seed guide's network, beside this file

import resify

DOCS = Path(__file__).resolve().parents[1] / "docs"


def deep_sigmoid_mlp(depth: int = 30, width: int = 32) -> nn.Module:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers)


def show(name: str, model: nn.Module, x: torch.Tensor, path: Path, **policy) -> resify.FlowComparison:
    converted = resify.apply(model, x, **policy)
    comparison = resify.compare(resify.gradient_flow(model, x), resify.gradient_flow(converted, x))
    print(f"== {name} ==")
    print(comparison.to_text())
    print(f"figure: {comparison.plot(path)}\n")
    return comparison


if __name__ == "__main__":
    torch.manual_seed(123)
    seed_net = ImprovedResidualNetwork([128, 64, 32, 16, 8, 1], use_shortcut=False)
    show(
        "the seed network, shortcut='auto'", seed_net, torch.randn(10, 128), DOCS / "gradient_flow.png", shortcut="auto"
    )
    torch.manual_seed(0)
    show(
        "a 30-layer sigmoid MLP, shortcut='auto'",
        deep_sigmoid_mlp(),
        torch.randn(16, 32),
        DOCS / "gradient_flow_deep.png",
        shortcut="auto",
    )
