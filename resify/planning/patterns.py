"""The ``include`` and ``exclude`` patterns: which layers they leave out, and the patterns refused.

Part of stage 3 (planning): ``make_plan`` skips a layer ``pattern_reason`` names (code "excluded");
``check_patterns`` refuses an include pattern that matches no layer and patterns that leave out every
layer, and warns of an exclude pattern that matches none.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence

from ..errors import PlanError, ResifyWarning
from .policy import Policy
from .skips import SkipCode

__all__ = ["pattern_reason", "check_patterns"]


def pattern_reason(name: str, policy: Policy) -> tuple[SkipCode, str] | None:
    """Why ``include`` / ``exclude`` leave the layer ``name`` out (None: they keep it)."""
    for p in policy.exclude:
        if fnmatch.fnmatchcase(name, p):
            return "excluded", f"excluded by pattern {p!r}"
    if policy.include and not any(fnmatch.fnmatchcase(name, p) for p in policy.include):
        return "excluded", f"not matched by include={list(policy.include)!r}"
    return None


def check_patterns(names: Sequence[str], policy: Policy) -> None:
    """Refuse an include pattern that matches none of ``names``, and patterns that leave out every
    one of them; warn of an exclude pattern that matches none."""
    shown = ", ".join(names[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "") or "none"
    for kind, patterns in (("include", policy.include), ("exclude", policy.exclude)):
        for p in patterns:
            if any(fnmatch.fnmatchcase(n, p) for n in names):
                continue
            message = f"{kind} pattern {p!r} matches no layer; the layers resify can put a shortcut around are: {shown}"
            if kind == "include":
                raise PlanError(message)
            warnings.warn(message, ResifyWarning, stacklevel=5)
    if names and all(pattern_reason(n, policy) for n in names):
        example = _example_pattern(names)
        given = ", ".join(
            f"{k}={list(v)!r}" for k, v in (("include", policy.include), ("exclude", policy.exclude)) if v
        )
        raise PlanError(
            f"every layer was excluded ({given}): no layer is left to put a shortcut around; the layers are: "
            f"{shown}; exclude only some of them (e.g. exclude=['{example}']; CLI: --exclude '{example}'), "
            "or drop the pattern"
        )


def _example_pattern(names: Sequence[str]) -> str:
    """A pattern that leaves some layers in: the last layer's parent's ('classifier.*'), or its name."""
    last = names[-1]
    return f"{last.rsplit('.', 1)[0]}.*" if "." in last else last
