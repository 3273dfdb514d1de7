"""Stage 3 of the pipeline: a pure function from the analysis and a policy to a frozen Plan.

``make_plan`` decides, span by span, which shortcut goes where (the records are in ``sites``);
``reconcile_modes`` merges the plans of a model whose train and eval graphs differ. Nothing here
changes the model; ``rewrite`` executes the Plan.
"""

from __future__ import annotations

import fnmatch
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace

from .analyze import Analysis, Layer
from .errors import PlanError, ResifyWarning
from .formats import fmt_shape
from .geometry import SAME, Window, size_functions
from .ops import (
    data_input,
    describe,
    follower_role,
    is_bounded_activation,
    reaches_output_unchanged,
)
from .sites import Dense, Identity, Plan, Policy, Projection, ShortcutForm, Site, SkipCode, Skipped
from .trace import TensorInfo

__all__ = ["make_plan", "reconcile_modes"]


# ---------------------------------------------------------------------------------------------
# the pure planning function


def _pattern_reason(name: str, policy: Policy) -> tuple[SkipCode, str] | None:
    for p in policy.exclude:
        if fnmatch.fnmatchcase(name, p):
            return "excluded", f"excluded by pattern {p!r}"
    if policy.include and not any(fnmatch.fnmatchcase(name, p) for p in policy.include):
        return "excluded", f"not matched by include={list(policy.include)!r}"
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


def _site_for(layers: Sequence[Layer], analysis: Analysis, policy: Policy, name: str, carry: int = 0) -> Site | Skipped:
    """A Site for the span over ``layers``, or the Skipped record that says why there cannot be one."""
    first, last = layers[0], layers[-1]

    def skip(code: SkipCode, reason: str) -> Skipped:
        return Skipped(first.name, last.name, code, reason)

    anchor = analysis.node(first.anchor)
    exit = analysis.node(last.output)
    problem = analysis.span_problem(data_input(anchor), exit)
    if problem:
        return skip("not_single_entry_exit", problem)
    if is_bounded_activation(analysis.module, exit) and reaches_output_unchanged(analysis.module, exit):
        return skip(
            "bounded_output",
            f"the span ends in a bounded activation ({describe(analysis.module, exit)}) whose range is the "
            "model's output range: a shortcut would take outputs out of it",
        )
    src: TensorInfo | None = first.in_info
    dst: TensorInfo | None = last.out_info
    if src is None or dst is None:
        return skip("no_shape", "no tensor shape was recorded for the span's input or output")
    if not src.is_float or not dst.is_float:
        return skip("not_float", f"non-float input ({src.dtype}); shortcuts need floating-point tensors")
    if src.dtype != dst.dtype:
        return skip("not_float", f"dtype changes across the span ({src.dtype} -> {dst.dtype})")
    channel_dim = -1 if first.kind == "Linear" else 1

    def site(shortcut: ShortcutForm, added: int) -> Site:
        return Site(
            start=first.name,
            end=last.name,
            layers=tuple(layer.name for layer in layers),
            in_shape=src.shape,
            out_shape=dst.shape,
            shortcut=shortcut,
            gate=policy.gate,
            gate_init=policy.effective_gate_init,
            added_params=added,
            preserve_output=policy.preserve_output and not isinstance(shortcut, Dense),
            anchor=first.anchor,
            exit=last.output,
            name=name,
            channel_dim=channel_dim,
        )

    if policy.shortcut == "dense":
        found = _dense_form(src, dst, layers, analysis, policy, channel_dim, last.output, carry, skip)
        return site(*found) if isinstance(found, tuple) else found
    out_c = dst.shape[channel_dim] if dst.shape else 1
    gate_params = {None: 0, "rezero": 1, "layerscale": out_c}[policy.gate] + int(policy.preserve_output)
    dims = int(first.kind[-2]) if first.kind.startswith("Conv") else 0  # "Conv2d" -> 2
    conv_geometry = dims and len(src.shape) == dims + 2 and len(dst.shape) == dims + 2
    geometry, stride = _geometry(layers, analysis, dims) if conv_geometry else ("same", ())
    change = f"{fmt_shape(src.shape)} -> {fmt_shape(dst.shape)}"
    if src.shape == dst.shape and geometry == "same":
        return site(Identity(), gate_params)
    if policy.shortcut == "identity":
        if src.shape == dst.shape:
            return skip(
                "identity_needs_same_shape",
                f"the span keeps the shape {fmt_shape(src.shape)} only at this input size (an adaptive pool "
                "or a valid convolution); shortcut='identity' needs it kept at every size; try shortcut='auto'",
            )
        return skip(
            "identity_needs_same_shape",
            f"shape changes {change}; shortcut='identity' adds shortcuts only where shapes "
            "match; try shortcut='auto' for a learned projection",
        )
    if len(src.shape) != len(dst.shape):
        return skip(
            "rank_change", f"rank change {change} (e.g. a flatten) inside the span; a projection cannot bridge it"
        )
    if all(r == "dropout" for layer in layers for r in layer.roles):
        # W·x + P·x = (W + P)·x: beside a branch with no nonlinearity (a classifier head), a learned
        # projection is a second linear map of the same input; it adds parameters, not a shorter path
        return skip(
            "linear_span",
            "the span is linear (no activation, norm or pool): a projection would add one more linear map",
        )
    if first.kind == "Linear":
        if src.shape[:-1] != dst.shape[:-1]:
            return skip(
                "unsupported_shape",
                f"unsupported shape change {change}: a Linear projection changes the last dimension only",
            )
        cin, cout = src.shape[-1], dst.shape[-1]
        return site(Projection("linear", (cin, cout)), cin * cout + cout + gate_params)
    if not conv_geometry or src.shape[0] != dst.shape[0]:
        return skip("unsupported_shape", f"unsupported shape change {change} for a {first.kind} span")
    cin, cout = src.shape[1], dst.shape[1]
    sees = _norm_sees(layers, analysis, dims)
    if geometry != "match":  # the size follows a stride (1 or more): a 1×1 projection with that stride
        # a norm sees the projection's output size: the span's must see the span's output size
        # (or its input's, where the span keeps the size)
        norm = _span_norm(layers, analysis, dims) if sees == "output" or (not stride and sees) else None
        added = cin * cout + (2 * cout if norm else 0) + gate_params
        return site(Projection("conv", (cin, cout), dims, stride=stride, norm=norm), added)
    # Where the span pools (a max-pool ending a VGG stage, a global average pool) or its size does not
    # follow a stride, the shortcut averages its input to the branch's output size at run time; where
    # the channels do not change either, that pooling is the whole shortcut, without parameters.
    if cin == cout:
        return site(Projection("pool", (cin, cout), dims, pool=True), gate_params)
    # A norm on the projection sees what the span's norm sees: the input's size (conv → norm → pool:
    # the head of an EfficientNet normalises 7×7 maps, then pools them to 1×1, and trains on a batch
    # of one) or the output's (pool → conv → norm); where it sees neither, the projection has none.
    norm = _span_norm(layers, analysis, dims) if sees else None
    added = cin * cout + (2 * cout if norm else 0) + gate_params
    return site(Projection("conv", (cin, cout), dims, pool=True, pool_last=sees == "input", norm=norm), added)


