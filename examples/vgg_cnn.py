"""A plain VGG-style CNN for 32×32 images: conv/bn/relu blocks, channel changes, max-pooling.

resify inspect examples/vgg_cnn.py
resify convert examples/vgg_cnn.py -o out/vgg_resified
"""

import torch
import torch.nn as nn


def _block(cin: int, cout: int, pool: bool) -> list:
    layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return layers + [nn.MaxPool2d(2)] if pool else layers


def build_model(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        *_block(3, 32, False),
        *_block(32, 32, False),
        *_block(32, 64, True),
        *_block(64, 64, False),
        *_block(64, 128, True),
        *_block(128, 128, False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def example_input() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


if __name__ == "__main__":
    import resify

    print(resify.plan(build_model(), example_input()))
