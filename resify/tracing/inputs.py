"""The model's example inputs: normalised to a tuple, checked against the model's device, or derived.

Beside tracing: ``trace`` and the report (``gradient_flow``) both take what a user passes as
``example_input`` through these.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import InputError

__all__ = ["as_inputs", "check_device", "derive_example_input"]


def as_inputs(example_input: Any) -> tuple[Any, ...] | None:
    """Normalise ``example_input`` (a tensor, a tuple/list of tensors, or None) to a tuple."""
    if example_input is None:
        return None
    if isinstance(example_input, (torch.Tensor, PackedSequence)):  # (a PackedSequence is a tuple)
        return (example_input,)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise InputError(
        f"example_input must be a tensor or a tuple of tensors, found {type(example_input).__name__}; "
        "pass e.g. example_input=torch.randn(8, 3, 32, 32)"
    )


def _first_parameter(model: nn.Module) -> torch.Tensor | None:
    return next(iter(model.parameters()), None)


def check_device(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Refuse input tensors on another device than the model's first parameter (or buffer).

    A model on the meta device accepts inputs anywhere: only shapes are read from it.

    Raises:
        InputError: names both devices and the ``.to(...)`` call that fixes it.
    """
    first = _first_parameter(model)
    if first is None:
        first = next(iter(model.buffers()), None)
    if first is None or first.device.type == "meta":
        return
    for i, t in enumerate(inputs):
        if isinstance(t, PackedSequence):
            t = t.data  # its values: the batch sizes stay on the CPU
        if isinstance(t, torch.Tensor) and t.device != first.device:
            where = "example_input" if len(inputs) == 1 else f"example_input[{i}]"
            raise InputError(
                f"{where} is on {t.device} but {type(model).__name__}'s parameters are on {first.device}; "
                f"move it there first: {where}.to('{first.device}')"
            )


def derive_example_input(model: nn.Module, first_layer: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """Build an example input when the model's first layer fixes its shape (nn.Linear → (2, in_features)).

    Raises:
        InputError: the first layer does not fix the input shape; the message suggests one.
    """
    if first_layer is None:
        first_layer = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
    param = _first_parameter(model)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    if isinstance(first_layer, nn.Linear):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, first_layer.in_features, generator=g, dtype=dtype)
        return (x.to(device),)
    hint, flag = "example_input=torch.randn(...)", "--input-shape SHAPE, once per positional input"
    if isinstance(first_layer, (nn.Embedding, nn.EmbeddingBag)):  # token ids: integers below the vocabulary's size
        hint, flag = (
            f"example_input=torch.randint(0, {first_layer.num_embeddings}, (2, 16))",
            "--input-shape 2,16:int64",
        )
    elif isinstance(first_layer, nn.modules.conv._ConvNd):
        spatial = ["32"] * (first_layer.weight.dim() - 2)
        hint = f"example_input=torch.randn(2, {', '.join([str(first_layer.in_channels), *spatial])})"
        flag = f"--input-shape {','.join(['2', str(first_layer.in_channels), *spatial])}"
    found = type(first_layer).__name__ if first_layer is not None else "no layer with parameters"
    raise InputError(
        f"no example_input given and the first layer ({found}) does not fix the input shape; "
        f"pass one, e.g. {hint} (CLI: {flag})"
    )
