"""Stage 3 of the pipeline: a pure function from the analysis and a policy to a frozen Plan.

``make_plan`` decides, span by span, which shortcut goes where (the records are in ``sites``);
``reconcile_modes`` merges the plans of a model whose train and eval graphs differ. Nothing here
changes the model; ``rewrite`` executes the Plan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from ..analysis.analyze import Analysis, Layer
from ..analysis.bounds import is_bounded_activation, reaches_output_unchanged
from ..formats import fmt_shape
from ..ops import (
    data_input,
    describe,
)
from ..tracing.trace import TensorInfo
from .budget import span_groups, within_budget, within_cost
from .geometry import before_trailing_pool, norm_sees, span_geometry, span_norm
from .patterns import check_patterns, pattern_reason
from .policy import Policy
from .sites import Dense, Identity, Plan, Projection, ShortcutForm, Site, SkipCode, Skipped

__all__ = ["make_plan", "reconcile_modes"]


# ---------------------------------------------------------------------------------------------
# the pure planning function


def _site_for(layers: Sequence[Layer], analysis: Analysis, policy: Policy, name: str, carry: int = 0) -> Site | Skipped:
    """A Site for the span over ``layers``, or the Skipped record that says why there cannot be one:
    first the refusals that hold whatever the shortcut's form (``_refusal``), then the form."""
    first, last = layers[0], layers[-1]

    def skip(code: SkipCode, reason: str) -> Skipped:
        return Skipped(first.name, last.name, code, reason)

    refused = _refusal(layers, analysis, skip)
    if refused is not None:
        return refused
    src, dst = first.in_info, last.out_info
    assert src is not None and dst is not None  # _refusal skips a span without them
    # [N, C, *spatial] for convolutions (transposed too); features last for Linear, recurrent, attention
    channel_dim = 1 if first.kind.startswith("Conv") else -1
    # gate='auto' is decided site by site once the plan is made (``gating.choose_gates``): none until then
    gate = None if policy.gate == "auto" else policy.gate

    def site(shortcut: ShortcutForm, added: int, exit: str = last.output, out_shape: tuple = dst.shape) -> Site:
        return Site(
            start=first.name,
            end=last.name,
            layers=tuple(layer.name for layer in layers),
            in_shape=src.shape,
            out_shape=out_shape,
            shortcut=shortcut,
            gate=gate,
            gate_init=policy.effective_gate_init if gate else None,
            added_params=added,
            preserve_output=policy.preserve_output and not isinstance(shortcut, Dense),
            anchor=first.anchor,
            exit=exit,
            name=name,
            channel_dim=channel_dim,
        )

    if policy.shortcut == "dense":
        found = _dense_form(src, dst, layers, analysis, policy, channel_dim, last.output, carry, skip)
        return site(*found) if isinstance(found, tuple) else found
    out_c = dst.shape[channel_dim] if dst.shape else 1
    gate_params = {None: 0, "rezero": 1, "layerscale": out_c}[gate] + int(policy.preserve_output)
    chosen = _form(layers, analysis, policy, src, dst, channel_dim, skip)
    if isinstance(chosen, Skipped):
        return chosen
    form, exit, out_shape = chosen
    added = form.params if isinstance(form, Projection) else 0
    return site(form, added + gate_params, exit=exit or last.output, out_shape=out_shape or dst.shape)


def _refusal(layers: Sequence[Layer], analysis: Analysis, skip: Callable[[SkipCode, str], Skipped]) -> Skipped | None:
    """Why the span cannot have a shortcut of any form (None if it can): it is not single-entry
    single-exit, it only computes a gate, it ends in the model's bounded output, or its tensors have
    no recorded shape or are not floating-point."""
    first, last = layers[0], layers[-1]
    anchor = analysis.node(first.anchor)
    exit = analysis.node(last.output)
    problem = analysis.span_problem(data_input(anchor), exit)
    if problem:
        return skip("not_single_entry_exit", problem)
    if exit.name in analysis.gated:
        return skip(
            "gate_branch",
            f"the span only computes a gate, the bounded value that scales another at "
            f"'{analysis.gated[exit.name]}' (squeeze-excitation, attention weights, GLU): a shortcut would "
            "add to the gate, not to the signal it scales",
        )
    if is_bounded_activation(analysis.module, exit) and reaches_output_unchanged(analysis.module, exit):
        return skip(
            "bounded_output",
            f"the span ends in a bounded activation ({describe(analysis.module, exit)}) whose range is the "
            "model's output range: a shortcut would take outputs out of it",
        )
    src: TensorInfo | None = first.in_info
    dst: TensorInfo | None = last.out_info
    if src is None or dst is None:
        if first.kind in ("LSTM", "GRU", "RNN"):
            return skip(
                "no_shape",
                "the recurrent layer's input or output is not a tensor (a PackedSequence): a shortcut "
                "cannot add packed sequences; pad them around the layer (pad_packed_sequence) to get one",
            )
        return skip("no_shape", "no tensor shape was recorded for the span's input or output")
    if not src.is_float or not dst.is_float:
        return skip("not_float", f"non-float input ({src.dtype}); shortcuts need floating-point tensors")
    if src.dtype != dst.dtype:
        return skip("not_float", f"dtype changes across the span ({src.dtype} -> {dst.dtype})")
    return None


