"""The plan's records: the policy, the sites (each with a typed shortcut form), the skips, the Plan.

``planner.make_plan`` fills them in and ``rewrite`` executes them: a Site tells the executor what to
build in typed fields (its ``shortcut``: :class:`Identity`, :class:`Projection` or :class:`Dense`),
and every display label is derived from those fields. A :class:`Skipped` carries a stable ``code``
(one of ``SKIP_CODES``) beside its prose reason. Plans print through ``resify.render`` and
round-trip through ``to_dict`` / ``Plan.from_dict`` (schema versions 1 and 2 are read).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from .analyze import ExistingShortcut
from .constants import GATES, PLAN_SCHEMA_VERSION, SHORTCUTS, GateChoice, ShortcutChoice, SiteKind, TracerChoice
from .errors import PlanError

__all__ = [
    "Policy",
    "Identity",
    "Projection",
    "Dense",
    "ShortcutForm",
    "Site",
    "SkipCode",
    "SKIP_CODES",
    "Skipped",
    "Plan",
]

_DEFAULT_GATE_INIT = {None: None, "rezero": 0.0, "layerscale": 1e-4}


@dataclass(frozen=True)
class Policy:
    """How to add shortcuts; the keywords of ``resify.apply`` and ``resify.plan``."""

    shortcut: ShortcutChoice = "auto"
    group: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    gate: GateChoice | None = None
    gate_init: float | None = None
    leaf_modules: tuple = ()
    preserve_output: bool = False
    dense_max_growth: int | None = None

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
            else:
                kwargs[key] = tuple(value)
        policy = cls(**kwargs)
        if policy.shortcut not in SHORTCUTS:
            raise PlanError(f"shortcut must be one of {', '.join(map(repr, SHORTCUTS))}, found {policy.shortcut!r}")
        if policy.shortcut == "dense" and policy.gate is not None:
            raise PlanError(
                f"gate={policy.gate!r} does not combine with shortcut='dense': a dense shortcut keeps the layer's "
                "output whole (the widened layer's new weights start at zero); drop the gate"
            )
        if policy.dense_max_growth is not None and (
            policy.shortcut != "dense" or not isinstance(policy.dense_max_growth, int) or policy.dense_max_growth < 1
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
        if policy.gate not in GATES:
            raise PlanError(f"gate must be one of {', '.join(map(repr, GATES))}, found {policy.gate!r}")
        if not isinstance(policy.group, int) or isinstance(policy.group, bool) or policy.group < 1:
            raise PlanError(f"group must be a positive integer (layers per shortcut), found {policy.group!r}")
        if policy.gate_init is not None and policy.gate is None:
            raise PlanError("gate_init was given without a gate; pass gate='rezero' or gate='layerscale' too")
        if policy.gate_init is not None and not math.isfinite(float(policy.gate_init)):
            raise PlanError(f"gate_init must be a finite number, found {policy.gate_init!r}")
        return policy

    @property
    def effective_gate_init(self) -> float | None:
        if self.gate_init is not None:
            return self.gate_init
        if self.preserve_output and self.gate is not None:
            return 1.0  # the branch must start whole for the output to be unchanged
        return _DEFAULT_GATE_INIT[self.gate]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["leaf_modules"] = [x if isinstance(x, str) else x.__name__ for x in self.leaf_modules]
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d


@dataclass(frozen=True)
class Identity:
    """The shortcut is the span's input itself."""

    @property
    def label(self) -> str:
        return "identity"


@dataclass(frozen=True)
class Projection:
    """The shortcut maps the span's input to the branch's shape.

    ``op`` is ``"linear"`` (a Linear on the last dimension), ``"conv"`` (a 1×1 ConvNd of ``stride``,
    then ``norm`` if set) or ``"pool"`` (no parameters: the channels hold). ``pool``: the input is
    average-pooled to the branch's output size, read at run time (``pool_last``: after the conv).
    """

    op: Literal["linear", "conv", "pool"]
    channels: tuple[int, int]  # (in, out) channels or features
    dims: int = 0  # spatial dimensions of a conv projection
    stride: tuple[int, ...] = ()
    pool: bool = False
    pool_last: bool = False
    norm: str | None = None  # "BatchNorm2d", …: the norm that follows a conv projection

    @property
    def label(self) -> str:
        """E.g. "Linear(128, 64)", "Conv2d(64, 128, 1, stride=2) + BatchNorm2d", "AvgPool2d(→out)"."""
        cin, cout = self.channels
        if self.op == "linear":
            return f"Linear({cin}, {cout})"
        pool = f"AvgPool{self.dims}d(→out)"
        if self.op == "pool":
            return pool
        shown = ""
        if self.stride:
            shown = f", stride={self.stride[0] if len(set(self.stride)) == 1 else self.stride}"
        conv = f"Conv{self.dims}d({cin}, {cout}, 1{shown})" + (f" + {self.norm}" if self.norm else "")
        if not self.pool:
            return conv
        return f"{conv} + {pool}" if self.pool_last else f"{pool} + {conv}"


