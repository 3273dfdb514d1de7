"""Stage 3, last step: ``gate='auto'`` chooses each site's gate from its branch and a measured forward.

A site computes ``out = α·F(x) + S(x)``. Under ``gate='auto'`` the planner leaves α out and
:func:`choose_gates` decides it site by site, on the example's forward run as the converted model would
run it (each branch F, shortcut S and their sum measured by its mean square), in forward order, the
sites before each one gated as already decided:

1. **The branch outweighs its shortcut**: ungated, the site would grow the mean square its shortcut
   carries more than ``AUTO_OUTWEIGHS`` (2.5×; a branch as loud as its shortcut and independent of it
   gives 2×). The block would not start near the identity, the premise of a residual network: a gate
   (``'rezero'``) that starts at 0 (ReZero, Bachlechner et al. 2020; SkipInit, De & Smith 2020). This is
   a He-initialised VGG, whose branches carry their input's full scale (ungated, every block doubles
   the variance and VGG-16's logits grow 800×: the case Fixup, Zhang et al. 2019, and SkipInit were
   made for), and a skipless Transformer, whose first normalised attention output is three times its
   embedding and the same vector at every position: added whole, it overwrites the tokens, the rank
   collapse of Noci et al. 2022 that T-Fixup (Huang et al. 2020) and He et al. 2023 avoid by
   down-weighting the branches.

2. **No norm ends the branch** (a plain or bounded activation, an LSTM) **and it does not outweigh its
   shortcut** (a fresh PyTorch layer adds about 1/6 of its input's mean square, an LSTM a few percent):
   ungated, the shortcuts compound: the signal's mean square grows by the product of the sites' gains
   ``E[(F + S)²] / E[x²]``, exponentially in depth. Where that product passes ``AUTO_GROWTH`` (4×),
   in a net of ``DEEP_LAYERS`` (32) layers or more or, in any net, at ``AUTO_RATE`` (1.3×) a site or
   more (the product's geometric mean: He-initialised branches double the signal, so a few such sites
   compound), each such site gets a gate that starts at 0 (ReZero; SkipInit; Fixup); where the product
   stays under 4×, or the net is shallower and the growth slower, or the branches are small, none: their
   shortcuts train best unhindered (on the digits, a 21-layer plain CNN, 1.13× to 1.17× a site, reaches
   97.4% ungated and 94.8% from α = 0; a 2-LSTM stack 97.5% and 95.3%; 32 layers is where the report
   already recommends gated shortcuts). The rate is read off those benchmarks: at 1.34× to 1.48× a site
   (16-layer GELU and ReLU MLPs; an 8-block conditional denoiser, whose test MSE is 0.15 gated and 0.33
   ungated) the gated nets train as well or better.

3. **A norm ends the branch** (BatchNorm in training, LayerNorm, GroupNorm, RMSNorm) **and it does not
   outweigh its shortcut**: it adds its own fixed scale whatever its input's, so the signal grows by
   addition, not compounding, and the norm already down-weights deep branches against the shortcut
   (SkipInit's account of BatchNorm ResNets): no gate.

4. **The gates at 0 would shrink the output**: a gate at 0 hands its site's signal to the shortcut.
   Beside an identity, that passes the input on, scale and all; beside a shortcut that changes the
   shape it need not (a fresh 1×1 projection carries about a third of its input's mean square, an
   average pool of an uncorrelated map a quarter, a slice its share), and the layers that set the
   original's scale (He-initialised convolutions, ReLUs, max-pools) are bypassed. Site after site the
   shrink compounds: gated at 0, SqueezeNet 1.0 and VGG-11 (every stage opens with a reshaping site)
   start with logits 21× and 4× smaller in std than the original's. So where, with every rule-1 and
   rule-2 gate at 0, the output's mean square (measured) falls more than ``AUTO_SHRINK`` (4×) below the
   original model's (one forward of it), the gates at 0 beside shortcuts that shrink their input
   (``E[S²] < E[x²]``) all start at the one α at which the output keeps the original's mean square (to
   within 1.5×, by bisection on measured forwards; at most 1): a data-dependent start in the manner of
   LSUV (Mishkin & Matas 2016). One α for them all, fitted on the output, not one a site fitted on
   the original's scale there: a shortcut around a small-initialised head (SqueezeNet's zero-padded
   classifier) carries more than the original's logits, and site-by-site starts would leave it to
   overshoot. Gates beside identities stay at 0, and no choice of gate changes.
   Where the output does not shrink, or ``gate_init`` is given, nothing changes.

A dense shortcut keeps its branch whole and ``preserve_output`` starts every shortcut at β = 0: no gate
for either. A learned projection is drawn as ``rewrite`` will draw it, from a generator of its own
(its product with the branch counted at its mean, 0: the draw is independent of the branch); the
model's buffers and the random state are restored after each run. Where no forward can run (a
model on the meta device, an example the graph refuses) the rules read the branches alone: a gate
where no norm ends the branch in a net of ``DEEP_LAYERS`` layers or more. The figures are as good as
the example: give a batch like the training data's (a training batch), not one or two examples. The
cost: one forward of the example, two where rule 2 gates; where rule 4 looks, one of the original and
a few more (its bisection, where the output shrinks). Nothing here changes the model.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..analysis.analyze import Analysis
from ..analysis.bounds import is_bounded_activation
from ..constants import AUTO_GROWTH, AUTO_OUTWEIGHS, AUTO_RATE, AUTO_SHRINK, DEEP_LAYERS
from ..ops import called_module, data_input, follower_role, is_layer_node, layer_kind
from ..tracing.trace import Traced
from .gate_signal import SiteSignal, Unmeasured, _Forward, _run
from .sites import Dense, GateReason, Plan, Projection, Site

__all__ = ["choose_gates", "branch_end", "BranchEnd"]

#: where gate='auto' starts a gate at zero and no gate_init is given (ReZero, SkipInit)
_GATE_START = 0.0
#: rule 4's bisection: at most this many steps, to an output whose mean square is within this factor
#: of the original's
_BISECTIONS = 8
_CLOSE = 1.5
_NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.instance_norm}
_RMS_NORM = getattr(F, "rms_norm", None)
_RECURRENT = ("LSTM", "GRU", "RNN")


# ---------------------------------------------------------------------------------------------
# what ends a branch


class BranchEnd(NamedTuple):
    """What fixes the scale of a site's branch output: ``kind`` "norm" (a norm that normalises each
    example, or a BatchNorm in training, follows its last layer), "bounded" (a bounded activation, a
    recurrent layer) or "plain"; ``op`` names it ("LayerNorm", "LSTM", "ReLU")."""

    kind: str
    op: str


def branch_end(site: Site, analysis: Analysis) -> BranchEnd:
    """What ends the site's branch: the ops from its output back to its last parametric op."""
    gm = analysis.module
    cur: Any = analysis.node(site.exit)
    bounded = activation = ""
    for _ in range(64):
        if not isinstance(cur, torch.fx.Node):
            break
        if is_layer_node(gm, cur):
            kind = layer_kind(gm, cur)
            if kind in _RECURRENT:
                return BranchEnd("bounded", bounded or kind)
            return BranchEnd("bounded", bounded) if bounded else BranchEnd("plain", activation or kind)
        norm = _normalises(gm, cur)
        if norm:
            return BranchEnd("norm", norm)
        if not bounded and is_bounded_activation(gm, cur):
            bounded = _op_name(gm, cur)
        if not activation and follower_role(gm, cur) == "activation":
            activation = _op_name(gm, cur)
        cur = data_input(cur)
    return BranchEnd("bounded", bounded) if bounded else BranchEnd("plain", activation or "unknown")