#: a shortcut's form, and where it differs from the span's, its exit node and output shape
_Form = tuple[ShortcutForm, str | None, tuple | None]


def _form(
    layers: Sequence[Layer],
    analysis: Analysis,
    policy: Policy,
    src: TensorInfo,
    dst: TensorInfo,
    channel_dim: int,
    skip: Callable[[SkipCode, str], Skipped],
) -> _Form | Skipped:
    """The shortcut's form for a span ``_refusal`` let through (an identity, or a projection from the
    span's geometry, as ``policy.shortcut`` and ``policy.projection`` allow), or why no form fits."""
    first = layers[0]
    dims = int(first.kind[-2]) if first.kind.startswith("Conv") else 0  # "Conv2d" -> 2
    conv_geometry = dims and len(src.shape) == dims + 2 and len(dst.shape) == dims + 2
    geometry, stride = span_geometry(layers, analysis, dims) if conv_geometry else ("same", ())
    change = f"{fmt_shape(src.shape)} -> {fmt_shape(dst.shape)}"
    if src.shape == dst.shape and geometry == "same":
        return Identity(), None, None
    if policy.shortcut == "identity":
        cut = before_trailing_pool(layers, analysis, src, dims) if src.shape != dst.shape else None
        if cut is not None:  # conv → norm → act → max-pool: the identity goes around all but the pool
            return Identity(), cut, src.shape
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
    form: Projection
    if channel_dim == -1:
        if src.shape[:-1] != dst.shape[:-1]:
            return skip(
                "unsupported_shape",
                f"unsupported shape change {change}: a Linear projection changes the last dimension only",
            )
        form = Projection("linear", (src.shape[-1], dst.shape[-1]))
    else:
        if not conv_geometry or src.shape[0] != dst.shape[0]:
            return skip("unsupported_shape", f"unsupported shape change {change} for a {first.kind} span")
        cin, cout = src.shape[1], dst.shape[1]
        sees = norm_sees(layers, analysis, dims)
        # a decoder's span (transposed convolution, upsampling) grows the map: the shortcut is
        # upsampled to the branch's size (nearest), as a pooled one is averaged down to it
        up = all(o >= i for i, o in zip(src.shape[2:], dst.shape[2:])) and src.shape[2:] != dst.shape[2:]
        if geometry != "match":  # the size follows a stride (1 or more): a 1×1 projection with that stride
            # a norm sees the projection's output size: the span's must see the span's output size
            # (or its input's, where the span keeps the size)
            norm = span_norm(layers, analysis, dims) if sees == "output" or (not stride and sees) else None
            form = Projection("conv", (cin, cout), dims, stride=stride, norm=norm)
        elif cin == cout:
            # Where the span pools (a max-pool ending a VGG stage, a global average pool) or its size
            # does not follow a stride, the shortcut averages its input to the branch's output size at
            # run time; where the channels do not change either, that pooling is the whole shortcut.
            return Projection("pool", (cin, cout), dims, pool=True, upsample=up), None, None
        else:
            # A norm on the projection sees what the span's norm sees: the input's size (conv → norm →
            # pool: the head of an EfficientNet normalises 7×7 maps, then pools them to 1×1, and trains
            # on a batch of one) or the output's (pool → conv → norm); where it sees neither, none.
            norm = span_norm(layers, analysis, dims) if sees else None
            form = Projection("conv", (cin, cout), dims, pool=True, pool_last=sees == "input", norm=norm, upsample=up)
    if policy.projection == "pad":  # ResNet's option A: no parameters
        return form.parameter_free(), None, None
    if policy.projection == "auto" and form.op == "conv":
        groups = span_groups(layers, analysis)
        if groups > 1 and form.channels[0] % groups == 0 and form.channels[1] % groups == 0:
            form = replace(form, groups=groups)  # beside a grouped or depthwise convolution
    return form, None, None


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
        pool = span_geometry(layers, analysis, len(src.shape) - 2)[0] != "same"
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


#: How many layers a span may hold where one layer alone gives no identity (group=1).
_WIDEST_SPAN = 4