@dataclass(frozen=True)
class Dense:
    """DenseNet-style: ``cat([x, F(x)])``, with ``consumer`` widened by ``extra_channels`` zero weights."""

    consumer: str  # the layer that takes the concatenation
    extra_channels: int
    pool: bool = False  # the shortcut is average-pooled to the branch's output size

    @property
    def label(self) -> str:
        shown = " (shortcut avg-pooled to the output size)" if self.pool else ""
        return f"concat, widens {self.consumer} by {self.extra_channels}{shown}"


ShortcutForm = Identity | Projection | Dense


@dataclass(frozen=True)
class Site:
    """One shortcut to insert: around the layers from ``start`` to ``end``."""

    start: str
    end: str
    layers: tuple[str, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    shortcut: ShortcutForm
    gate: GateChoice | None
    gate_init: float | None
    added_params: int
    preserve_output: bool = False  # the shortcut is scaled by a learnable β that starts at 0
    # where rewrite finds it
    anchor: str = ""  # fx node of the first layer's parametric op (its input is the span's input)
    exit: str = ""  # fx node of the span's output
    name: str = ""  # key under the resify namespace
    channel_dim: int = -1  # -1 for [..., C] tensors (Linear), 1 for [N, C, *spatial] (ConvNd)

    @property
    def kind(self) -> SiteKind:
        """ "identity", "projection" or "dense"."""
        if isinstance(self.shortcut, Identity):
            return "identity"
        return "dense" if isinstance(self.shortcut, Dense) else "projection"

    @property
    def projection(self) -> str | None:
        """The shortcut's label, e.g. "Linear(128, 64)"; None for an identity."""
        return None if isinstance(self.shortcut, Identity) else self.shortcut.label

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shortcut"] = {"form": self.kind, **_listed(asdict(self.shortcut))}
        d.update(kind=self.kind, projection=self.projection)
        return _listed(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Site:
        """Read a site written by ``to_dict`` (schema 2) or by resify's schema 1 (flat shortcut fields)."""
        form = d.get("shortcut") or _v1_shortcut(d)
        kind = form.get("form", d.get("kind"))
        fields = {k: v for k, v in form.items() if k != "form"}
        shortcut: ShortcutForm
        if kind == "identity":
            shortcut = Identity()
        elif kind == "dense":
            shortcut = Dense(**fields)
        elif kind == "projection":
            shortcut = Projection(**_tupled(fields))
        else:
            raise PlanError(f"expected a site of kind identity, projection or dense, found {kind!r}")
        return cls(
            start=d["start"],
            end=d["end"],
            layers=tuple(d["layers"]),
            in_shape=tuple(d["in_shape"]),
            out_shape=tuple(d["out_shape"]),
            shortcut=shortcut,
            gate=d["gate"],
            gate_init=d["gate_init"],
            added_params=int(d["added_params"]),
            preserve_output=bool(d.get("preserve_output", False)),
            anchor=d["anchor"],
            exit=d["exit"],
            name=d["name"],
            channel_dim=int(d["channel_dim"]),
        )


def _listed(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _tupled(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _v1_shortcut(d: Mapping[str, Any]) -> dict:
    """The typed shortcut of a schema-1 site, from its flat fields."""
    if d["kind"] == "identity":
        return {"form": "identity"}
    if d["kind"] == "dense":
        return {"form": "dense", "consumer": d["consumer"], "extra_channels": d["extra_channels"], "pool": d["pool"]}
    cin, cout = d["channels"]
    dims = len(d["in_shape"]) - 2
    if d["channel_dim"] == -1:
        op, dims = "linear", 0
    elif d["pool"] and cin == cout and not d.get("norm"):
        op = "pool"
    else:
        op = "conv"
    return {
        "form": "projection",
        "op": op,
        "channels": [cin, cout],
        "dims": dims,
        "stride": d.get("stride", []),
        "pool": d["pool"],
        "pool_last": d.get("pool_last", False),
        "norm": d.get("norm"),
    }


SkipCode = Literal[
    "excluded",  # an exclude pattern matched, or include did not
    "inside_existing",  # the layer is inside a shortcut the model already has
    "group_remainder",  # fewer layers left than group=
    "not_single_entry_exit",  # a value joins or leaves the span between its input and output
    "bounded_output",  # the span ends in the model's bounded output activation
    "no_shape",  # no tensor shape was recorded
    "not_float",  # non-float tensors, or a dtype change across the span
    "identity_needs_same_shape",  # shortcut='identity' and the shape changes (at some input size)
    "rank_change",  # a flatten inside the span
    "linear_span",  # no activation, norm or pool: a projection would be one more linear map
    "unsupported_shape",  # a shape change no projection handles
    "no_consumer",  # dense: the span's output has no layer that can be widened
    "dense_growth",  # dense: more than dense_max_growth channels
    "mode_differs",  # the span differs between train and eval mode
    "unrecorded",  # read from a schema-1 plan, which had no codes
]
SKIP_CODES: tuple[SkipCode, ...] = get_args(SkipCode)


@dataclass(frozen=True)
class Skipped:
    """A candidate span that was not used: a stable ``code`` (see ``SkipCode``) and the reason in prose."""

    start: str
    end: str
    code: SkipCode
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Skipped:
        return cls(d["start"], d["end"], d.get("code", "unrecorded"), d["reason"])


@dataclass(frozen=True)
class Plan:
    """What ``resify.apply`` will do to a model, and why. Frozen; print it or call ``to_dict()``."""

    model_class: str
    tracer: TracerChoice
    policy: Policy
    n_layers: int
    params_before: int
    sites: tuple[Site, ...]
    skipped: tuple[Skipped, ...]
    existing: tuple[ExistingShortcut, ...]
    notes: tuple[str, ...] = field(default=())
    #: where forward reads ``self.training``: the same sites, found in the other mode's graph
    other_mode_sites: tuple[Site, ...] | None = field(default=None, repr=False)

    @property
    def added_params(self) -> int:
        return sum(s.added_params for s in self.sites)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sites:
            out[s.kind] = out.get(s.kind, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "model_class": self.model_class,
            "tracer": self.tracer,
            "policy": self.policy.to_dict(),
            "n_layers": self.n_layers,
            "params_before": self.params_before,
            "added_params": self.added_params,
            "sites": [s.to_dict() for s in self.sites],
            "skipped": [s.to_dict() for s in self.skipped],
            "existing": [e.to_dict() for e in self.existing],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """One line: sites by kind, parameters added and growth."""
        by_kind = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items())) or "none"
        growth = 100.0 * self.added_params / self.params_before if self.params_before else 0.0
        return (
            f"{len(self.sites)} shortcut(s) ({by_kind}); {len(self.skipped)} skipped; "
            f"{len(self.existing)} existing; +{self.added_params:,} parameters (+{growth:.2f}%)"
        )

    def __str__(self) -> str:
        from .render import plan_text  # the renderer imports these records' module for typing only

        return plan_text(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """Read back what :meth:`to_dict` wrote (schema version 2, or 1 from earlier resify)."""
        version = d.get("schema_version")
        if version not in (1, PLAN_SCHEMA_VERSION):
            raise PlanError(
                f"expected a plan of schema_version 1 or {PLAN_SCHEMA_VERSION}, found {version!r}; "
                "re-create it with resify.plan"
            )
        policy = dict(d["policy"])
        policy.pop("leaf_modules", None)  # classes are written by name; they cannot be read back
        return cls(
            model_class=d["model_class"],
            tracer=d["tracer"],
            policy=Policy.from_kwargs(**policy),
            n_layers=int(d["n_layers"]),
            params_before=int(d["params_before"]),
            sites=tuple(Site.from_dict(s) for s in d["sites"]),
            skipped=tuple(Skipped.from_dict(s) for s in d["skipped"]),
            existing=tuple(ExistingShortcut(**{**e, "layers": tuple(e["layers"])}) for e in d["existing"]),
            notes=tuple(d.get("notes", ())),
        )
