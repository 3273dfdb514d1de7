"""The seed guide's networks and gradient printer, copied as written: the independent references."""

import torch
import torch.nn as nn


class ExampleDeepNeuralNetwork(nn.Module):
    def __init__(self, layer_sizes, use_shortcut):
        super().__init__()
        self.use_shortcut = use_shortcut
        self.layers = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(layer_sizes[0], layer_sizes[1]), nn.GELU()),
                nn.Sequential(nn.Linear(layer_sizes[1], layer_sizes[2]), nn.GELU()),
                nn.Sequential(nn.Linear(layer_sizes[2], layer_sizes[3]), nn.GELU()),
                nn.Sequential(nn.Linear(layer_sizes[3], layer_sizes[4]), nn.GELU()),
                nn.Sequential(nn.Linear(layer_sizes[4], layer_sizes[5]), nn.GELU()),
            ]
        )

    def forward(self, x):
        for layer in self.layers:
            layer_output = layer(x)
            # Problem: Only works when shapes match (rarely happens)
            if self.use_shortcut and x.shape == layer_output.shape:
                x = x + layer_output
            else:
                x = layer_output
        return x


#: the layer sizes of the seed guide's usage example (its input: torch.randn(10, 128))
SEED_SIZES = [128, 64, 32, 16, 8, 1]


class ImprovedResidualNetwork(nn.Module):
    def __init__(self, layer_sizes, use_shortcut):
        super().__init__()
        self.use_shortcut = use_shortcut
        self.layers = nn.ModuleList()
        self.projections = nn.ModuleList()

        for i in range(len(layer_sizes) - 1):
            # Main transformation layer
            self.layers.append(nn.Sequential(nn.Linear(layer_sizes[i], layer_sizes[i + 1]), nn.GELU()))

            # Projection layer for dimension matching
            if use_shortcut and layer_sizes[i] != layer_sizes[i + 1]:
                self.projections.append(nn.Linear(layer_sizes[i], layer_sizes[i + 1]))
            else:
                self.projections.append(None)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            identity = x  # Store input
            x = layer(x)  # Apply transformation

            if self.use_shortcut:
                # Match dimensions if needed
                if self.projections[i] is not None:
                    identity = self.projections[i](identity)
                x = x + identity  # Add residual connection
        return x


def print_gradients(model, x):
    """Analyze gradient flow through the network"""
    model.zero_grad()

    # Forward pass
    output = model(x)
    target = torch.zeros_like(output)

    # Calculate loss and backpropagate
    loss = nn.MSELoss()(output, target)
    loss.backward()

    print("Gradient Analysis:")
    print("-" * 50)
    for name, param in model.named_parameters():
        if "weight" in name and param.grad is not None:
            grad_mean = param.grad.abs().mean().item()
            print(f"{name}: gradient mean = {grad_mean:.6f}")


def vgg_style_cnn(in_channels=3, num_classes=10):
    """A plain VGG-style CNN: conv/bn/relu blocks, channel changes, max-pooling, no shortcut."""

    def block(cin, cout, pool):
        layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        return layers

    return nn.Sequential(
        *block(in_channels, 16, False),
        *block(16, 16, False),
        *block(16, 32, True),
        *block(32, 32, False),
        *block(32, 64, True),
        *block(64, 64, False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


class _Stage(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.residual_block_body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x):
        return self.residual_block_body(x)


class LongNames(nn.Module):
    """Layers with 49-character names ('feature_extraction_stages.1.residual_block_body.0') and a
    projection with a long label ('Conv2d(16, 72, 1) + BatchNorm2d'): what a narrow table must cut."""

    def __init__(self):
        super().__init__()
        self.feature_extraction_stages = nn.Sequential(_Stage(3, 16), _Stage(16, 72), _Stage(72, 72))
        self.head = nn.Linear(72, 4)

    def forward(self, x):
        return self.head(self.feature_extraction_stages(x).mean((2, 3)))


def assert_every_parameter_has_grad(module):
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"


def is_resify_key(name: str) -> bool:
    """A parameter or state-dict key that resify added: under some owner's ``resify`` namespace."""
    return "resify" in name.split(".")[:-1]


def forward_sources(module):
    """The source of the forward resify installed on ``module``, per mode (``{True: train, False: eval}``;
    one entry where forward does not read ``self.training``); empty where resify installed none."""
    from resify.rewriting.modules import FORWARD_ATTRIBUTE

    forward = module.__dict__.get(FORWARD_ATTRIBUTE)
    if forward is None:
        return {}
    first = next(iter(forward.codes.values()))
    return {mode: src for mode, (_, src) in first.items()}
