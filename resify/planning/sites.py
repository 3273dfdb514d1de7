"""The plan's records: the policy, the sites (each with a typed shortcut form), the skips, the Plan.

``planner.make_plan`` fills them in and ``rewrite`` executes them: a Site tells the executor what to
build in typed fields (its ``shortcut``: :class:`Identity`, :class:`Projection` or :class:`Dense`),
and every display label is derived from those fields. A :class:`Skipped` carries a stable ``code``
(one of ``SKIP_CODES``) beside its prose reason. Plans print through ``resify.views.plan_table`` and
round-trip through ``to_dict`` / ``Plan.from_dict`` (every earlier schema version is read).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from ..analysis.analyze import ExistingShortcut
from ..constants import (
    PLAN_SCHEMA_VERSION,
    GateChoice,
    SiteKind,
    TracerChoice,
)
from ..errors import PlanError
from ..tracing.units import WholeModule
from .gate_reasons import GATE_RULES, GateReason, GateRule
from .policy import Policy
from .skips import SKIP_CODES, SkipCode, Skipped

__all__ = [
    "Policy",
    "Identity",
    "Projection",
    "Dense",
    "ShortcutForm",
    "GateRule",
    "GATE_RULES",
    "GateReason",
    "Site",
    "SkipCode",
    "SKIP_CODES",
    "Skipped",
    "Plan",
]


@dataclass(frozen=True)
class Identity:
    """The shortcut is the span's input itself."""

    @property
    def label(self) -> str:
        return "identity"


@dataclass(frozen=True)
class Projection:
    """The shortcut maps the span's input to the branch's shape.

    ``op`` is ``"linear"`` (a Linear on the last dimension), ``"conv"`` (a 1×1 ConvNd of ``stride``
    and ``groups``, then ``norm`` if set), ``"pool"`` (no parameters: the channels hold) or ``"pad"``
    (no parameters: the channels zero-padded or sliced to the branch's, the size strided by
    ``stride``, as in ResNet's option A). ``pool``: the input is average-pooled to the branch's output
    size, read at run time (``pool_last``: after the conv).
    """

    op: Literal["linear", "conv", "pool", "pad"]
    channels: tuple[int, int]  # (in, out) channels or features
    dims: int = 0  # spatial dimensions of a conv projection
    stride: tuple[int, ...] = ()
    pool: bool = False
    pool_last: bool = False
    norm: str | None = None  # "BatchNorm2d", …: the norm that follows a conv projection
    groups: int = 1  # a conv projection's groups (beside a grouped or depthwise convolution)
    upsample: bool = False  # ``pool`` resamples up (nearest): the branch grows the map (a decoder)

    @property
    def learned(self) -> bool:
        """Whether the shortcut has weights (a Linear or a 1×1 conv); pool and pad have none."""
        return self.op in ("linear", "conv")

    def parameter_free(self) -> Projection:
        """The same change of shape without parameters: ResNet's option A (pad or slice, stride, pool)."""
        return replace(self, op="pad", norm=None, pool_last=False, groups=1)

    @property
    def params(self) -> int:
        """The parameters the shortcut adds (its gate and β not counted)."""
        cin, cout = self.channels
        if self.op == "linear":
            return cin * cout + cout
        if self.op == "conv":
            return cin * cout // self.groups + (2 * cout if self.norm else 0)
        return 0

    @property
    def label(self) -> str:
        """E.g. "Linear(128, 64)", "Conv2d(64, 128, 1, stride=2) + BatchNorm2d", "AvgPool2d(→out)"."""
        cin, cout = self.channels
        if self.op == "linear":
            return f"Linear({cin}, {cout})"
        pool = "Upsample(→out, nearest)" if self.upsample else f"AvgPool{self.dims}d(→out)"
        if self.op == "pool":
            return pool
        shown = ""
        if self.stride:
            shown = f", stride={self.stride[0] if len(set(self.stride)) == 1 else self.stride}"
        if self.op == "pad":
            where = "features" if self.dims == 0 else "channels"
            steps = [f"{'zero-pad' if cout > cin else 'slice'} {where} {cin}→{cout}"] if cin != cout else []
            steps += [f"stride {shown.removeprefix(', stride=')}"] if shown else []
            steps += [pool] if self.pool else []
            return ", ".join(steps) or "identity"
        shown += f", groups={self.groups}" if self.groups > 1 else ""
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
    name: str = ""  # key under its owner's resify namespace: <owner>.resify.<name>
    channel_dim: int = -1  # -1 for [..., C] tensors (Linear), 1 for [N, C, *spatial] (ConvNd)
    #: the smallest module whose forward holds the whole span ("" for the root): the one rewritten
    owner: str = ""
    #: where the span's output is among its layers' ops, counted from the last (-1: the last one;
    #: 0 for a site read from a schema 1 or 2 plan, found by its ``exit`` node name instead)
    exit_step: int = -1
    #: why gate='auto' chose ``gate`` (None: the gate was given, not chosen)
    gate_reason: GateReason | None = None

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
        """Read a site written by ``to_dict`` (schema 2 to 4) or by resify's schema 1 (flat shortcut fields)."""
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
            owner=d.get("owner", ""),
            exit_step=int(d.get("exit_step", 0)),  # 0: a schema 1 or 2 site, found by its node names
            gate_reason=GateReason(**d["gate_reason"]) if d.get("gate_reason") else None,
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