def _op_name(gm: nn.Module, n: torch.fx.Node) -> str:
    m = called_module(gm, n)
    if m is not None:
        return type(m).__name__
    return str(getattr(n.target, "__name__", n.target))


def _normalises(gm: nn.Module, n: torch.fx.Node) -> str:
    """The name of the norm ``n`` where it fixes its output's scale whatever its input's: per example,
    or per batch for a BatchNorm in training; "" otherwise (a BatchNorm in eval mode uses running
    statistics; LocalResponseNorm barely rescales)."""
    if follower_role(gm, n) != "norm":
        return ""
    m = called_module(gm, n)
    if m is not None:
        if isinstance(m, _BatchNorm):
            return type(m).__name__ if m.training or not m.track_running_stats else ""
        return "" if isinstance(m, nn.LocalResponseNorm) else type(m).__name__
    if n.target is F.batch_norm:
        training = n.args[5] if len(n.args) > 5 else n.kwargs.get("training", False)
        return "batch_norm" if training is True else ""
    if n.target in _NORM_FUNCTIONS or (_RMS_NORM is not None and n.target is _RMS_NORM):
        return str(getattr(n.target, "__name__", "norm"))
    return ""


# ---------------------------------------------------------------------------------------------
# the measured forward


# ---------------------------------------------------------------------------------------------
# the choice


