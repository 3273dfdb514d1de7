"""Stage 1, across modules: the parts of a model that trace, where the whole model does not.

``trace_units`` traces the root; where that fails (data-dependent control flow the concrete tracer
cannot follow either, a list of images in, a cache object, code torch.fx refuses) it runs the model
once on the example (``calls.py``), records what each child receives, and traces each child on its
own inputs, recursively: every module that traces is a unit, planned on its own graph, and every
module that does not is kept whole (a :class:`WholeModule` with a stable ``code``). It refuses only
when no module inside the model traces.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch.fx
from torch import nn

from ..errors import TraceError
from ..formats import first_line
from .calls import Call, record_calls
from .trace import LeafSpec, Traced, trace

__all__ = ["WholeCode", "WHOLE_CODES", "WholeModule", "Unit", "trace_units", "relative_leaves", "is_layer_module"]

WholeCode = Literal[
    "untraceable",  # its forward could not be traced: planned inside its children instead
    "not_called",  # the example run never called it (a training-only head, an unused branch)
]
WHOLE_CODES: tuple[WholeCode, ...] = get_args(WholeCode)


@dataclass(frozen=True)
class WholeModule:
    """A module whose own forward resify leaves as it is: ``code`` (see ``WholeCode``) and why."""

    module: str  # qualified name; "" is the root
    code: WholeCode
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Unit:
    """A module traced on its own: the sites inside it are planned on ``traced``'s graph."""

    path: str  # qualified name of the module ("" for the root)
    traced: Traced


_TORCH_LEAF = torch.fx.Tracer()


def is_layer_module(m: nn.Module) -> bool:
    """True for torch.nn's own layers (Conv2d, LayerNorm, …): the tracer keeps them whole."""
    return not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and _TORCH_LEAF.is_leaf_module(m, "")


def relative_leaves(leaves: LeafSpec, path: str) -> list[type | str]:
    """Leaf patterns for tracing the module at ``path`` on its own: names made relative to it."""
    out: list[type | str] = []
    prefix = f"{path}." if path else ""
    for leaf in leaves:
        if isinstance(leaf, str) and prefix and leaf.startswith(prefix):
            out.append(leaf[len(prefix) :])
        else:
            out.append(leaf)
    return out


def _excluded(path: str, leaves: Sequence[type | str], module: nn.Module) -> bool:
    """A module the user named as a leaf: kept whole, never planned inside."""
    return any(
        (isinstance(leaf, str) and fnmatch.fnmatchcase(path, leaf))
        or (isinstance(leaf, type) and isinstance(module, leaf))
        for leaf in leaves
    )


def trace_units(
    model: nn.Module, inputs: tuple[Any, ...] | None, kwargs: dict[str, Any], leaf_modules: LeafSpec = ()
) -> tuple[list[Unit], list[WholeModule], dict[str, Call]]:
    """The traced units of ``model``, the modules kept whole, in forward order, and what each module
    received in the example run (empty where the root traced whole: no run was needed).

    Raises:
        TraceError: the root rejected the example input, or nothing inside the model traces (one
            message naming the deepest failure under each top-level child).
    """
    leaves = list(leaf_modules)
    try:
        return [Unit("", trace(model, inputs, example_kwargs=kwargs, leaf_modules=leaves, warn=False))], [], {}
    except TraceError as root_error:
        if inputs is None:
            raise
        try:
            calls = record_calls(model, inputs, kwargs)
        except TraceError:
            raise root_error from None
        units: list[Unit] = []
        whole = [WholeModule("", "untraceable", first_line(root_error))]
        failures: dict[str, str] = {}  # top-level child -> its deepest failure
        _descend(model, "", calls, leaves, units, whole, failures)
        if not units:
            detail = "; ".join(failures.values()) or "it has no child module that could hold a shortcut"
            raise TraceError(
                f"could not trace {type(model).__name__} nor any module inside it ({first_line(root_error)}); "
                f"deepest failures: {detail}; try leaf_modules=[...] for the modules named, or pass a submodule"
            ) from root_error
        order = {name: i for i, name in enumerate(calls)}
        units.sort(key=lambda u: order.get(u.path, len(order)))
        return units, whole, calls


def _descend(
    module: nn.Module,
    path: str,
    calls: dict[str, Call],
    leaves: list[type | str],
    units: list[Unit],
    whole: list[WholeModule],
    failures: dict[str, str],
) -> None:
    for name, child in module.named_children():
        cpath = f"{path}.{name}" if path else name
        top = cpath.split(".")[0]
        if is_layer_module(child) or _excluded(cpath, leaves, child) or not any(True for _ in child.parameters()):
            continue
        call = calls.get(cpath)
        if call is None:
            if any(p.startswith(cpath + ".") for p in calls):  # a container (ModuleList): its children run
                _descend(child, cpath, calls, leaves, units, whole, failures)
            else:
                whole.append(WholeModule(cpath, "not_called", "the example run did not call it"))
            continue
        try:
            traced = trace(
                child, call.args, example_kwargs=call.kwargs, leaf_modules=relative_leaves(leaves, cpath), warn=False
            )
        except TraceError as e:
            why = first_line(e)
            whole.append(WholeModule(cpath, "untraceable", why))
            failures[top] = f"{cpath}: {why}"
            _descend(child, cpath, calls, leaves, units, whole, failures)
            continue
        units.append(Unit(cpath, traced))