#: the forms ``Plan.counts`` counts, in the order ``Plan.summary`` writes them
_COUNTED = ("identity", "projection", "parameter-free", "dense")


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
    layers: tuple[str, ...] = field(default=(), repr=False)  # every layer's name, in forward order (the diagram's)
    #: modules whose own forward is left as it is (untraceable: planned inside their children)
    whole: tuple[WholeModule, ...] = field(default=())

    @property
    def added_params(self) -> int:
        return sum(s.added_params for s in self.sites)

    def counts(self) -> dict[str, int]:
        """Sites by form: identity, projection (learned), parameter-free (pooled or padded), dense.

        Only the forms present, in that order; ``Site.kind`` stays "projection" for both kinds of
        projection (the plan's JSON keeps it), this count tells them apart.
        """
        out = dict.fromkeys(_COUNTED, 0)
        for s in self.sites:
            free = isinstance(s.shortcut, Projection) and not s.shortcut.learned
            out["parameter-free" if free else s.kind] += 1
        return {k: v for k, v in out.items() if v}

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
            # where forward reads self.training: the same sites in the other mode's graph (its node names)
            "other_mode_sites": None if self.other_mode_sites is None else [s.to_dict() for s in self.other_mode_sites],
            "layers": list(self.layers),
            "whole": [w.to_dict() for w in self.whole],
        }

    def summary(self) -> str:
        """One line: sites by kind, parameters added and growth."""
        by_kind = ", ".join(f"{v} {k}" for k, v in self.counts().items()) or "none"
        growth = 100.0 * self.added_params / self.params_before if self.params_before else 0.0
        return (
            f"{len(self.sites)} shortcut(s) ({by_kind}); {len(self.skipped)} skipped; "
            f"{len(self.existing)} existing; +{self.added_params:,} parameters (+{growth:.2f}%)"
        )

    def to_text(self, width: int | None = None) -> str:
        """The plan as an aligned table, ``width`` columns at most; None: the terminal's width
        (``shutil.get_terminal_size``: ``COLUMNS``, else the terminal, else 100)."""
        from ..views.plan_table import plan_text  # the renderer imports these records' module for typing only

        return plan_text(self, width)

    def __str__(self) -> str:
        return self.to_text(100)

    def to_html(self, page: bool = True) -> str:
        """The plan with its architecture diagram: a self-contained HTML page, or a notebook fragment."""
        from ..views.html import plan_html  # html imports these records for typing only

        return plan_html(self, page=page)

    def _repr_html_(self) -> str:
        return self.to_html(page=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """Read back what :meth:`to_dict` wrote (this schema version, or any earlier one)."""
        version = d.get("schema_version")
        if isinstance(version, int) and version > PLAN_SCHEMA_VERSION:
            raise PlanError(
                f"expected a plan of schema_version {PLAN_SCHEMA_VERSION} or older, found {version}: it was "
                f"written by a newer resify; upgrade resify to one that reads schema {version}"
            )
        if version not in range(1, PLAN_SCHEMA_VERSION + 1):
            raise PlanError(
                f"expected a plan of schema_version 1 to {PLAN_SCHEMA_VERSION}, found {version!r}; "
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
            other_mode_sites=None
            if d.get("other_mode_sites") is None
            else tuple(Site.from_dict(s) for s in d["other_mode_sites"]),
            layers=tuple(d.get("layers", ())),
            whole=tuple(WholeModule(**w) for w in d.get("whole", ())),
        )