class _Choice(NamedTuple):
    reason: GateReason
    start: float | None  # the gate's start; None: no gate

    @property
    def alpha(self) -> float:
        """What the branch is scaled by at initialisation."""
        return 1.0 if self.start is None else self.start


def choose_gates(plan: Plan, traced: Traced, analysis: Analysis) -> Plan:
    """Under ``gate='auto'``, the plan with every site's ``gate``, ``gate_init``, ``added_params`` and
    ``gate_reason`` filled in (the rules are in the module's docstring); any other plan as it is.

    ``traced`` and ``analysis`` are those the plan was made from; where the plan has
    ``other_mode_sites`` (a forward that reads ``self.training``), those get their twin's choice.
    """
    if plan.policy.gate != "auto" or not plan.sites:
        return plan
    start = plan.policy.gate_init if plan.policy.gate_init is not None else _GATE_START
    ends = {s.name: branch_end(s, analysis) for s in plan.sites}
    layers = plan.n_layers
    fixed: dict[str, _Choice] = {}
    for s in plan.sites:
        end = ends[s.name]
        if isinstance(s.shortcut, Dense):
            fixed[s.name] = _Choice(GateReason("dense", end.kind, end.op), None)
        elif s.preserve_output:
            fixed[s.name] = _Choice(GateReason("preserve_output", end.kind, end.op), None)
    loose = [s.name for s in plan.sites if s.name not in fixed and ends[s.name].kind != "norm"]
    if len(fixed) == len(plan.sites):
        return _with_gates(plan, fixed)
    try:
        chosen, signals, output = _measured(plan, traced, ends, fixed, set(), start)
        unweighed = [n for n in loose if n not in chosen]  # rule 2: neither fixed nor outweighing
        growth = math.prod(signals[n].gain for n in unweighed if n in signals)
        rate = growth ** (1 / len(unweighed)) if unweighed else 1.0
        compounds = bool(unweighed) and growth > AUTO_GROWTH and (layers >= DEEP_LAYERS or rate >= AUTO_RATE)
        if compounds:  # their gates change the signal the later normalised sites see: measure again
            kept = {n: c for n, c in chosen.items() if ends[n].kind != "norm" or n in fixed}
            chosen, signals, output = _measured(plan, traced, ends, kept, set(unweighed), start)
        for n in unweighed:
            end = ends[n]
            reason = GateReason(
                "compounds" if compounds else "shallow", end.kind, end.op, growth, len(unweighed), layers
            )
            chosen[n] = _Choice(reason, start if compounds else None)
    except Unmeasured as e:
        deep = layers >= DEEP_LAYERS
        chosen = dict(fixed)
        for s in plan.sites:
            if s.name not in fixed:
                end = ends[s.name]
                gated = deep and end.kind != "norm"
                chosen[s.name] = _Choice(
                    GateReason("unmeasured", end.kind, end.op, None, len(loose), layers, str(e)),
                    start if gated else None,
                )
    else:
        if plan.policy.gate_init is None:
            chosen = _kept_scale(plan, traced, chosen, signals, output)
    return _with_gates(plan, chosen)


