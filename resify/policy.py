"""How to add shortcuts: the policy keywords of ``resify.apply`` and ``resify.plan``, validated.

Part of stage 3 (planning): ``Policy.from_kwargs`` turns keywords into a frozen Policy or raises a
PlanError that says what is allowed; the planner reads it, and every Plan carries the one it was
made under.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .constants import (
    GATE_POLICIES,
    MAX_ADDED,
    PROJECTION_COST,
    PROJECTIONS,
    SHORTCUTS,
    GatePolicy,
    ProjectionChoice,
    ShortcutChoice,
)
from .errors import PlanError

__all__ = ["Policy"]

#: where gate='auto' gives a site a gate, it starts at gate_init, else at 0 (``resify.gating``)
_DEFAULT_GATE_INIT = {None: None, "rezero": 0.0, "layerscale": 1e-4, "auto": None}


@dataclass(frozen=True)
class Policy:
    """How to add shortcuts; the keywords of ``resify.apply`` and ``resify.plan``."""

    shortcut: ShortcutChoice = "auto"
    group: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    #: "auto": chosen site by site (``resify.gating``): the plan's sites carry the gate built
    gate: GatePolicy | None = "auto"
    gate_init: float | None = None
    leaf_modules: tuple = ()
    preserve_output: bool = False
    dense_max_growth: int | None = None
    projection: ProjectionChoice = "auto"
    max_added: float | None = MAX_ADDED
    projection_cost: float | None = PROJECTION_COST

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Policy:
        """Validate policy keywords; unknown names or values raise PlanError saying what is allowed."""
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise PlanError(
                f"unknown policy keyword(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}"
            )
        for key in ("include", "exclude", "leaf_modules"):
            value = kwargs.get(key)
            if value is None:
                kwargs.pop(key, None)
            elif isinstance(value, (str, type)):
                kwargs[key] = (value,)
            elif isinstance(value, (list, tuple, set, frozenset)):
                kwargs[key] = tuple(value)
            else:
                raise PlanError(
                    f"{key} must be a pattern or a list of them, found {type(value).__name__} {value!r}; "
                    f"e.g. {key}=['classifier.*']"
                )
        for key in ("gate_init", "max_added", "projection_cost"):
            value = kwargs.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise PlanError(f"{key} must be a number, found {type(value).__name__} {value!r}")
        policy = cls(**kwargs)
        if policy.shortcut not in SHORTCUTS:
            raise PlanError(f"shortcut must be one of {', '.join(map(repr, SHORTCUTS))}, found {policy.shortcut!r}")
        if policy.shortcut == "dense" and policy.gate not in (None, "auto"):
            raise PlanError(
                f"gate={policy.gate!r} does not combine with shortcut='dense': a dense shortcut keeps the layer's "
                "output whole (the widened layer's new weights start at zero); drop the gate"
            )
        if policy.dense_max_growth is not None and (
            policy.shortcut != "dense"
            or isinstance(policy.dense_max_growth, bool)
            or not isinstance(policy.dense_max_growth, int)
            or policy.dense_max_growth < 1
        ):
            raise PlanError(
                f"dense_max_growth must be a positive integer used with shortcut='dense', found "
                f"{policy.dense_max_growth!r} with shortcut={policy.shortcut!r}"
            )
        if policy.preserve_output and policy.gate_init is not None and policy.gate_init != 1.0:
            raise PlanError(
                f"preserve_output=True keeps outputs unchanged only with the gate at 1, found gate_init={policy.gate_init}; "
                "leave gate_init out"
            )
        if policy.projection not in PROJECTIONS:
            raise PlanError(
                f"projection must be one of {', '.join(map(repr, PROJECTIONS))}, found {policy.projection!r}"
            )
        for key in ("max_added", "projection_cost"):
            value = getattr(policy, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            ):
                raise PlanError(f"{key} must be a non-negative number or None (no limit), found {value!r}")
        if policy.gate not in GATE_POLICIES:
            raise PlanError(f"gate must be one of {', '.join(map(repr, GATE_POLICIES))}, found {policy.gate!r}")
        if not isinstance(policy.group, int) or isinstance(policy.group, bool) or policy.group < 1:
            raise PlanError(f"group must be a positive integer (layers per shortcut), found {policy.group!r}")
        if policy.gate_init is not None and policy.gate is None:
            raise PlanError(
                "gate_init was given without a gate (gate=None); pass gate='auto', gate='rezero' or gate='layerscale'"
            )
        if policy.gate_init is not None and not math.isfinite(float(policy.gate_init)):
            raise PlanError(f"gate_init must be a finite number, found {policy.gate_init!r}")
        return policy

    @property
    def effective_gate_init(self) -> float | None:
        """The value a gate of this policy starts at (None: no gate; under gate='auto', the start of the
        gates it chooses where gate_init is given, else None: ``resify.gating`` sets each site's)."""
        if self.gate_init is not None:
            return self.gate_init
        if self.preserve_output and self.gate not in (None, "auto"):
            return 1.0  # the branch must start whole for the output to be unchanged
        return _DEFAULT_GATE_INIT[self.gate]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["leaf_modules"] = [x if isinstance(x, str) else x.__name__ for x in self.leaf_modules]
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d
