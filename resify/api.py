"""The public entry points: ``apply`` and ``plan``, each running trace → analyze → plan (→ rewrite)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch.fx
from torch import nn

from .analyze import analyze
from .planner import Plan, Policy, make_plan, reconcile_modes
from .rewrite import rewrite
from .trace import Traced, trace

__all__ = ["apply", "plan"]


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Graph surgery allocates many small objects that are all still alive: the cyclic collector
    only burns time (a third of a 10,000-layer apply), so it is paused and then restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _prepare(
    model: nn.Module, example_input: Any, example_kwargs: dict[str, Any] | None, policy: dict[str, Any]
) -> tuple[Traced, Plan]:
    pol = Policy.from_kwargs(**policy)
    traced = trace(model, example_input, example_kwargs=example_kwargs, leaf_modules=pol.leaf_modules)
    params = sum(p.numel() for p in model.parameters())
    the_plan = make_plan(analyze(traced), pol, params_before=params)
    other = traced.other_mode()
    if other is not None:  # forward reads self.training: plan both graphs, keep what they share
        the_plan = reconcile_modes(the_plan, make_plan(analyze(other), pol, params_before=params), traced.training)
    return traced, the_plan


def plan(
    model: nn.Module, example_input: Any = None, *, example_kwargs: dict[str, Any] | None = None, **policy: Any
) -> Plan:
    """Say what ``apply`` would do to ``model``, and why, without changing anything.

    Args:
        model: any ``nn.Module`` (never modified).
        example_input: a tensor or tuple of tensors; derived when the first layer is an nn.Linear.
        example_kwargs: inputs given by name (``{"attention_mask": mask}``); every other optional
            argument of ``forward`` is traced at its default and stays optional.
        **policy: ``shortcut`` ('auto' | 'identity'), ``group``, ``include``, ``exclude``,
            ``gate`` (None | 'rezero' | 'layerscale'), ``gate_init``, ``leaf_modules``.

    Returns:
        A frozen :class:`~resify.planner.Plan`: ``sites``, ``skipped`` (with reasons), ``existing``.
    """
    with _no_gc():
        return _prepare(model, example_input, example_kwargs, policy)[1]


def apply(
    model: nn.Module, example_input: Any = None, *, example_kwargs: dict[str, Any] | None = None, **policy: Any
) -> torch.fx.GraphModule:
    """Return a new GraphModule: ``model`` with residual shortcuts added (``model`` is not changed).

    Takes the same arguments as :func:`plan`; the plan that was carried out is in
    ``result.meta["resify_plan"]`` and the example input used (given or derived) in
    ``result.meta["resify_example_inputs"]`` (and ``["resify_example_kwargs"]``).
    """
    with _no_gc():
        traced, the_plan = _prepare(model, example_input, example_kwargs, policy)
        result = rewrite(traced, the_plan)
    result.meta["resify_example_inputs"] = traced.example_inputs
    result.meta["resify_example_kwargs"] = traced.example_kwargs
    return result
