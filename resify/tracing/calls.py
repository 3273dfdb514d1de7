"""What each module of a model receives: one run on the example input, with hooks.

Beside tracing: where the root's forward cannot be traced, ``units`` traces the children that can,
each on the inputs recorded here; ``install`` traces each owner of a shortcut on its own inputs.
The run leaves no trace on the model (buffers, random state, modes are restored; no hook stays).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import TraceError
from ..formats import first_line
from ..state import state_kept
from .copying import structural_copy, without_hooks

__all__ = ["Call", "record_calls", "record_calls_on_meta", "as_call"]


@dataclass
class Call:
    """The inputs one module received on its first call: tensors by position, the rest by name."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def as_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    """``args``/``kwargs`` as trace takes them: the leading tensors by position, every other value by
    the name forward gives it (so a None, a flag or a list is specialised, not traced as a tensor)."""
    try:
        sig = inspect.signature(type(module).forward)
        bound = sig.bind(module, *args, **kwargs)
    except (TypeError, ValueError):
        return Call(tuple(args), dict(kwargs))
    params = list(sig.parameters.values())[1:]
    lead: list[Any] = []
    named: dict[str, Any] = {}
    positional = True
    for p in params:
        if p.name not in bound.arguments:
            positional = False
            continue
        value = bound.arguments[p.name]
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            if positional and all(_is_tensor(v) for v in value):
                lead.extend(value)
            else:
                return Call(tuple(args), dict(kwargs))  # *args with non-tensors: as it was called
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
            continue
        if positional and _is_tensor(value) and p.kind is not inspect.Parameter.KEYWORD_ONLY:
            lead.append(value)
        else:
            positional = False
            if p.kind is inspect.Parameter.POSITIONAL_ONLY:
                return Call(tuple(args), dict(kwargs))  # cannot be named
            named[p.name] = value
    return Call(tuple(lead), named)


def record_calls(
    model: nn.Module,
    inputs: tuple[Any, ...],
    kwargs: dict[str, Any],
    paths: set[str] | None = None,
    quiet: bool = False,
) -> dict[str, Call]:
    """Run ``model`` once on the example and return, for each module that was called (or each of
    ``paths``), the inputs of its first call. The root is recorded as given.

    Where the model rejects the example in its own mode (a detector in train mode wants targets), it
    is run in eval mode instead; the modes are put back either way.

    Raises:
        TraceError: the model rejected the example input in both modes.
    """
    model = structural_copy(model)  # its own hook dicts: the user's hooks are not called by this run
    without_hooks(model)
    names = {id(m): n for n, m in model.named_modules()}
    seen: dict[str, Call] = {}
    handles = []

    def hook(module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        name = names.get(id(module))
        if name is None or name in seen or (paths is not None and name not in paths):
            return
        seen[name] = as_call(module, args, kw)

    for name, m in model.named_modules():
        if name and (paths is None or name in paths):
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    errors = []
    try:
        with state_kept(model, inputs, modes=True), torch.no_grad():
            for mode in (model.training, False) if model.training else (False,):
                if mode != model.training:
                    model.eval()
                seen.clear()
                try:
                    model(*inputs, **kwargs)
                    break
                except Exception as e:  # the model's own error: tried again in eval mode, else reported
                    if quiet:
                        raise
                    errors.append(e)
            else:
                raise TraceError(
                    f"{type(model).__name__}'s forward raised {type(errors[-1]).__name__} on the example input: "
                    f"{first_line(errors[-1])}; pass an example_input (and example_kwargs) that it accepts"
                ) from errors[-1]
    finally:
        for h in handles:
            h.remove()
    seen[""] = as_call(model, inputs, kwargs)
    return seen


def _on_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_on_meta(v) for v in value)
    if type(value) is dict:
        return {k: _on_meta(v) for k, v in value.items()}
    return value


def _meta_twin(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are storage-less (tied ones stay tied)."""
    twin = structural_copy(model)
    memo: dict[int, Any] = {}
    for m in twin.modules():
        for key, p in m._parameters.items():
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                m._parameters[key] = memo[id(p)]
        for key, b in m._buffers.items():
            if b is not None:
                memo.setdefault(id(b), torch.empty_like(b, device="meta"))
                m._buffers[key] = memo[id(b)]
    return twin


def _real(value: Any, device: torch.device) -> Any:
    """A meta tensor made a real one of its shape and dtype (uninitialised: only its shape is read),
    on ``device``; containers too."""
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return torch.empty(value.shape, dtype=value.dtype, device=device)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_real(v, device) for v in value)
    if type(value) is dict:
        return {k: _real(v, device) for k, v in value.items()}
    return value


def record_calls_on_meta(
    model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], paths: set[str]
) -> dict[str, Call] | None:
    """``record_calls`` without computing: the model runs on storage-less tensors, and each recorded
    input comes back as a tensor of its shape and dtype (for a trace that reads shapes, never values).
    None where the model's forward needs real values (data-dependent code)."""
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    if device.type == "meta":
        return None  # already storage-less: the ordinary run is as cheap
    try:
        calls = record_calls(_meta_twin(model), _on_meta(inputs), _on_meta(kwargs), paths, quiet=True)
    except Exception:  # data-dependent code (.item(), a shape read from values): run it for real
        return None
    return {name: Call(_real(c.args, device), _real(c.kwargs, device)) for name, c in calls.items()}
