"""Models, machine description and table printing shared by the benchmark scripts.

The networks follow the seed guide's ``ImprovedResidualNetwork``: one class with a
``use_shortcut`` switch. ``use_shortcut=False`` gives the plain network that resify converts;
``use_shortcut=True`` gives the hand-written residual equivalent (``x = layer(x) + identity``,
with a learned projection wherever the shape changes), which is what ``resify.apply`` with
``gate=None`` should reproduce. The scripts import this module as ``benchmarks.common``: run them
from the repository root as ``python -m benchmarks.<name>``.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

import resify
from resify.constants import NAMESPACE
from resify.planning.owners import qualified

__all__ = [
    "ACTIVATIONS",
    "SeedMLP",
    "VGGNet",
    "mlp_sizes",
    "copy_shortcut_weights",
    "machine",
    "table",
    "write_json",
]

#: The activations the efficacy sweep covers, by the name used on the command line.
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def mlp_sizes(depth: int, width: int = 64, in_features: int = 64, classes: int = 10) -> list[int]:
    """Layer sizes of an MLP with ``depth`` Linear layers: ``depth - 1`` hidden ones and the output layer."""
    return [in_features] + [width] * (depth - 1) + [classes]


def _seed_loop(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The seed guide's ImprovedResidualNetwork.forward over ``net.layers`` / ``net.projections``
    (layers listed in ``net.no_shortcut`` get none)."""
    for i, layer in enumerate(net.layers):
        identity = x
        x = layer(x)
        if net.use_shortcut and i not in net.no_shortcut:
            if net.projections[i] is not None:
                identity = net.projections[i](identity)
            x = x + identity
    return x


class SeedMLP(nn.Module):
    """The seed's ImprovedResidualNetwork with a choice of activation and a linear output layer.

    Every layer but the last is ``Linear`` + activation; the last is a bare ``Linear`` (logits).
    With ``use_shortcut`` each layer adds its input back, through a ``Linear`` projection where
    the width changes (as in the seed), except at the logits layer: it is linear, so a projection
    beside it would be a second linear map of the same input, and resify adds none there.
    """

    def __init__(self, layer_sizes: Sequence[int], use_shortcut: bool, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.use_shortcut = use_shortcut
        self.layers = nn.ModuleList()
        self.projections = nn.ModuleList()
        last = len(layer_sizes) - 2
        self.no_shortcut = {last} if layer_sizes[-2] != layer_sizes[-1] else set()
        for i in range(len(layer_sizes) - 1):
            linear = nn.Linear(layer_sizes[i], layer_sizes[i + 1])
            self.layers.append(nn.Sequential(linear) if i == last else nn.Sequential(linear, act()))
            if use_shortcut and layer_sizes[i] != layer_sizes[i + 1] and i not in self.no_shortcut:
                self.projections.append(nn.Linear(layer_sizes[i], layer_sizes[i + 1]))
            else:
                self.projections.append(None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _seed_loop(self, x)


class VGGNet(nn.Module):
    """A VGG-style CNN: stages of 3×3 conv (+ BatchNorm) + ReLU, max-pool ending each stage but the last.

    ``stages=(16, 32, 64)`` and ``per_stage=7`` give 21 conv layers, then global average pooling
    and a Linear classifier. With ``use_shortcut`` every conv block adds its input back: through
    a 1×1 conv (+ BatchNorm when ``norm``) where the channels change, an average pool over the
    block's pooling windows where it pools (after the BatchNorm, as the block normalises before it
    pools; resify pools to the block's output size, the same windows on these even sizes): the
    hand-written counterpart of
    ``resify.apply(plain, gate=None)``. The classifier is linear and gets no shortcut. resify
    counts the global average pool as part of the last conv layer (a pool that follows it), so
    the last block's shortcut averages the whole final feature map; the hand-written model does
    the same, to be the same computation.
    """

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 10,
        stages: Sequence[int] = (16, 32, 64),
        per_stage: int = 7,
        norm: bool = True,
        use_shortcut: bool = False,
        input_size: int = 8,
    ) -> None:
        super().__init__()
        self.use_shortcut = use_shortcut
        self.no_shortcut: set[int] = set()
        self.layers = nn.ModuleList()
        self.projections = nn.ModuleList()
        cin, size = in_channels, input_size
        n = len(stages) * per_stage
        for s, cout in enumerate(stages):
            for j in range(per_stage):
                block: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not norm)]
                if norm:
                    block.append(nn.BatchNorm2d(cout))
                block.append(nn.ReLU())
                stride = 1
                if j == per_stage - 1 and s < len(stages) - 1:
                    block.append(nn.MaxPool2d(2))
                    stride = 2
                elif len(self.layers) == n - 1:
                    block.append(nn.AdaptiveAvgPool2d(1))
                    stride = size
                size //= stride
                self.layers.append(nn.Sequential(*block))
                if use_shortcut and (cin != cout or stride != 1):
                    proj: list[nn.Module] = []
                    if cin != cout:
                        proj.append(nn.Conv2d(cin, cout, 1, bias=False))
                        if norm:
                            proj.append(nn.BatchNorm2d(cout))
                    if stride != 1:  # after the norm where the block normalises before it pools
                        proj.insert(len(proj) if norm else 0, nn.AvgPool2d(stride, stride, ceil_mode=True))
                    self.projections.append(nn.Sequential(*proj))
                else:
                    self.projections.append(None)
                cin = cout
        self.flatten = nn.Flatten()
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(_seed_loop(self, x)))


