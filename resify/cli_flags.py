"""The policy keywords of ``resify.apply`` as command-line flags (part of the CLI).

``policy_options`` adds the flags to a click command; ``policy_from_flags`` turns the parsed flags
into keywords, refusing contradictory combinations in the flags' own words (exit status 2);
``advice_text`` words the report's advice as flags, leaving out what the run already uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .constants import GATE_POLICIES, MAX_ADDED, PROJECTION_COST, PROJECTIONS, SHORTCUTS
from .loading import DTYPES
from .policy import Policy
from .report.records import GradientFlow
from .report.verdicts import advice

__all__ = ["policy_options", "policy_from_flags", "advice_text", "POLICY_FLAG_NAMES"]

F = TypeVar("F", bound=Callable[..., Any])

_GATE_CHOICES = ["none" if gate is None else gate for gate in GATE_POLICIES]


class _Limit(click.ParamType):
    """A non-negative number, or "none" for no limit."""

    name = "NUMBER|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | None:
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"expected a non-negative number or 'none', found {value!r}", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"expected a non-negative number or 'none', found {value!r}", param, ctx)
        return number


#: The parameters that policy_options adds (``--plan`` refuses them where the user gave them).
POLICY_FLAG_NAMES = (
    "shortcut",
    "group",
    "include",
    "exclude",
    "gate",
    "gate_init",
    "preserve_output",
    "dense_max_growth",
    "projection",
    "max_added",
    "projection_cost",
)


def policy_options(f: F) -> F:
    """The policy keywords of resify.apply as flags (shared by inspect and convert)."""
    options = [
        click.option(
            "--input-shape",
            "input_shapes",
            multiple=True,
            metavar="SHAPE[:DTYPE]",
            help="Example input shape, comma-separated, e.g. 8,3,32,32 or 4,128; repeat it for a forward "
            "that takes several inputs, one per positional input in order, e.g. --input-shape 2,3,32,32 "
            "--input-shape 2,8:int64 (default: the file's example_input, or one derived from the first layer).",
        ),
        click.option(
            "--dtype",
            type=click.Choice(list(DTYPES)),
            default="float32",
            show_default=True,
            help="dtype of the example input, where --input-shape names none (integer ones: token ids 0 or 1).",
        ),
        click.option(
            "--input-kwarg",
            "input_kwargs",
            multiple=True,
            metavar="NAME=SHAPE[:DTYPE]",
            help="An input passed by name, e.g. attention_mask=2,16:int64 (repeatable); "
            "every other optional argument stays at its default.",
        ),
        click.option(
            "--shortcut",
            type=click.Choice(list(SHORTCUTS)),
            default="auto",
            show_default=True,
            help="auto: identity or projection; identity: only where shapes match; "
            "dense: concatenate, widening the next layer.",
        ),
        click.option("--group", type=click.IntRange(min=1), default=1, show_default=True, help="Layers per shortcut."),
        click.option("--include", multiple=True, metavar="GLOB", help="Only layers whose name matches (repeatable)."),
        click.option(
            "--exclude", multiple=True, metavar="GLOB", help="Leave out layers whose name matches (repeatable)."
        ),
        click.option(
            "--gate",
            type=click.Choice(_GATE_CHOICES),
            default="auto",
            show_default=True,
            help="Scale each layer branch by a learnable gate; auto: chosen per site from the example's forward.",
        ),
        click.option(
            "--gate-init",
            type=float,
            default=None,
            help="Initial gate value (rezero and auto 0, layerscale 1e-4); not with --gate none.",
        ),
        click.option("--preserve-output", is_flag=True, help="Start every shortcut at β=0: outputs unchanged."),
        click.option(
            "--projection",
            type=click.Choice(list(PROJECTIONS)),
            default="auto",
            show_default=True,
            help="Where shapes change: auto: a learned 1×1 (grouped beside grouped convolutions), "
            "parameter-free past the cost limits; conv: learned only (spans past the limits are skipped); "
            "pad: parameter-free (channels zero-padded or sliced).",
        ),
        click.option(
            "--max-added",
            type=_Limit(),
            default=MAX_ADDED,
            show_default=True,
            help="Budget of the learned projections, a share of the model's parameters ('none': no limit).",
        ),
        click.option(
            "--projection-cost",
            type=_Limit(),
            default=PROJECTION_COST,
            show_default=True,
            help="Largest learned projection, a multiple of the parameters of the span it bridges ('none': no limit).",
        ),
        click.option(
            "--dense-max-growth",
            type=click.IntRange(min=1),
            default=None,
            help="Dense: at most this many channels/features added per widened layer; needs --shortcut dense.",
        ),
        click.option(
            "--leaf",
            "leaf_modules",
            multiple=True,
            metavar="GLOB",
            help="Module names to keep whole while tracing (repeatable).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _contradiction(opts: dict[str, Any]) -> str | None:
    """What is wrong with a combination of policy flags, worded in flags (None if nothing is).

    The CLI's copy of Policy.from_kwargs' cross-field rules, so that the user reads about the flags
    they typed (and exit status 2) rather than about the library's keywords.
    """
    gate, shortcut, gate_init = opts["gate"], opts["shortcut"], opts["gate_init"]
    if gate_init is not None and gate == "none":
        return (
            f"--gate-init needs a gate: found --gate-init {gate_init} with --gate none; "
            "drop --gate none (the default, --gate auto, takes it), or drop --gate-init"
        )
    if gate_init is not None and not math.isfinite(gate_init):
        return f"--gate-init expects a finite number; found {gate_init}"
    if gate not in ("none", "auto") and shortcut == "dense":
        return (
            f"--gate does not combine with --shortcut dense: found --gate {gate} (a dense shortcut keeps the "
            "layer's output whole); drop --gate, or choose --shortcut auto or identity"
        )
    if opts["dense_max_growth"] is not None and shortcut != "dense":
        return (
            f"--dense-max-growth needs --shortcut dense: found --shortcut {shortcut}; "
            "add --shortcut dense or drop --dense-max-growth"
        )
    if opts["preserve_output"] and gate_init is not None and gate_init != 1.0:
        return (
            f"--preserve-output needs the gate to start at 1: found --gate-init {gate_init}; "
            "drop --gate-init (or pass --gate-init 1)"
        )
    return None


def policy_from_flags(opts: dict[str, Any]) -> dict[str, Any]:
    """The policy keywords for resify.apply; a contradictory set of flags is a click UsageError."""
    problem = _contradiction(opts)
    if problem is not None:
        raise click.UsageError(problem, ctx=click.get_current_context())
    policy: dict[str, Any] = {
        "shortcut": opts["shortcut"],
        "group": opts["group"],
        "include": opts["include"],
        "exclude": opts["exclude"],
        "gate": None if opts["gate"] == "none" else opts["gate"],
        "leaf_modules": opts["leaf_modules"],
        "projection": opts["projection"],
        "max_added": opts["max_added"],
        "projection_cost": opts["projection_cost"],
    }
    if opts["gate_init"] is not None:
        policy["gate_init"] = opts["gate_init"]
    if opts["preserve_output"]:
        policy["preserve_output"] = True
    if opts["dense_max_growth"] is not None:
        policy["dense_max_growth"] = opts["dense_max_growth"]
    return policy


def _flag(keyword: str, value: Any) -> str:
    """A policy keyword and value as the flag that sets it: ('gate_init', 0.0) -> '--gate-init 0'."""
    shown = "none" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))
    return f"--{keyword.replace('_', '-')} {shown}"


def advice_text(flow: GradientFlow, policy: Policy) -> str | None:
    """The report's advice for ``flow`` in flags, for a run made under ``policy``.

    Settings the run already uses (its defaults included) are left out; advice left with none is
    passed over for the next; advice that is a change to the model (no settings) is given as it is;
    None when nothing is left to try, or when the report itself advised nothing (it knew the model had
    all the advice would add).
    """
    if flow.recommendation is None:
        return None
    for found in advice(flow.verdict, flow.layers):
        if not found.settings:
            return found.effect
        new = found.unused(policy)
        if new:
            return f"try {' '.join(_flag(k, v) for k, v in new)}: {found.effect}"
    return None
