"""How to add shortcuts: the policy keywords of ``resify.apply`` and ``resify.plan``, validated.

Part of stage 3 (planning). ``KEYWORDS`` is the one source of the keywords: name, default, values,
one-line help and the CLI flag; ``RULES`` the cross-field rules, each worded once and said in either
vocabulary (``gate_init=0.5`` in Python, ``--gate-init 0.5`` on the command line). ``Policy`` is
checked against the table (tests/test_policy.py), ``Policy.from_kwargs`` validates by it, the CLI
builds its flags from it (``resify.cli.flags``), and the tests hold the docstrings and the README
and docs tables to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..constants import (
    GATE_POLICIES,
    MAX_ADDED,
    PROJECTION_COST,
    PROJECTIONS,
    SHORTCUTS,
    GatePolicy,
    ProjectionChoice,
    ShortcutChoice,
)
from ..errors import PlanError

__all__ = ["Policy", "Keyword", "Rule", "KEYWORDS", "RULES", "keyword", "say_keyword", "say_flag", "broken_rule"]

#: how a keyword's value is read and checked: one of the choices; an int ≥ 1; an int ≥ 1 or None;
#: glob patterns (or module types); a finite number or None; a number ≥ 0 or None; True or False
Kind = Literal["choice", "count", "bound", "globs", "number", "limit", "switch"]

#: where gate='auto' gives a site a gate, it starts at gate_init, else at 0 (``resify.planning.gating``)
_DEFAULT_GATE_INIT = {None: None, "rezero": 0.0, "layerscale": 1e-4, "auto": None}


@dataclass(frozen=True)
class Keyword:
    """One policy keyword: its name, default, the values it takes, one line of help, its CLI flag."""

    name: str
    kind: Kind
    default: Any
    help: str  # one line: the CLI's --help and the docs
    choices: tuple[Any, ...] = ()
    flag: str = ""  # the CLI flag where it is not --name-with-dashes
    shown_default: str = ""  # the default as the README table shows it, where not `repr(default)`

    @property
    def option(self) -> str:
        """The CLI flag: '--gate-init'."""
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def default_text(self) -> str:
        """The default as the README's table shows it: "`'auto'`", "`0.1`", "none"."""
        if self.shown_default:
            return self.shown_default
        if self.default in (None, ()):
            return "none"
        return f"`{self.default!r}`"

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this keyword, in the library's words (None if nothing is)."""
        name, found = self.name, f"found {value!r}"
        if self.kind == "choice" and value not in self.choices:
            return f"{name} must be one of {', '.join(map(repr, self.choices))}, {found}"
        if self.kind in ("count", "bound") and not (
            (value is None and self.kind == "bound") or (_is_int(value) and value >= 1)
        ):
            also = " or None" if self.kind == "bound" else ""
            return f"{name} must be a positive integer{also} ({self.help}), {found}"
        if self.kind == "number" and value is not None and not (_is_real(value) and math.isfinite(value)):
            return f"{name} must be a finite number or None, {found}"
        if self.kind == "limit" and value is not None and not (_is_real(value) and math.isfinite(value) and value >= 0):
            return f"{name} must be a non-negative number or None (no limit), {found}"
        if self.kind == "switch" and not isinstance(value, bool):
            return f"{name} must be True or False, {found}"
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: The policy keywords, in the order of ``Policy``'s fields.
KEYWORDS: tuple[Keyword, ...] = (
    Keyword(
        "shortcut",
        "choice",
        "auto",
        "auto: identity or projection; identity: only where shapes match; dense: concatenate, widening the next layer",
        choices=SHORTCUTS,
    ),
    Keyword("group", "count", 1, "layers per shortcut"),
    Keyword("include", "globs", (), "only layers whose qualified name matches one of these globs"),
    Keyword("exclude", "globs", (), "leave out layers whose qualified name matches one of these globs"),
    Keyword(
        "gate",
        "choice",
        "auto",
        "scale each layer branch by a learnable gate; auto: chosen per site from the example's forward",
        choices=GATE_POLICIES,
    ),
    Keyword(
        "gate_init",
        "number",
        None,
        "the gate's initial value (rezero and the gates auto chooses 0, layerscale 1e-4); needs a gate",
        shown_default="0 (1e-4 for `'layerscale'`)",
    ),
    Keyword("leaf_modules", "globs", (), "module types or names to keep whole while tracing", flag="--leaf"),
    Keyword("preserve_output", "switch", False, "start every shortcut at β=0: outputs unchanged"),
    Keyword(
        "dense_max_growth",
        "bound",
        None,
        "dense: at most this many channels/features added per widened layer",
    ),
    Keyword(
        "projection",
        "choice",
        "auto",
        "where shapes change: auto: a learned 1×1, parameter-free past the cost limits; conv: learned only; "
        "pad: parameter-free (channels zero-padded or sliced)",
        choices=PROJECTIONS,
    ),
    Keyword(
        "max_added",
        "limit",
        MAX_ADDED,
        "budget of the learned projections, a share of the model's parameters (none: no limit)",
    ),
    Keyword(
        "projection_cost",
        "limit",
        PROJECTION_COST,
        "largest learned projection, a multiple of the parameters of the span it bridges (none: no limit)",
    ),
)

