"""The gradient flow of the seed guide's network before and after resify, as text and as a figure.

    python examples/plot_gradient_flow.py           # prints both comparisons, writes docs/*.png

Writes docs/gradient_flow.png (the seed network, [128, 64, 32, 16, 8, 1]) and
docs/gradient_flow_deep.png (a 30-layer sigmoid MLP, where the difference is dramatic).
"""
from pathlib import Path

import torch
import torch.nn as nn

import resify

DOCS = Path(__file__).resolve().parents[1] / "docs"


class ImprovedResidualNetwork(nn.Module):
    """The seed guide's network; with use_shortcut=False it is a plain 5-layer MLP."""

    def __init__(self, layer_sizes, use_shortcut):
        super().__init__()
        self.use_shortcut = use_shortcut
        self.layers = nn.ModuleList()
        self.projections = nn.ModuleList()
        for i in range(len(layer_sizes) - 1):
            self.layers.append(nn.Sequential(nn.Linear(layer_sizes[i], layer_sizes[i + 1]), nn.GELU()))
            if use_shortcut and layer_sizes[i] != layer_sizes[i + 1]:
                self.projections.append(nn.Linear(layer_sizes[i], layer_sizes[i + 1]))
            else:
                self.projections.append(None)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            identity = x
            x = layer(x)
            if self.use_shortcut:
                if self.projections[i] is not None:
                    identity = self.projections[i](identity)
                x = x + identity
        return x


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
    show("the seed network, shortcut='auto'", seed_net, torch.randn(10, 128), DOCS / "gradient_flow.png",
         shortcut="auto")
    torch.manual_seed(0)
    show("a 30-layer sigmoid MLP, shortcut='auto'", deep_sigmoid_mlp(), torch.randn(16, 32),
         DOCS / "gradient_flow_deep.png", shortcut="auto")
