"""Names and numbers that several stages share: choices, verdict thresholds, schema versions.

A leaf of the import graph: it imports nothing of resify, so any module (the CLI's choice lists,
the planner's validation, the report's verdict rules, the renderer's bands) reads the one copy.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "ShortcutChoice",
    "GateChoice",
    "GatePolicy",
    "TracerChoice",
    "ProjectionChoice",
    "PROJECTIONS",
    "MAX_ADDED",
    "MIN_BUDGET",
    "PROJECTION_COST",
    "Verdict",
    "SiteKind",
    "SHORTCUTS",
    "GATES",
    "GATE_POLICIES",
    "AUTO_OUTWEIGHS",
    "AUTO_GROWTH",
    "AUTO_RATE",
    "AUTO_SHRINK",
    "TRACERS",
    "VERDICTS",
    "PLAN_SCHEMA_VERSION",
    "REPORT_SCHEMA_VERSION",
    "VANISHING_RATIO",
    "EXPLODING_RATIO",
    "ABS_VANISHING",
    "ABS_EXPLODING",
    "DEEP_LAYERS",
    "ACTIVATION_GROWTH",
    "COLLAPSE_SIMILARITY",
    "LOSS_GROWTH",
    "image_size",
    "NAMESPACE",
]

#: the submodule under which resify puts every module and parameter it adds.
NAMESPACE = "resify"

ShortcutChoice = Literal["auto", "identity", "dense"]
#: the gates ``rewrite`` builds (a Site's ``gate``; None is "no gate")
GateChoice = Literal["rezero", "layerscale"]
#: what ``gate=`` may ask for: a gate, None, or "auto" (chosen site by site: ``resify.planning.gating``)
GatePolicy = Literal["auto", "rezero", "layerscale"]
TracerChoice = Literal["symbolic", "concrete"]
#: "auto": a learned 1×1 projection, grouped like the span's convolution; "conv": a dense one;
#: "pad": parameter-free (channels zero-padded or sliced, the size strided or pooled)
ProjectionChoice = Literal["auto", "conv", "pad"]
Verdict = Literal["healthy", "vanishing", "exploding", "collapsing"]
SiteKind = Literal["identity", "projection", "dense"]

SHORTCUTS: tuple[ShortcutChoice, ...] = get_args(ShortcutChoice)
#: None is "no gate".
GATES: tuple[GateChoice | None, ...] = (None, *get_args(GateChoice))
#: the values of ``gate=``, the default ("auto") first
GATE_POLICIES: tuple[GatePolicy | None, ...] = ("auto", *GATES)
TRACERS: tuple[TracerChoice, ...] = get_args(TracerChoice)
PROJECTIONS: tuple[ProjectionChoice, ...] = get_args(ProjectionChoice)
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)

#: 2 added Skipped.code and Site.shortcut; 3 added Site.owner, Site.exit_step and Plan.whole;
#: 4 added Site.gate_reason and the policy gate 'auto'; version 1 to 3 documents still load (their
#: sites are owned by the root where they have no owner, their gates were given, not chosen).
PLAN_SCHEMA_VERSION = 4
#: 2 added LayerFlow.activation_similarity, GradientFlow.activation_growth and .output_similarity,
#: FlowComparison.output_ratio and the verdict 'collapsing'; version 1 reports still load.
REPORT_SCHEMA_VERSION = 2

#: The default budget: learned projections may add this share of the model's parameters (ResNet-50's
#: own projections are about 6% of its parameters) ...
MAX_ADDED = 0.1
#: ... or this many parameters, whichever is more: a small model's projections cost little in
#: absolute terms (the seed guide's 5-layer network keeps all of its 11,009).
MIN_BUDGET = 65_536
#: A learned projection may cost at most this multiple of the parameters of the span it bridges.
PROJECTION_COST = 1.0

#: gate='auto': a site gets a gate where, ungated, it would grow the mean square its shortcut carries more
#: than this: its branch outweighs the shortcut (a branch as loud as its shortcut, independent of it,
#: gives 2×; a He-initialised VGG's, 2.5× to 6×; a fresh PyTorch layer's, 1.2× to 2.2×)
AUTO_OUTWEIGHS = 2.5
#: ... and the sites whose branches no norm ends get one where their shortcuts, ungated, would together
#: grow the signal's mean square more than this (they compound) in a net of DEEP_LAYERS layers or more ...
AUTO_GROWTH = 4.0
#: ... or, in a net of any depth, where they also grow it at least this much per site (the geometric
#: mean): a He-initialised branch doubles it, and even a few such sites compound (a fresh PyTorch layer
#: grows it 1.1× to 1.5×). Read off the digits benchmarks: the nets whose sites grow it 1.34× to 1.48×
#: each (16-layer GELU and ReLU MLPs, 8-block denoisers) train as well or better gated, those at 1.13×
#: to 1.17× (a 21-layer CNN without norms, Tanh MLPs) better ungated
AUTO_RATE = 1.3
#: ... and where the gates at 0 beside shortcuts that shrink their input (a fresh projection, a pool,
#: a slice) leave the output's mean square more than this below the original model's (2× in std),
#: those gates start where the output keeps the original's
AUTO_SHRINK = 4.0

#: flow(first) / flow(last) below this is 'vanishing'.
VANISHING_RATIO = 1e-2
#: flow(first) / flow(last) above this is 'exploding'.
EXPLODING_RATIO = 1e3
#: a first-layer flow below this is 'vanishing', whatever the ratio.
ABS_VANISHING = 1e-10
#: any flow above this is 'exploding', whatever the ratio.
ABS_EXPLODING = 1e6
#: a plain 'vanishing' network with this many layers or more is told to add gated shortcuts.
DEEP_LAYERS = 32
#: the forward signal: a layer's activation RMS above this multiple of the first layer's is
#: 'exploding' (also, in ``compare``, an output RMS above this multiple of the original's)
ACTIVATION_GROWTH = 1e2
#: a model whose output for different examples (or the positions of a sequence) has a similarity
#: (``report.figures.activation_figures``) above this, where the first layer's has not, is
#: 'collapsing': it maps them all to nearly one vector
COLLAPSE_SIMILARITY = 0.9999
#: a watched training step whose loss is above this multiple of the first recorded step's is 'exploding'
LOSS_GROWTH = 1e2


def image_size(model_name: str) -> int:
    """The side of the image a torchvision classifier is built for: 299 for Inception, else 224.

    >>> image_size("inception_v3"), image_size("resnet18")
    (299, 224)
    """
    return 299 if model_name.startswith("inception") else 224
