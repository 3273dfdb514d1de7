"""The seed guide's network, without shortcuts: resify's first example.

resify inspect examples/seed_mlp.py          # what resify would do, and the gradient flow
python examples/seed_mlp.py                  # the same from Python
"""

import torch
import torch.nn as nn


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


torch.manual_seed(123)
model = ImprovedResidualNetwork([128, 64, 32, 16, 8, 1], use_shortcut=False)
example_input = torch.randn(10, 128)

if __name__ == "__main__":
    import resify

    print(resify.plan(model, example_input))
    converted = resify.apply(model, example_input)
    print()
    print(converted.code)
