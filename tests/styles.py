"""Small models written in the styles that real code uses (and that once broke a conversion)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def mobilenet_v1_style(num_classes=10):
    """Depthwise-separable blocks, strided, ending in AdaptiveAvgPool2d(1): accepts any size >= 8."""

    def dw(cin, cout, stride):
        return [
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        ]

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        *dw(8, 16, 1),
        *dw(16, 32, 2),
        *dw(32, 32, 1),
        *dw(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


class EfficientHead(nn.Module):
    """An EfficientNet-style head: 1x1 conv to a wide feature map, BN, SiLU, global pool, dropout, fc.

    The shortcut beside the head's conv pools to 1x1: a BatchNorm there would see one value per
    channel at batch size 1, which the original (whose BN sees the whole map) trains on.
    """

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.head = nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.head(self.stem(x))), 1))


def conv3d_clip_net():
    """A video net: Conv3d with pooling in time and space, a global pool: any clip length >= 4."""
    return nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool3d((1, 2, 2)),
        nn.Conv3d(8, 16, 3, padding=1),
        nn.BatchNorm3d(16),
        nn.ReLU(),
        nn.MaxPool3d(2),
        nn.Conv3d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def valid_conv_net():
    """Unpadded convolutions and a floor-mode pool: sizes shrink by subtraction and by floor division."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


class NoisyTrainer(nn.Module):
    """Branches on ``self.training``: input noise and functional dropout in training only."""

    def __init__(self, width=16):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, width), nn.Linear(width, width), nn.Linear(width, 2)

    def forward(self, x):
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        h = F.relu(self.fc1(x))
        h = F.dropout(F.relu(self.fc2(h)), p=0.5, training=self.training)
        return self.fc3(h)


class DCGANGenerator(nn.Module):
    """Latent vector to an image in [-1, 1]: upsampling convolutions ending in Tanh."""

    def __init__(self, nz=8):
        super().__init__()
        self.fc = nn.Linear(nz, 32 * 4 * 4)
        self.net = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(32, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(16, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 3, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z):
        return self.net(F.relu(self.fc(z)).view(-1, 32, 4, 4))


def sigmoid_autoencoder():
    """A dense autoencoder whose decoder ends in Sigmoid (pixels in [0, 1], for a BCE loss)."""
    return nn.Sequential(
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 64),
        nn.Sigmoid(),
    )


def deep_mlp(depth=6, width=16):
    layers = [nn.Linear(8, width), nn.GELU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 3))


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


class CheckpointedMLP(nn.Module):
    """Blocks of two layers under activation checkpointing (``use_reentrant``: True, False) or none (None):
    the same function and parameters whichever, for a given seed."""

    def __init__(self, use_reentrant=None, depth=3, width=8):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)) for _ in range(depth)
        )
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        for block in self.blocks:
            if self.use_reentrant is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.use_reentrant)
        return self.head(x)