def copy_shortcut_weights(converted: nn.Module, hand: nn.Module) -> None:
    """Give ``hand`` (use_shortcut=True) the converted model's weights: layers by name, projections in order.

    Raises:
        ValueError: the two do not have the same projections (then they are not the same computation).
    """
    state = converted.state_dict()
    target = hand.state_dict()
    for key in target:
        if key in state:
            target[key] = state[key].clone()
    plan = resify.applied_plan(converted)
    ours = [s for s in plan.sites if s.kind == "projection"]
    theirs = [p for p in list(getattr(hand, "projections", [])) if p is not None]
    prefixes = [f"projections.{i}" for i, p in enumerate(getattr(hand, "projections", [])) if p is not None]
    if len(ours) != len(theirs):
        raise ValueError(f"resify made {len(ours)} projection(s), the hand-written model has {len(theirs)}")
    for site, prefix in zip(ours, prefixes):
        src = qualified(site.owner, f"{NAMESPACE}.{site.name}.")  # under its owner: <owner>.resify.<name>.
        keys = [k for k in state if k.startswith(src)]
        # resify's modules in their order (pool, proj, norm) = the hand-written Sequential's indices
        present = [
            m
            for m in ("pool", "proj", "norm")
            if (m == "pool" and getattr(site.shortcut, "pool", False))
            or any(k[len(src) :].startswith(m + ".") for k in keys)
        ]
        for key in keys:
            sub = key[len(src) :]  # "proj.weight", "norm.running_mean", …
            module, rest = sub.split(".", 1)
            seq = f"{prefix}.{present.index(module)}.{rest}"
            dst = seq if seq in target else f"{prefix}.{rest}"
            if dst not in target or target[dst].shape != state[key].shape:
                raise ValueError(f"no place in the hand-written model for {key} {tuple(state[key].shape)}")
            target[dst] = state[key].clone()
    hand.load_state_dict(target)


def machine() -> str:
    """One line naming the CPU, its cores, the OS, Python and torch (for results files)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical cores (torch threads: {torch.get_num_threads()}), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, resify {resify.__version__}"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[object]], markdown: bool = False) -> str:
    """Rows as an aligned plain-text table, or as a Markdown table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths]), *map(fmt, cells[1:])])


def write_json(path: str, doc: Mapping[str, object]) -> None:
    """A results file's JSON twin (one space of indentation, as every benchmark writes it)."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