def _wider_span(
    run: list[Layer], i: int, found: Site | Skipped, analysis: Analysis, policy: Policy, name: str
) -> tuple[list[Layer], Site] | None:
    """A span of 2 to 4 layers from ``run[i]`` that an expert would bridge instead of the one layer:
    an identity around layers that give back their input's shape (a Transformer's feed-forward
    expand → contract, a bottleneck), or, where one layer alone is not single-entry single-exit, the
    first span that is (an attention block's q, k, v and output projections). Only spans whose
    layers keep the input's grid (every dim but the channels) qualify: never an encoder → decoder."""
    if policy.shortcut == "dense" or (isinstance(found, Site) and found.kind == "identity"):
        return None
    tangled = isinstance(found, Skipped) and found.code == "not_single_entry_exit"
    if not tangled and not (isinstance(found, Site) and found.kind == "projection"):
        return None
    for j in range(i + 2, min(i + _WIDEST_SPAN, len(run)) + 1):
        group = run[i:j]
        if not _keeps_grid(group):
            return None
        site = _site_for(group, analysis, policy, name)
        if isinstance(site, Site) and (site.kind == "identity" or tangled):
            return group, site
    return None


def _keeps_grid(layers: Sequence[Layer]) -> bool:
    """Every layer's output has the span input's shape but for the channel (feature) dim."""
    src = layers[0].in_info
    if src is None:
        return False
    cd = 1 if layers[0].kind.startswith("Conv") else -1
    grid = lambda shape: tuple(d for k, d in enumerate(shape) if k != cd % max(len(shape), 1))
    return all(layer.out_info is not None and grid(layer.out_info.shape) == grid(src.shape) for layer in layers)


def _stem_reason(layer: Layer, analysis: Analysis) -> tuple[SkipCode, str] | None:
    """Why ``layer`` gets no shortcut as the stem of a residual network (see ``Analysis.stem_input``)."""
    x = analysis.stem_input(layer)
    if x is None or layer.in_info is None or layer.out_info is None:
        return None
    change = f"from {layer.in_info.shape[1]} to {layer.out_info.shape[1]} channels"
    return "stem", f"the stem: it maps the model's input '{x}' {change}; the rest of the network has its shortcuts"


def _site_name(layers: Sequence[Layer], taken: set[str]) -> str:
    base = layers[0].name.replace(".", "_") or "layer"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def make_plan(analysis: Analysis, policy: Policy, params_before: int = 0, prefix: str = "") -> Plan:
    """Decide the shortcut sites for an analysed model under ``policy`` (pure: changes nothing).

    ``prefix``: the qualified name of the traced module inside the model (a unit of a model whose
    root does not trace): the policy's patterns match the layers' names under it, and the patterns
    are checked by the caller, across every unit.

    Raises:
        PlanError: an ``include`` pattern matches no layer, or the patterns leave out every layer
            (the message lists the layers); an ``exclude`` pattern that matches none is a ResifyWarning.
    """
    if not prefix:
        check_patterns([layer.name for layer in analysis.layers], policy)
    skipped: list[Skipped] = []
    runs: list[list[Layer]] = [[]]
    for layer in analysis.layers:
        if layer.name in analysis.inside_existing:
            reason: tuple[SkipCode, str] | None = (
                "inside_existing",
                f"inside the existing shortcut at '{analysis.inside_existing[layer.name]}'",
            )
        else:
            reason = pattern_reason(f"{prefix}.{layer.name}" if prefix else layer.name, policy)
            reason = reason or (None if prefix else _stem_reason(layer, analysis))
        if reason:
            skipped.append(Skipped(layer.name, layer.name, *reason))
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(layer)
    taken = set(analysis.taken_names())
    notes: list[str] = []
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
            name = _site_name(group, taken)
            found = _site_for(group, analysis, policy, name, carry.pop(group[0].name, 0))
            wider = _wider_span(run, i, found, analysis, policy, name) if policy.group == 1 else None
            if wider is not None:
                group, found = wider
            if isinstance(found, Site):
                found, note = within_cost(found, group, analysis, policy)
                notes += [note] if note else []
            if isinstance(found, Site):
                sites.append(found)
                if isinstance(found.shortcut, Dense):
                    carry[found.shortcut.consumer] = found.shortcut.extra_channels
                i += len(group)
            else:
                skipped.append(found)
                i += 1  # slide: a group may still start at the next layer
    sites, over, budget_notes = within_budget(sites, policy, params_before)
    notes += budget_notes
    if over:
        order = {layer.name: i for i, layer in enumerate(analysis.layers)}
        skipped = sorted([*skipped, *over], key=lambda k: order.get(k.start, len(order)))
    return Plan(
        model_class=analysis.traced.model_class,
        tracer=analysis.traced.tracer,
        policy=policy,
        n_layers=len(analysis.layers),
        layers=tuple(layer.name for layer in analysis.layers),
        params_before=params_before,
        sites=tuple(sites),
        skipped=tuple(skipped),
        existing=tuple(analysis.existing),
        notes=tuple(notes),
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