def _span_norm(layers: Sequence[Layer], analysis: Analysis, dims: int) -> str | None:
    """The BatchNorm type a conv projection gets: one where the span has a batch norm."""
    return next(
        (f"BatchNorm{dims}d" for layer in layers for r in layer.roles if r == "norm" and analysis.has_batchnorm(layer)),
        None,
    )


def _dense_form(
    src: TensorInfo,
    dst: TensorInfo,
    layers: Sequence[Layer],
    analysis: Analysis,
    policy: Policy,
    cd: int,
    exit: str,
    carry: int,
    skip: Callable[[SkipCode, str], Skipped],
) -> tuple[Dense, int] | Skipped:
    """A dense shortcut (cat([x, F(x)]), the consumer widened with zero weights for x) and its added
    parameters, or the Skipped record saying why not."""
    change = f"{fmt_shape(src.shape)} -> {fmt_shape(dst.shape)}"
    if len(src.shape) != len(dst.shape):
        return skip("rank_change", f"rank change {change} (e.g. a flatten) inside the span; cannot concatenate")
    pool = False
    if cd == -1:
        if src.shape[:-1] != dst.shape[:-1]:
            return skip(
                "unsupported_shape",
                f"unsupported shape change {change}: concatenation on the last dimension needs the others equal",
            )
    else:
        if src.shape[0] != dst.shape[0]:
            return skip("unsupported_shape", f"unsupported shape change {change}")
        pool = _geometry(layers, analysis, len(src.shape) - 2)[0] != "same"
    found = analysis.dense_consumer(analysis.node(exit), cd)
    if isinstance(found, str):
        return skip("no_consumer", found)
    consumer, consumer_params_per_channel = found
    extra = src.shape[cd] + carry
    if policy.dense_max_growth is not None and extra > policy.dense_max_growth:
        return skip(
            "dense_growth",
            f"would add {extra} channels/features to '{consumer}', more than "
            f"dense_max_growth={policy.dense_max_growth}",
        )
    return Dense(consumer, extra, pool), extra * consumer_params_per_channel


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
            reason: tuple[SkipCode, str] | None = (
                "inside_existing",
                f"inside the existing shortcut at '{analysis.inside_existing[layer.name]}'",
            )
        else:
            reason = _pattern_reason(layer.name, policy)
        if reason:
            skipped.append(Skipped(layer.name, layer.name, *reason))
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
                    Skipped(
                        group[0].name,
                        group[-1].name,
                        "group_remainder",
                        f"only {len(group)} layer(s) left for group={policy.group}",
                    )
                )
                break
            found = _site_for(group, analysis, policy, _site_name(group, taken), carry.pop(group[0].name, 0))
            if isinstance(found, Site):
                sites.append(found)
                if isinstance(found.shortcut, Dense):
                    carry[found.shortcut.consumer] = found.shortcut.extra_channels
                i += policy.group
            else:
                skipped.append(found)
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
                    s.start,
                    s.end,
                    "mode_differs",
                    "the span differs between train and eval mode (forward reads self.training there)",
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
                    "mode_differs",
                    f"a site only in {'eval' if training else 'train'} mode (forward reads self.training there)",
                )
            )
    modes = "train and eval mode"
    note = f"forward reads self.training: traced in {modes}; the converted model switches graphs with train()/eval()"
    return replace(
        plan, sites=tuple(sites), skipped=tuple(skipped), notes=(*plan.notes, note), other_mode_sites=tuple(other_sites)
    )
