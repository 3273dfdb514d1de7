"""Stage 3 of the pipeline: a pure function from the analysis and a policy to a frozen Plan.

The Plan says which shortcuts will be inserted (Sites), which candidates were not used and why
(Skipped), and which shortcuts the model already has (Existing). It prints as a table and
converts to a plain dict; ``rewrite`` only executes it.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .analyze import Analysis, ExistingShortcut, Layer
from .errors import PlanError, ResifyWarning
from .formats import fmt_shape
from .ops import (
    SAME,
    Window,
    data_input,
    describe,
    follower_role,
    is_bounded_activation,
    reaches_output_unchanged,
    size_functions,
)
from .trace import TensorInfo

__all__ = [
    "Policy",
    "Site",
    "Skipped",
    "Plan",
    "make_plan",
    "reconcile_modes",
    "SHORTCUTS",
    "GATES",
    "PLAN_SCHEMA_VERSION",
]

SHORTCUTS = ("auto", "identity", "dense")
GATES = (None, "rezero", "layerscale")
PLAN_SCHEMA_VERSION = 1
_DEFAULT_GATE_INIT = {None: None, "rezero": 0.0, "layerscale": 1e-4}


@dataclass(frozen=True)
class Policy:
    """How to add shortcuts; the keywords of ``resify.apply`` and ``resify.plan``."""

    shortcut: str = "auto"
    group: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    gate: str | None = None
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
            raise PlanError(f"gate must be one of None, 'rezero', 'layerscale', found {policy.gate!r}")
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
class Site:
    """One shortcut to insert: around the layers from ``start`` to ``end``."""

    kind: str  # "identity", "projection" or "dense"
    start: str
    end: str
    layers: tuple[str, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    gate: str | None
    gate_init: float | None
    added_params: int
    projection: str | None  # e.g. "Linear(128, 64)" or "Conv2d(64, 128, 1×1, stride 2) + BatchNorm2d"
    # how rewrite finds and builds it
    anchor: str  # fx node of the first layer's parametric op (its input is the span's input)
    exit: str  # fx node of the span's output
    name: str  # key under the resify namespace
    stride: tuple[int, ...] = ()  # the 1×1 projection's stride, where the span's size follows one
    pool: bool = False  # the shortcut average-pools its input to the branch's output size at run time
    pool_last: bool = False  # ... after its projection and norm (the span normalises before it pools)
    norm: str | None = None  # BatchNorm type to follow a conv projection
    channels: tuple[int, int] = (0, 0)  # (in, out) channels or features
    channel_dim: int = -1  # -1 for [..., C] tensors (Linear), 1 for [N, C, *spatial] (ConvNd)
    preserve_output: bool = False  # the shortcut is scaled by a learnable β that starts at 0
    consumer: str | None = None  # dense: the layer that is widened to take the concatenation
    extra_channels: int = 0  # dense: channels/features the consumer gains

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("layers", "in_shape", "out_shape", "stride", "channels"):
            d[key] = list(d[key])
        return d


@dataclass(frozen=True)
class Skipped:
    """A candidate span that was not used, with the reason."""

    start: str
    end: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """What ``resify.apply`` will do to a model, and why. Frozen; print it or call ``to_dict()``."""

    model_class: str
    tracer: str
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
        from .render import plan_text

        return plan_text(self)


# ---------------------------------------------------------------------------------------------
# the pure planning function


def _pattern_reason(name: str, policy: Policy) -> str | None:
    for p in policy.exclude:
        if fnmatch.fnmatchcase(name, p):
            return f"excluded by pattern {p!r}"
    if policy.include and not any(fnmatch.fnmatchcase(name, p) for p in policy.include):
        return f"not matched by include={list(policy.include)!r}"
    return None


#: Input sizes on which a span's geometry is compared with its shortcut's (every size the span
#: accepts up to this bound: the formulas are periodic in the stride, so this covers all sizes).
_PROBE_SIZES = range(1, 257)


def _geometry(layers: Sequence[Layer], analysis: Analysis, dims: int) -> tuple[str, tuple[int, ...]]:
    """How a conv span's spatial size follows its input's, from its ops' hyperparameters.

    ``("same", ())``: every size is kept; ``("stride", S)``: out = ceil(in / S) on every size the span
    accepts, what a 1×1 conv of stride S gives; ``("match", ())``: anything else (a pool, whose
    windows the shortcut averages over; an adaptive pool; a valid convolution), where the shortcut
    is average-pooled to the branch's own output size at run time.
    """
    nodes = [analysis.node(name) for layer in layers for name in layer.nodes]
    found = _size_rule(nodes, analysis, dims)
    if found is None:
        return "match", ()
    strides, pooled = found
    if all(s == 1 for s in strides):
        return "same", ()
    return ("match", ()) if pooled else ("stride", tuple(strides))


def _size_rule(nodes: Sequence, analysis: Analysis, dims: int) -> tuple[list[int], bool] | None:
    """Per spatial dim the stride S with out = ceil(in / S) for every size the ops accept, and whether
    one of them pools; None where the ops' sizes follow no such rule (or cannot be told)."""
    per_dim: list[list[Window]] = [[] for _ in range(dims)]
    pooled = False
    for n in nodes:
        fns = size_functions(analysis.module, n, dims)
        if fns is None:
            return None
        pooled = pooled or follower_role(analysis.module, n) == "pool"
        for d, fn in enumerate(fns):
            if fn != SAME:
                per_dim[d].append(fn)
    strides = [_stride_of(tuple(windows)) for windows in per_dim]
    if any(s is None for s in strides):
        return None
    return strides, pooled  # type: ignore[return-value]


