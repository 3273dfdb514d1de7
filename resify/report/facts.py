"""What a measured model already has: the plan resify carried out on it, its normalisation layers,
and whether its gates are still at zero.

Beside ``measure``: ``gradient_flow`` (and ``resify.watch``, once per watch) discovers these facts;
``measure`` places the gates by the plan, and ``verdicts`` reads the facts so that a gated net at its
initial gate is judged as one and advice never recommends what the model has. Nothing here runs
the model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from ..constants import NAMESPACE
from ..planning.sites import Plan
from ..rewriting.install import PLAN_ATTRIBUTE, applied_plan
from ..rewriting.modules import GATE_PARAMETERS

__all__ = ["ModelFacts", "model_facts", "applied_plans", "is_branch_gate", "gates_at_zero"]

#: the gates that scale a branch (rezero's α, layerscale's γ); β scales a shortcut (preserve_output)
_BRANCH_GATES = frozenset(GATE_PARAMETERS.values())
#: a normalisation layer by its class name: BatchNorm2d, LayerNorm, GroupNorm, LlamaRMSNorm, T5LayerNorm, …
_NORM_NAME = re.compile(r"Norm(\d[dD])?$")


@dataclass(frozen=True)
class ModelFacts:
    """What the model has, as far as the report can tell without tracing it."""

    #: (prefix, plan) of every module resify.apply converted, from the root down ("" for the root)
    plans: tuple[tuple[str, Plan], ...] = ()
    normalised: bool = False  # one of its own layers normalises (BatchNorm, LayerNorm, GroupNorm, RMSNorm, …)
    batch_norm_eval: bool = False  # a BatchNorm runs on its running statistics (eval mode)
    gates_at_zero: bool = False  # it has resify's branch gates (α, γ), and every one is 0

    @property
    def plan(self) -> Plan | None:
        """The plan of the outermost converted module (None: resify did not convert this model)."""
        return self.plans[0][1] if self.plans else None

    @property
    def shortcuts(self) -> bool:
        """resify added shortcuts to it."""
        return any(plan.sites for _, plan in self.plans)


def applied_plans(model: nn.Module) -> tuple[tuple[str, Plan], ...]:
    """(prefix, plan) of ``model`` and of each submodule that ``resify.apply`` converted."""
    return tuple((prefix, plan) for prefix, m in model.named_modules() if (plan := _plan_of(m)) is not None)


def _plan_of(m: nn.Module) -> Plan | None:
    if PLAN_ATTRIBUTE in m.__dict__ or isinstance(m, torch.fx.GraphModule):  # (cheaper than a getattr that fails)
        return applied_plan(m)
    return None


_NORMS: dict[type, bool] = {}  # module class -> it normalises (asked once per class)


def _is_norm(cls: type) -> bool:
    found = _NORMS.get(cls)
    if found is None:
        found = issubclass(cls, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
        found = _NORMS[cls] = found or bool(_NORM_NAME.search(cls.__name__))
    return found


def is_branch_gate(name: str) -> bool:
    """A gate (by its parameter's name) that scales a branch: α or γ, not β."""
    return name.rsplit(".", 1)[-1] in _BRANCH_GATES


def gates_at_zero(values: Mapping[str, Sequence[float] | torch.Tensor]) -> bool:
    """Whether there are branch gates among ``values`` (gate name -> its values) and every one is 0."""
    branch = [v for name, v in values.items() if is_branch_gate(name)]
    if not branch:
        return False
    return all(not bool(torch.as_tensor(v).detach().any()) for v in branch)


def model_facts(model: nn.Module, gates: Mapping[str, torch.Tensor]) -> ModelFacts:
    """Discover the facts of ``model`` (``gates``: resify's gate parameters by name, as ``probe.find_layers`` gives them)."""
    normalised = batch_norm_eval = False
    plans = []
    for name, m in model.named_modules():
        plan = _plan_of(m)
        if plan is not None:
            plans.append((name, plan))
        if not _is_norm(type(m)):
            continue
        normalised |= NAMESPACE not in name.split(".")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            batch_norm_eval |= not m.training and m.track_running_stats and m.running_mean is not None
    return ModelFacts(
        plans=tuple(plans),
        normalised=normalised,
        batch_norm_eval=batch_norm_eval,
        gates_at_zero=gates_at_zero(gates),
    )
