"""The policy keywords of ``resify.apply`` as command-line flags (part of the CLI).

``policy_options`` adds the example-input flags and one flag per entry of ``resify.planning.policy.KEYWORDS``
(its help, default and choices) to a click command; ``policy_from_flags`` turns the parsed flags into
keywords, refusing a combination that breaks one of ``resify.planning.policy.RULES`` in the flags' own words
(exit status 2); ``advice_text`` words the report's advice as flags, leaving out what the run
already uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..planning.policy import KEYWORDS, Keyword, Policy, broken_rule, say_flag
from ..report.records import GradientFlow
from ..report.verdicts import advice
from .loading import DTYPES

__all__ = ["policy_options", "policy_from_flags", "advice_text", "POLICY_FLAG_NAMES"]

F = TypeVar("F", bound=Callable[..., Any])


class _Number(click.ParamType):
    """A finite number (``non_negative``: ≥ 0), or "none" where ``none`` is allowed (no limit)."""

    def __init__(self, non_negative: bool, none: bool) -> None:
        self.non_negative, self.none = non_negative, none
        self.name = ("non-negative number" if non_negative else "finite number") + (" or 'none'" if none else "")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | None:
        if value is None or (self.none and isinstance(value, str) and value.lower() == "none"):
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or (self.non_negative and number < 0):
            self.fail(f"expected a {self.name}, found {value!r}", param, ctx)
        return number


#: The parameters that policy_options adds for the policy (``--plan`` refuses them where given).
POLICY_FLAG_NAMES = tuple(k.name for k in KEYWORDS)


def _cli_value(value: Any) -> Any:
    """A keyword's value as its flag takes it: None is 'none'."""
    return "none" if value is None else value


def _option(entry: Keyword) -> Callable[[F], F]:
    """The click option of one policy keyword, made from its entry in ``KEYWORDS``."""
    help = entry.help[0].upper() + entry.help[1:] + "."
    decls = (entry.option, entry.name)
    if entry.kind == "choice":
        choices = [_cli_value(c) for c in entry.choices]
        return click.option(
            *decls, type=click.Choice(choices), default=_cli_value(entry.default), show_default=True, help=help
        )
    if entry.kind in ("count", "bound"):
        return click.option(
            *decls, type=click.IntRange(min=1), default=entry.default, show_default=entry.default is not None, help=help
        )
    if entry.kind == "globs":
        return click.option(*decls, multiple=True, metavar="GLOB", help=help + " Repeatable.")
    if entry.kind == "switch":
        return click.option(*decls, is_flag=True, help=help)
    limit = entry.kind == "limit"
    return click.option(
        *decls, type=_Number(non_negative=limit, none=limit), default=entry.default, show_default=limit, help=help
    )


def policy_options(f: F) -> F:
    """The example-input flags and one flag per policy keyword (shared by inspect and convert)."""
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
        *(_option(entry) for entry in KEYWORDS),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def policy_from_flags(opts: dict[str, Any]) -> dict[str, Any]:
    """The policy keywords for resify.apply; a set of flags that breaks a rule is a click UsageError."""
    values = {k.name: None if opts[k.name] == "none" else opts[k.name] for k in KEYWORDS}
    problem = broken_rule(values, say_flag)
    if problem is not None:
        raise click.UsageError(problem, ctx=click.get_current_context())
    return {k.name: values[k.name] for k in KEYWORDS if values[k.name] != k.default}


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
            return f"try {' '.join(say_flag(k, v) for k, v in new)}: {found.effect}"
    return None
