"""Run code on the user's model and leave no trace: the one save-and-restore that resify uses.

The shape recorder's real run and the gradient-flow report both run the model; neither may change
its buffers (BatchNorm statistics), the random state, and, for the report, its gradients and modes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["state_kept"]


@contextlib.contextmanager
def state_kept(
    module: nn.Module, tensors: Iterable[Any] = (), *, grads: bool = False, modes: bool = False
) -> Iterator[list[int]]:
    """Run code on ``module``, then put back its buffers (objects and values) and the random state of
    the CPU and of every CUDA device that its parameters, buffers or ``tensors`` use (yielded, for
    seeding). With ``grads``, the parameters' ``.grad`` are set aside (None inside, so that a backward
    cannot add into them in place) and put back; with ``modes``, every submodule's ``training`` flag."""
    modules = list(module.modules())
    params = list({id(p): p for m in modules for p in m._parameters.values() if p is not None}.values())
    saved_grads = [p.grad for p in params] if grads else []
    buffers = [(m, name, b, b.clone()) for m in modules for name, b in m._buffers.items() if b is not None]
    saved_modes = [(m, m.training) for m in modules] if modes else []
    devices = sorted(
        {
            t.device.index or 0
            for t in [*params, *[b for *_, b, _ in buffers], *tensors]
            if isinstance(t, torch.Tensor) and t.device.type == "cuda"
        }
    )
    try:
        for p in params if grads else ():
            p.grad = None
        with torch.random.fork_rng(devices=devices):
            yield devices
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        with torch.no_grad():
            for m, name, b, saved in buffers:
                m._buffers[name] = b  # the object itself, where the code put another in its place
                if b.shape == saved.shape:
                    b.copy_(saved)
        for m, training in saved_modes:
            if m.training != training:  # (nn.Module.__setattr__ is slow; most modes are unchanged)
                m.training = training