_BY_NAME = {k.name: k for k in KEYWORDS}


def keyword(name: str) -> Keyword:
    """The entry of ``KEYWORDS`` called ``name``."""
    return _BY_NAME[name]


_NAME = object()  # say_*(name): the keyword alone, no value

#: how a rule names a setting: ``say(name)`` or ``say(name, value)``
Say = Callable[..., str]


def say_keyword(name: str, value: Any = _NAME) -> str:
    """A setting in Python's words: ``gate_init``, ``gate_init=0.5``, ``gate=None``."""
    return name if value is _NAME else f"{name}={value!r}"


def say_flag(name: str, value: Any = _NAME) -> str:
    """A setting in the CLI's words: ``--gate-init``, ``--gate-init 0.5``, ``--gate none``."""
    option = keyword(name).option
    if value is _NAME or value is True:
        return option
    shown = "none" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))
    return f"{option} {shown}"


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: ``broken(values)`` says a combination of keywords is refused, ``says(values,
    say)`` why and what to try, in the vocabulary ``say`` speaks; ``example`` breaks it (the tests)."""

    keywords: tuple[str, ...]
    broken: Callable[[Mapping[str, Any]], bool]
    says: Callable[[Mapping[str, Any], Say], str]
    example: Mapping[str, Any]


RULES: tuple[Rule, ...] = (
    Rule(
        ("gate_init", "gate"),
        lambda v: v["gate_init"] is not None and v["gate"] is None,
        lambda v, say: (
            f"{say('gate_init')} needs a gate: found {say('gate_init', v['gate_init'])} with {say('gate', None)}; "
            f"pass {say('gate', 'auto')} (the default), {say('gate', 'rezero')} or {say('gate', 'layerscale')}, "
            f"or drop {say('gate_init')}"
        ),
        {"gate": None, "gate_init": 0.5},
    ),
    Rule(
        ("gate", "shortcut"),
        lambda v: v["shortcut"] == "dense" and v["gate"] not in (None, "auto"),
        lambda v, say: (
            f"{say('gate')} does not combine with {say('shortcut', 'dense')}: found {say('gate', v['gate'])} (a dense "
            "shortcut keeps the layer's output whole; the widened layer's new weights start at zero); "
            f"drop {say('gate')}, or choose {say('shortcut', 'auto')} or {say('shortcut', 'identity')}"
        ),
        {"shortcut": "dense", "gate": "rezero"},
    ),
    Rule(
        ("dense_max_growth", "shortcut"),
        lambda v: v["dense_max_growth"] is not None and v["shortcut"] != "dense",
        lambda v, say: (
            f"{say('dense_max_growth')} needs {say('shortcut', 'dense')}: found {say('shortcut', v['shortcut'])}; "
            f"pass {say('shortcut', 'dense')} or drop {say('dense_max_growth')}"
        ),
        {"dense_max_growth": 4},
    ),
    Rule(
        ("preserve_output", "gate_init"),
        lambda v: v["preserve_output"] and v["gate_init"] is not None and v["gate_init"] != 1.0,
        lambda v, say: (
            f"{say('preserve_output', True)} needs the gate to start at 1 to keep the outputs unchanged: found "
            f"{say('gate_init', v['gate_init'])}; drop {say('gate_init')} (or pass {say('gate_init', 1.0)})"
        ),
        {"gate": "layerscale", "gate_init": 0.1, "preserve_output": True},
    ),
)


def broken_rule(values: Mapping[str, Any], say: Say) -> str | None:
    """What the first rule that ``values`` (every keyword, defaults filled in) breaks says, in ``say``'s
    vocabulary; None where they break none."""
    for rule in RULES:
        if rule.broken(values):
            return rule.says(values, say)
    return None


@dataclass(frozen=True)
class Policy:
    """How to add shortcuts; the keywords of ``resify.apply`` and ``resify.plan`` (``KEYWORDS``)."""

    shortcut: ShortcutChoice = "auto"
    group: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    #: "auto": chosen site by site (``resify.planning.gating``): the plan's sites carry the gate built
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
        unknown = sorted(set(kwargs) - set(_BY_NAME))
        if unknown:
            raise PlanError(
                f"unknown policy keyword(s) {', '.join(unknown)}; expected some of {', '.join(sorted(_BY_NAME))}"
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
        values = {k.name: kwargs.get(k.name, k.default) for k in KEYWORDS}
        for entry in KEYWORDS:
            problem = entry.problem(values[entry.name])
            if problem is not None:
                raise PlanError(problem)
        problem = broken_rule(values, say_keyword)
        if problem is not None:
            raise PlanError(problem)
        return cls(**kwargs)

    @property
    def effective_gate_init(self) -> float | None:
        """The value a gate of this policy starts at (None: no gate; under gate='auto', the start of the
        gates it chooses where gate_init is given, else None: ``resify.planning.gating`` sets each site's)."""
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