@functools.lru_cache(maxsize=4096)
def _stride_of(windows: tuple[Window, ...]) -> int | None:
    """S with ceil(in / S) == the windows' output for every input size they accept, or None."""
    if not windows:
        return 1
    sizes = {}
    for size in _PROBE_SIZES:
        out: int | None = size
        for window in windows:
            out = window(out) if out is not None and out >= 1 else None
        if out is not None and out >= 1:
            sizes[size] = out
    if not sizes:
        return None
    top = max(sizes)
    stride = max(1, round(top / sizes[top]))
    if any(-(-i // stride) != o for i, o in sizes.items()):
        return None
    return stride


def _norm_sees(layers: Sequence[Layer], analysis: Analysis, dims: int) -> str | None:
    """Which size the span's first norm sees at every input size: "input", "output" or None.

    A BatchNorm on the shortcut goes where it sees that same size, so that it accepts every batch
    the span's own does (one sample of 1×1 maps is refused in training).
    """
    nodes = [analysis.node(name) for layer in layers for name in layer.nodes]
    first = next((i for i, n in enumerate(nodes) if follower_role(analysis.module, n) == "norm"), None)
    if first is None:
        return None
    before, after = _size_rule(nodes[:first], analysis, dims), _size_rule(nodes[first:], analysis, dims)
    if before is not None and all(s == 1 for s in before[0]):
        return "input"
    if after is not None and all(s == 1 for s in after[0]):
        return "output"
    return None


def _site_for(layers: Sequence[Layer], analysis: Analysis, policy: Policy, name: str, carry: int = 0) -> Site | str:
    """A Site for the span over ``layers``, or the reason there cannot be one."""
    first, last = layers[0], layers[-1]
    anchor = analysis.node(first.anchor)
    exit = analysis.node(last.output)
    problem = analysis.span_problem(data_input(anchor), exit)
    if problem:
        return problem
    if is_bounded_activation(analysis.module, exit) and reaches_output_unchanged(analysis.module, exit):
        return (
            f"the span ends in a bounded activation ({describe(analysis.module, exit)}) whose range is the "
            "model's output range: a shortcut would take outputs out of it"
        )
    src: TensorInfo | None = first.in_info
    dst: TensorInfo | None = last.out_info
    if src is None or dst is None:
        return "no tensor shape was recorded for the span's input or output"
    if not src.is_float or not dst.is_float:
        return f"non-float input ({src.dtype}); shortcuts need floating-point tensors"
    if src.dtype != dst.dtype:
        return f"dtype changes across the span ({src.dtype} -> {dst.dtype})"
    gate, gate_init = policy.gate, policy.effective_gate_init
    common = dict(
        start=first.name,
        end=last.name,
        layers=tuple(layer.name for layer in layers),
        in_shape=src.shape,
        out_shape=dst.shape,
        gate=gate,
        gate_init=gate_init,
        anchor=first.anchor,
        exit=last.output,
        name=name,
    )
    channel_dim = -1 if first.kind == "Linear" else 1
    common["channel_dim"] = channel_dim
    if policy.shortcut == "dense":
        return _dense_site(src, dst, layers, analysis, policy, common, carry)
    common["preserve_output"] = policy.preserve_output
    out_c = dst.shape[channel_dim] if dst.shape else 1
    gate_params = {None: 0, "rezero": 1, "layerscale": out_c}[gate] + int(policy.preserve_output)
    dims = int(first.kind[-2]) if first.kind.startswith("Conv") else 0  # "Conv2d" -> 2
    conv_geometry = dims and len(src.shape) == dims + 2 and len(dst.shape) == dims + 2
    geometry, stride = _geometry(layers, analysis, dims) if conv_geometry else ("same", ())
    change = f"{fmt_shape(src.shape)} -> {fmt_shape(dst.shape)}"
    if src.shape == dst.shape and geometry == "same":
        return Site(kind="identity", added_params=gate_params, projection=None, channels=(out_c, out_c), **common)
    if policy.shortcut == "identity":
        if src.shape == dst.shape:
            return (
                f"the span keeps the shape {fmt_shape(src.shape)} only at this input size (an adaptive pool "
                "or a valid convolution); shortcut='identity' needs it kept at every size; try shortcut='auto'"
            )
        return (
            f"shape changes {change}; shortcut='identity' adds shortcuts only where shapes "
            "match; try shortcut='auto' for a learned projection"
        )
    if len(src.shape) != len(dst.shape):
        return f"rank change {change} (e.g. a flatten) inside the span; a projection cannot bridge it"
    if all(r == "dropout" for layer in layers for r in layer.roles):
        # W·x + P·x = (W + P)·x: beside a branch with no nonlinearity (a classifier head), a learned
        # projection is a second linear map of the same input; it adds parameters, not a shorter path
        return "the span is linear (no activation, norm or pool): a projection would add one more linear map"
    if first.kind == "Linear":
        if src.shape[:-1] != dst.shape[:-1]:
            return f"unsupported shape change {change}: a Linear projection changes the last dimension only"
        cin, cout = src.shape[-1], dst.shape[-1]
        return Site(
            kind="projection",
            added_params=cin * cout + cout + gate_params,
            projection=f"Linear({cin}, {cout})",
            channels=(cin, cout),
            **common,
        )
    if not conv_geometry or src.shape[0] != dst.shape[0]:
        return f"unsupported shape change {change} for a {first.kind} span"
    cin, cout = src.shape[1], dst.shape[1]
    if geometry != "match":  # the size follows a stride (1 or more): a 1×1 projection with that stride
        shown = "" if not stride else f", stride={stride[0] if len(set(stride)) == 1 else stride}"
        # a norm sees the projection's output size: the span's must see the span's output size
        # (or its input's, where the span keeps the size)
        sees = _norm_sees(layers, analysis, dims)
        norm = _span_norm(layers, analysis, dims) if sees == "output" or (not stride and sees) else None
        added = cin * cout + (2 * cout if norm else 0) + gate_params
        label = f"Conv{dims}d({cin}, {cout}, 1{shown})" + (f" + {norm}" if norm else "")
        return Site(
            kind="projection",
            added_params=added,
            projection=label,
            stride=stride,
            norm=norm,
            channels=(cin, cout),
            **common,
        )
    # Where the span pools (a max-pool ending a VGG stage, a global average pool) or its size does not
    # follow a stride, the shortcut averages its input to the branch's output size at run time; where
    # the channels do not change either, that pooling is the whole shortcut, without parameters.
    pool = f"AvgPool{dims}d(→out)"
    if cin == cout:
        return Site(
            kind="projection", added_params=gate_params, projection=pool, pool=True, channels=(cin, cout), **common
        )
    # A norm on the projection sees what the span's norm sees: the input's size (conv → norm → pool:
    # the head of an EfficientNet normalises 7×7 maps, then pools them to 1×1, and trains on a batch
    # of one) or the output's (pool → conv → norm); where it sees neither, the projection has none.
    sees = _norm_sees(layers, analysis, dims)
    norm = _span_norm(layers, analysis, dims) if sees else None
    pool_last = sees == "input"
    conv = f"Conv{dims}d({cin}, {cout}, 1)" + (f" + {norm}" if norm else "")
    label = f"{conv} + {pool}" if pool_last else f"{pool} + {conv}"
    added = cin * cout + (2 * cout if norm else 0) + gate_params
    return Site(
        kind="projection",
        added_params=added,
        projection=label,
        pool=True,
        pool_last=pool_last,
        norm=norm,
        channels=(cin, cout),
        **common,
    )


def _span_norm(layers: Sequence[Layer], analysis: Analysis, dims: int) -> str | None:
    """The BatchNorm type a conv projection gets: one where the span has a batch norm."""
    return next(
        (f"BatchNorm{dims}d" for layer in layers for r in layer.roles if r == "norm" and analysis.has_batchnorm(layer)),
        None,
    )


def _dense_site(
    src: TensorInfo,
    dst: TensorInfo,
    layers: Sequence[Layer],
    analysis: Analysis,
    policy: Policy,
    common: dict,
    carry: int,
) -> Site | str:
    """A dense site: cat([x, F(x)]) and the consumer widened with zero weights for x, or why not."""
    cd = common["channel_dim"]
    change = f"{fmt_shape(src.shape)} -> {fmt_shape(dst.shape)}"
    if len(src.shape) != len(dst.shape):
        return f"rank change {change} (e.g. a flatten) inside the span; cannot concatenate"
    pool = False
    if cd == -1:
        if src.shape[:-1] != dst.shape[:-1]:
            return f"unsupported shape change {change}: concatenation on the last dimension needs the others equal"
    else:
        if src.shape[0] != dst.shape[0]:
            return f"unsupported shape change {change}"
        pool = _geometry(layers, analysis, len(src.shape) - 2)[0] != "same"
    found = analysis.dense_consumer(analysis.node(common["exit"]), cd)
    if isinstance(found, str):
        return found
    consumer, consumer_params_per_channel = found
    extra = src.shape[cd] + carry
    if policy.dense_max_growth is not None and extra > policy.dense_max_growth:
        return (
            f"would add {extra} channels/features to '{consumer}', more than dense_max_growth={policy.dense_max_growth}"
        )
    added = extra * consumer_params_per_channel
    shown = " (shortcut avg-pooled to the output size)" if pool else ""
    return Site(
        kind="dense",
        added_params=added,
        projection=f"concat, widens {consumer} by {extra}{shown}",
        pool=pool,
        channels=(extra, dst.shape[cd]),
        consumer=consumer,
        extra_channels=extra,
        **common,
    )


def _site_name(layers: Sequence[Layer], taken: set[str]) -> str:
    base = layers[0].name.replace(".", "_") or "layer"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _check_patterns(analysis: Analysis, policy: Policy) -> None:
    names = [layer.name for layer in analysis.layers]
    shown = ", ".join(names[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "") or "none"
    for kind, patterns in (("include", policy.include), ("exclude", policy.exclude)):
        for p in patterns:
            if any(fnmatch.fnmatchcase(n, p) for n in names):
                continue
            message = f"{kind} pattern {p!r} matches no layer; the layers resify can put a shortcut around are: {shown}"
            if kind == "include":
                raise PlanError(message)
            warnings.warn(message, ResifyWarning, stacklevel=4)


def make_plan(analysis: Analysis, policy: Policy, params_before: int = 0) -> Plan:
    """Decide the shortcut sites for an analysed model under ``policy`` (pure: changes nothing).

    Raises:
        PlanError: an ``include`` pattern matches no layer (the message lists the layers); an
            ``exclude`` pattern that matches none is a ResifyWarning.
    """
    _check_patterns(analysis, policy)
    skipped: list[Skipped] = []
    runs: list[list[Layer]] = [[]]
    for layer in analysis.layers:
        if layer.name in analysis.inside_existing:
            reason = f"inside the existing shortcut at '{analysis.inside_existing[layer.name]}'"
        else:
            reason = _pattern_reason(layer.name, policy)
        if reason:
            skipped.append(Skipped(layer.name, layer.name, reason))
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(layer)
    taken = set(analysis.taken_names())
    sites: list[Site] = []
    carry: dict[str, int] = {}  # dense: consumer layer name -> features its input already gained
    for run in runs:
        i = 0
        while i < len(run):
            group = run[i : i + policy.group]
            if len(group) < policy.group:
                skipped.append(
                    Skipped(group[0].name, group[-1].name, f"only {len(group)} layer(s) left for group={policy.group}")
                )
                break
            found = _site_for(group, analysis, policy, _site_name(group, taken), carry.pop(group[0].name, 0))
            if isinstance(found, Site):
                sites.append(found)
                if found.consumer is not None:
                    carry[found.consumer] = found.extra_channels
                i += policy.group
            else:
                skipped.append(Skipped(group[0].name, group[-1].name, found))
                i += 1  # slide: a group may still start at the next layer
    return Plan(
        model_class=analysis.traced.model_class,
        tracer=analysis.traced.tracer,
        policy=policy,
        n_layers=len(analysis.layers),
        params_before=params_before,
        sites=tuple(sites),
        skipped=tuple(skipped),
        existing=tuple(analysis.existing),
    )


def reconcile_modes(plan: Plan, other: Plan, training: bool) -> Plan:
    """One plan for a model whose train and eval graphs differ (its forward reads ``self.training``).

    ``plan`` was made on the graph of the model's current mode (``training``), ``other`` on the other
    mode's. A site is kept where both modes have it, around the same layers with the same shapes and
    shortcut; the other mode's copy (its own node names) goes to ``other_mode_sites``.
    """

    def key(s: Site) -> tuple:  # without the batch size (the other mode may be traced on a batch of two)
        return (s.kind, s.start, s.end, s.in_shape[1:], s.out_shape[1:], s.projection)

    theirs = {key(s): s for s in other.sites}
    mine = {key(s) for s in plan.sites}
    sites, other_sites, skipped = [], [], list(plan.skipped)
    for s in plan.sites:
        twin = theirs.get(key(s))
        if twin is None:
            skipped.append(
                Skipped(
                    s.start, s.end, "the span differs between train and eval mode (forward reads self.training there)"
                )
            )
            continue
        sites.append(s)
        other_sites.append(replace(twin, name=s.name))
    for s in other.sites:
        if key(s) not in mine:
            skipped.append(
                Skipped(
                    s.start,
                    s.end,
                    f"a site only in {'eval' if training else 'train'} mode (forward reads self.training there)",
                )
            )
    modes = "train and eval mode"
    note = f"forward reads self.training: traced in {modes}; the converted model switches graphs with train()/eval()"
    return replace(
        plan, sites=tuple(sites), skipped=tuple(skipped), notes=(*plan.notes, note), other_mode_sites=tuple(other_sites)
    )