def _measured(
    plan: Plan,
    traced: Traced,
    ends: dict[str, BranchEnd],
    fixed: dict[str, _Choice],
    compounding: set[str],
    start: float,
) -> tuple[dict[str, _Choice], dict[str, SiteSignal], float]:
    """One measured forward, choosing each site's gate as it is reached by rules 1 and 3 (the sites in
    ``compounding`` start at ``start``, the other rule-2 sites ungated for now); with the signals and
    the output's mean square."""
    chosen: dict[str, _Choice] = dict(fixed)

    def alpha(site: Site, signal: SiteSignal) -> float:
        if site.name in chosen:
            return chosen[site.name].alpha
        if site.name in compounding:  # rule 2, decided on the first forward
            return start
        end = ends[site.name]
        if signal.growth > AUTO_OUTWEIGHS:  # rule 1
            chosen[site.name] = _Choice(GateReason("outweighs", end.kind, end.op, signal.growth), start)
            return start
        if end.kind == "norm":  # rule 3
            chosen[site.name] = _Choice(GateReason("normalised", end.kind, end.op, signal.growth), None)
        return 1.0

    run = _Forward(traced, plan.sites, alpha)
    output = _run(traced, run)
    for s in plan.sites:  # a site the forward did not reach (no tensor there): as its branch says
        if s.name not in chosen and ends[s.name].kind == "norm":
            chosen[s.name] = _Choice(GateReason("normalised", "norm", ends[s.name].op), None)
    return chosen, run.signals, output


def _kept_scale(
    plan: Plan, traced: Traced, chosen: dict[str, _Choice], signals: dict[str, SiteSignal], output: float
) -> dict[str, _Choice]:
    """Rule 4: where the gates at 0 beside shortcuts that shrink their input leave the output's mean
    square (``output``, measured with ``chosen``) more than ``AUTO_SHRINK`` below the original model's,
    those gates start at the one α at which the output keeps the original's (by bisection on measured
    forwards); the other choices stand."""
    sites = {s.name: s for s in plan.sites}
    shrinking = {
        n
        for n, c in chosen.items()
        if c.start == 0.0
        and isinstance(sites[n].shortcut, Projection)
        and n in signals
        and signals[n].shortcut < signals[n].entry
    }
    if not shrinking or not output > 0:
        return chosen
    try:
        return _started(plan, traced, chosen, shrinking, output)
    except Unmeasured:  # a refinement: where its forwards fail, the choices stand, their gates at 0
        return chosen


def _started(
    plan: Plan, traced: Traced, chosen: dict[str, _Choice], shrinking: set[str], output: float
) -> dict[str, _Choice]:
    """Rule 4's measurement: ``chosen`` with the ``shrinking`` gates' start, where the output shrinks."""
    original = _run(traced, torch.fx.Interpreter(traced.root, graph=traced.graph))
    if not output * AUTO_SHRINK < original:
        return chosen

    def scale(a: float) -> float:  # log of the output's mean square over the original's, the shrinking gates at a
        run = _Forward(traced, plan.sites, lambda site, _: a if site.name in shrinking else chosen[site.name].alpha)
        out = _run(traced, run)
        if not math.isfinite(out):
            return math.inf
        return math.log(out / original) if out > 0 else -math.inf

    low, high = 0.0, 1.0
    for _ in range(_BISECTIONS):  # bisection, to within _CLOSE of the original's mean square
        a = (low + high) / 2
        off = scale(a)
        if abs(off) <= math.log(_CLOSE):
            break
        low, high = (a, high) if off < 0 else (low, a)
    else:
        a = high
    a = float(f"{a:.2g}")
    ratio = output / original
    return {
        n: c._replace(start=a, reason=replace(c.reason, start=a, shrunk=ratio)) if n in shrinking else c
        for n, c in chosen.items()
    }


def _with_gates(plan: Plan, chosen: dict[str, _Choice]) -> Plan:
    def resolved(s: Site) -> Site:
        choice = chosen[s.name]
        if choice.start is None:
            return replace(s, gate=None, gate_init=None, gate_reason=choice.reason)
        return replace(
            s, gate="rezero", gate_init=choice.start, added_params=s.added_params + 1, gate_reason=choice.reason
        )

    others = None if plan.other_mode_sites is None else tuple(resolved(s) for s in plan.other_mode_sites)
    return replace(plan, sites=tuple(resolved(s) for s in plan.sites), other_mode_sites=others)
